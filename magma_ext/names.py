"""Parameter names as tensor indices (docs/ALGORITHM.md section 4): the identity of a logical
tensor that every split of a model agrees on, where the optimizer is given names."""

from __future__ import annotations

import hashlib

from .layout import MAX_TENSOR_INDEX

# Names take indices in [2**32, 2**62): never a position or a small declared index.
NAME_INDEX_BASE = 2**32
# Module names that wrappers insert without changing the model: torch.compile, activation
# checkpointing and FSDP1 wrap a module in an attribute of these names.
WRAPPER_NAMES = frozenset(("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"))


def canonical_name(name: str) -> str:
    """``name`` without what wrappers add: every component named in :data:`WRAPPER_NAMES` and
    the leading ``module.`` components of ``DistributedDataParallel`` and ``DataParallel``.

    So ``module._orig_mod.layers.0._checkpoint_wrapped_module.attn.weight`` is
    ``layers.0.attn.weight``, the name in the unwrapped model.
    """
    if not isinstance(name, str):
        raise TypeError(f"a parameter name must be a str, got {type(name).__name__}")
    parts = [part for part in name.split(".") if part not in WRAPPER_NAMES]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def name_index(name: str) -> int:
    """The tensor index of the parameter named ``name`` (wrappers' additions dropped, see
    :func:`canonical_name`): ``2**32`` plus the first 8 bytes of the BLAKE2b digest of its
    UTF-8 bytes, little-endian, modulo ``2**62 - 2**32``."""
    digest = hashlib.blake2b(canonical_name(name).encode("utf-8"), digest_size=8).digest()
    return NAME_INDEX_BASE + int.from_bytes(digest, "little") % (MAX_TENSOR_INDEX - NAME_INDEX_BASE)
