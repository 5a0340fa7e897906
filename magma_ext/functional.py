"""``magma()``: one Magma step over tensor lists, on the path that fits them.

As torch's ``adam()`` picks its single-tensor, foreach or fused implementation, :func:`magma`
picks the compiled CUDA ops (:mod:`magma_ext.fused`) or the PyTorch reference
(:mod:`magma_ext.reference`).  :func:`plan_step` computes once what stays the same from step to
step for a list of tensors (its layouts, its split into native calls or its block index), and
the caller keeps the plan while the list is unchanged.

A sharded step passes ``reduce_block_sums``: the step then runs in two halves and the callback
completes, in place, the sums of blocks that other ranks hold pieces of (rows of
``block_sums`` follow ``plan.row_order``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _ops
from .fused import FusedPlan, fused_plan, fused_run
from .layout import BlockLayout
from .reference import BlockIndex, build_block_index, finalize_and_apply, magma_step, moments_and_sums
from .types import GroupTensors, Hyper

BlockSumReducer = Callable[[torch.Tensor], None]
_warned: set[str] = set()  # the once-per-process warnings given (:func:`_warn_once`)


@dataclass
class StepPlan:
    """The parts of a step over one list of tensors on one device that stay the same."""

    device: torch.device
    layouts: list[BlockLayout]
    tensor_indices: list[int]
    fused: FusedPlan | None
    block_index: BlockIndex | None

    @property
    def row_order(self) -> list[int]:
        """Positions in the list of the pieces whose blocks fill ``block_sums``, in row order."""
        if self.fused is not None:
            return self.fused.row_order
        return list(range(len(self.layouts)))


def extension_loaded() -> bool:
    """Whether the compiled CUDA ops are there."""
    return _ops.has_cuda_extension()


def extension_error() -> str:
    """Why the compiled CUDA ops are not there."""
    return _ops.load_error()


def warn_no_extension() -> None:
    """Warn, once per process, that CUDA parameters run the PyTorch path."""
    _warn_once("no extension", lambda: (
        "Magma got CUDA parameters but runs its PyTorch path, about 4x slower than the fused "
        f"CUDA step: {extension_error()}. Build the extension with "
        "`pip install --no-build-isolation .` under a CUDA build of torch with nvcc "
        "(see README.md), or pass fused=False to silence this."))


def warn_remainders_unfused() -> None:
    """Warn, once per process, that groups with ``store_param_remainders`` run the PyTorch path."""
    _warn_once("remainders unfused", lambda: (
        "Magma: parameter groups with store_param_remainders=True run the PyTorch path on CUDA "
        "(the fused kernels do not take master-weight remainders yet), several times slower "
        "than the fused step; pass fused=False to silence this."))


def _warn_once(key: str, message: Callable[[], str]) -> None:
    """``warnings.warn(message())`` the first time ``key`` comes, attributed to ``Magma.step``
    (five frames up: the warn_* function and the planner's three)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message(), stacklevel=6)


def fusable(p: torch.Tensor) -> bool:
    """Whether the CUDA ops take this parameter: contiguous, on a GPU, of a kernel dtype."""
    return p.is_cuda and p.dtype in _ops.FUSED_DTYPES and p.is_contiguous()


def use_fused(fused: bool | None, params: list[torch.Tensor]) -> bool:
    """The path ``fused`` (None, True or False) gives these parameters."""
    if fused is False or not _ops.has_cuda_extension():
        return False
    return all(fusable(p) for p in params)


def plan_step(
    device: torch.device,
    params: list[torch.Tensor],
    has_master: list[bool],
    layouts: list[BlockLayout],
    tensor_indices: list[int],
    fused: bool | None,
) -> StepPlan:
    """What :func:`magma` needs besides the tensors themselves; cache it while they stay the same."""
    if use_fused(fused, params):
        return StepPlan(device, layouts, tensor_indices, fused_plan(params, has_master, layouts, tensor_indices), None)
    return StepPlan(device, layouts, tensor_indices, None, build_block_index(layouts, tensor_indices, device))


def magma(
    plan: StepPlan,
    tensors: GroupTensors,
    hyper: Hyper,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    reduce_block_sums: BlockSumReducer | None = None,
) -> None:
    """One Magma step (docs/ALGORITHM.md section 1) over ``tensors``, in place."""
    if grad_scale is not None:
        grad_scale = grad_scale.to(plan.device, non_blocking=True)
    if found_inf is not None:
        found_inf = found_inf.to(plan.device, non_blocking=True)
    if not tensors.params:
        if reduce_block_sums is not None:  # other ranks still wait for this rank's (empty) part
            reduce_block_sums(torch.zeros((0, 3), dtype=torch.float32, device=plan.device))
        return
    if plan.fused is not None:
        fused_run(plan.fused, tensors, hyper, grad_scale, found_inf, reduce_block_sums)
    elif reduce_block_sums is None:
        magma_step(tensors, hyper, plan.block_index, grad_scale, found_inf)
    else:
        moments = moments_and_sums(tensors, hyper, plan.block_index, grad_scale)
        reduce_block_sums(moments.block_sums)
        finalize_and_apply(tensors, hyper, plan.block_index, moments, found_inf)
