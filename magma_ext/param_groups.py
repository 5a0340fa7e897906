"""Parameter groups the way LLM trainers set them up."""

from __future__ import annotations

from torch import nn


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, weight_decay: float = 0.0, **options) -> list[dict]:
    """Split ``model``'s trainable parameters into a masked group and an unmasked one.

    Weight matrices (2-D or more) of every module except embeddings and norms are masked and
    decayed.  Embedding weights, norm weights and every bias or other 1-D parameter are neither
    masked (``"magma": False``) nor decayed.  ``options`` (e.g. ``lr``) go into both groups.
    Each parameter appears once, even when shared between modules (tied weights).
    """
    unmasked_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or _is_norm(module):
            unmasked_ids.update(id(p) for p in module.parameters(recurse=False))
    masked, unmasked = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in unmasked_ids or p.ndim < 2:
            unmasked.append(p)
        else:
            masked.append(p)
    groups = []
    if masked:
        groups.append({"params": masked, "weight_decay": weight_decay, **options})
    if unmasked:
        groups.append({"params": unmasked, "weight_decay": 0.0, "magma": False, **options})
    return groups
