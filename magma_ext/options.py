"""Validation of Magma's arguments: hyperparameters (the constructor, ``add_param_group``,
groups edited between steps and loaded from checkpoints), parameters, gradients and process
groups. Every error names the argument."""

from __future__ import annotations

import numbers

import torch

from . import functional
from .layout import check_block_option
from .philox import check_seed
from .rounding import check_state_dtype
from .types import BASES, MASKS

try:  # torch.distributed may be missing from a build (it is present in every official wheel)
    from torch.distributed import ProcessGroup
except ImportError:  # pragma: no cover - a torch built without distributed support
    ProcessGroup = None

REAL_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))

# The keys check_group_options reads: a group is checked again when one of them changes.
OPTION_KEYS = ("lr", "betas", "eps", "weight_decay", "base", "mask", "keep_prob", "tau",
               "score_ema", "block", "seed", "magma", "fused", "master_weights", "capturable",
               "exp_avg_dtype", "exp_avg_sq_dtype", "store_param_remainders")


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _in_range(name: str, value, low: float, high: float, *, low_open=False, high_open=False):
    value = _number(name, value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or value != value:
        left = "<" if low_open else "<="
        right = "<" if high_open else "<="
        raise ValueError(f"Invalid {name}: {value} (expected {low} {left} {name} {right} {high})")


def _check_lr(lr) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"Invalid lr: a tensor lr must be a one-element float tensor, got {lr.shape}")
        lr = lr.item()  # once per new lr tensor (see options_key), as torch.optim checks it
    _in_range("lr", lr, 0.0, float("inf"))


def _check_betas(betas) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor):
            raise TypeError(f"betas[{i}] must be a float, not a tensor")
        _in_range(f"betas[{i}]", beta, 0.0, 1.0, high_open=True)


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {choices})")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def options_key(group: dict) -> tuple:
    """A cheap fingerprint of a group's hyperparameters (tensors by identity, so no sync)."""
    return tuple(id(value) if isinstance(value, torch.Tensor) else value
                 for value in map(group.get, OPTION_KEYS))


def check_group_options(group: dict) -> None:
    """Raise ValueError/TypeError naming the first invalid hyperparameter of a param group.

    ``group["seed"]`` is normalised to a Python int (a numpy integer is accepted).
    """
    _check_lr(group["lr"])
    _check_betas(group["betas"])
    _in_range("eps", group["eps"], 0.0, float("inf"))
    _in_range("weight_decay", group["weight_decay"], 0.0, float("inf"))
    _check_choice("base", group["base"], BASES)
    _check_choice("mask", group["mask"], MASKS)
    _in_range("keep_prob", group["keep_prob"], 0.0, 1.0)
    if group["mask"] == "skip" and group["keep_prob"] == 0:
        raise ValueError("Invalid keep_prob: 0 with mask='skip' (its update is scaled by 1/keep_prob)")
    if group["mask"] == "magma" and group["keep_prob"] == 0:
        raise ValueError("Invalid keep_prob: 0 with mask='magma' keeps no block, so no masked weight "
                         "would ever change; use keep_prob in (0, 1], or magma=False to train a group unmasked")
    _in_range("tau", group["tau"], 0.0, float("inf"), low_open=True, high_open=True)
    _in_range("score_ema", group["score_ema"], 0.0, 1.0)
    check_block_option(group["block"])
    group["seed"] = check_seed(group["seed"])
    _check_bool("magma", group["magma"])
    for name in ("exp_avg_dtype", "exp_avg_sq_dtype"):
        check_state_dtype(name, group[name])


def check_group(group: dict, where: str = "", params=None) -> None:
    """Check a whole parameter group (every hyperparameter, and ``params`` against
    ``fused=True``); ``where`` prefixes the message (which group, say)."""
    try:
        check_group_options(group)
        if group["fused"] not in (None, True, False):
            raise TypeError(f"fused must be None, True or False, got {group['fused']!r}")
        for name in ("master_weights", "capturable", "store_param_remainders"):
            _check_bool(name, group[name])
        _check_remainders(group)
    except (TypeError, ValueError) as error:
        if not where:
            raise
        raise type(error)(f"{where}{error}") from None
    if group["fused"] and not functional.extension_loaded():
        raise RuntimeError(
            f"{where}fused=True needs magma_ext's CUDA extension, which is not loaded "
            f"({functional.extension_error()}); reinstall with a CUDA-enabled torch and nvcc, or use fused=None"
        )
    if group["fused"] and params is not None:
        check_fused_params(params, where)


def _check_remainders(group: dict) -> None:
    """``store_param_remainders`` keeps part of a master weight: it needs ``master_weights``,
    and the CUDA kernels do not take it (yet)."""
    if not group["store_param_remainders"]:
        return
    if not group["master_weights"]:
        raise ValueError("store_param_remainders=True needs master_weights=True (the remainder is "
                         "the low half of a float32 master weight)")
    if group["fused"]:
        raise ValueError("store_param_remainders=True is not taken by the CUDA kernels: use fused=None "
                         "(its groups then run the PyTorch path) or fused=False")


def check_fused_params(params, where: str = "") -> None:
    """Every parameter is one the CUDA ops take (``fused=True``)."""
    bad = [p for p in params if not functional.fusable(p)]
    if bad:
        raise RuntimeError(
            f"{where}fused=True requires every parameter to be a contiguous CUDA tensor of dtype float32, "
            f"bfloat16 or float16; got {bad[0].dtype} on {bad[0].device}"
            f"{'' if bad[0].is_contiguous() else ' (not contiguous)'}"
        )


def check_params(params: list, seen: set[int]) -> None:
    """New parameters are real floating-point tensors, none listed twice (``seen``: ids of the
    parameters already in the optimizer, updated)."""
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params must contain tensors, got {type(p).__name__}")
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(f"params must be real floating-point tensors, got dtype {p.dtype}")
        if id(p) in seen:
            raise ValueError("a parameter appears more than once in params; list each parameter once")
        seen.add(id(p))


def check_grad(p: torch.Tensor) -> None:
    """A parameter's gradient is one the step can take: dense, real floating point, its shape."""
    grad = p.grad
    if grad.layout is not torch.strided:
        raise TypeError(f"Magma does not support sparse gradients (grad layout {grad.layout})")
    if grad.dtype not in REAL_FLOATS:
        raise TypeError(f"Magma needs real floating-point gradients, got grad dtype {grad.dtype}")
    if grad.shape != p.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} does not match param shape {tuple(p.shape)}")


def process_groups(process_group) -> list:
    """The ``process_group`` argument as a list of groups, checked."""
    if process_group is None:
        return []
    groups = list(process_group) if isinstance(process_group, (list, tuple)) else [process_group]
    if not groups:
        raise ValueError("process_group: an empty list; pass None for no group")
    for group in groups:
        if ProcessGroup is None or not isinstance(group, ProcessGroup):
            raise TypeError("process_group must be a torch.distributed.ProcessGroup, a list of them "
                            f"or None, got {type(group).__name__}")
    return groups
