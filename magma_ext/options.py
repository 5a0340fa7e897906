"""Validation of Magma's hyperparameters, shared by the constructor and ``add_param_group``."""

from __future__ import annotations

import numbers

import torch

from .layout import check_block_option
from .philox import check_seed
from .types import BASES, MASKS

# The keys check_group_options reads: a group is checked again when one of them changes.
OPTION_KEYS = ("lr", "betas", "eps", "weight_decay", "base", "mask", "keep_prob", "tau",
               "score_ema", "block", "seed", "magma", "fused", "master_weights", "capturable")


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
