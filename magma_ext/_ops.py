"""Loads the compiled CUDA extension ``magma_ext._C`` if it was built.

Importing ``_C`` runs its static ``TORCH_LIBRARY`` registrations; the ops then live under
``torch.ops.magma_ext``.  Without the extension the package still works on the reference path.
"""

from __future__ import annotations

import importlib

import torch

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_loaded: bool | None = None
_error: str = ""


def _load() -> bool:
    global _loaded, _error
    if _loaded is None:
        try:
            importlib.import_module("magma_ext._C")
            _loaded = True
        except ImportError as exc:  # not built: a CPU-only install
            _loaded, _error = False, f"import magma_ext._C failed: {exc}"
    return _loaded


def has_cuda_extension() -> bool:
    """True when magma_ext's compiled CUDA ops are loaded."""
    return _load()


def load_error() -> str:
    """Why the extension is not loaded ('' when it is)."""
    _load()
    return _error or "loaded"
