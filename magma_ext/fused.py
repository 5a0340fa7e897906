"""The fused CUDA step: typed wrappers around ``torch.ops.magma_ext`` and their fake versions.

:func:`fused_step` takes the same lists as :func:`magma_ext.reference.magma_step` and makes one
native call per (parameter dtype, gradient dtype, master weights) sub-list.  Step counters are
advanced on the device, as torch's fused Adam does, so nothing synchronises with the host.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from . import _ops
from .philox import check_seed
from .reference import GroupTensors, Hyper

BASE_CODES = {"adam": 0, "rmsprop": 1, "laprop": 2}
MASK_CODES = {"magma": 0, "skip": 1, "none": 2}


def _signed64(seed: int) -> int:
    """The op schema's ``int`` is int64: pass the unsigned seed's bits."""
    return seed - 2**64 if seed >= 2**63 else seed


def fused_step_op(
    params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps,
    tensor_indices, block_sizes, offsets, logical_numels, *,
    lr, beta1, beta2, eps, weight_decay, base, mask, keep_prob, tau, score_ema, seed,
    grad_scale=None, found_inf=None,
) -> None:
    """One fused step over lists of CUDA tensors of one dtype (``torch.ops.magma_ext.fused_step``).

    ``steps`` must already hold this step's count.  ``block_sizes``, ``offsets`` and
    ``logical_numels`` describe how each tensor (or piece of one) is cut into blocks.
    """
    lr_tensor = None
    if isinstance(lr, torch.Tensor):
        lr_tensor, lr = lr.to(device=params[0].device, dtype=torch.float32), 0.0
    torch.ops.magma_ext.fused_step(
        params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps,
        tensor_indices, block_sizes, offsets, logical_numels, float(lr), lr_tensor,
        beta1, beta2, eps, weight_decay, BASE_CODES[base], MASK_CODES[mask], keep_prob, tau,
        score_ema, _signed64(check_seed(seed)), grad_scale, found_inf,
    )


@dataclass
class FusedSublist:
    """Tensors of one (param dtype, master weights) kind: one native call."""

    members: list[int]  # positions in the group's lists
    has_master: bool
    block_sizes: list[int]
    offsets: list[int]
    logical_numels: list[int]
    tensor_indices: list[int]


@dataclass
class FusedPlan:
    """How a group's lists split into native calls; fixed while the parameters are."""

    sublists: list[FusedSublist]
    everything: bool  # a single sublist holding every tensor in order


def fused_plan(params, has_master, layouts, tensor_indices) -> FusedPlan:
    """Split a group's tensors by (param dtype, master weights); grads are checked per step."""
    kinds = defaultdict(list)
    for i, (p, master) in enumerate(zip(params, has_master)):
        kinds[(p.dtype, master)].append(i)
    sublists = []
    for (_, master), members in kinds.items():
        sublists.append(FusedSublist(
            members=members, has_master=master,
            block_sizes=[layouts[i].block_size for i in members],
            offsets=[layouts[i].offset for i in members],
            logical_numels=[layouts[i].logical_numel for i in members],
            tensor_indices=[tensor_indices[i] for i in members],
        ))
    return FusedPlan(sublists, everything=len(sublists) == 1)


def fused_run(
    plan: FusedPlan,
    tensors: GroupTensors,
    hyper: Hyper,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One Magma step of a group's CUDA tensors through the compiled kernels, in place."""
    torch._foreach_add_(tensors.steps, 1)
    if grad_scale is not None:
        grad_scale = grad_scale.to(torch.float32)
    if found_inf is not None:
        found_inf = found_inf.to(torch.float32)
    for sub in plan.sublists:
        if plan.everything:
            pick = lambda items: items  # noqa: E731
        else:
            pick = lambda items: [items[i] for i in sub.members]  # noqa: E731
        params = pick(tensors.params)
        fused_step_op(
            params, _kernel_grads(pick(tensors.grads), params[0].dtype), pick(tensors.exp_avgs),
            pick(tensors.exp_avg_sqs), pick(tensors.scores),
            pick(tensors.master_params) if sub.has_master else [], pick(tensors.steps),
            sub.tensor_indices, sub.block_sizes, sub.offsets, sub.logical_numels,
            lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps,
            weight_decay=hyper.weight_decay, base=hyper.base, mask=hyper.mask,
            keep_prob=hyper.keep_prob, tau=hyper.tau, score_ema=hyper.score_ema, seed=hyper.seed,
            grad_scale=grad_scale, found_inf=found_inf,
        )
    if found_inf is not None:
        torch._foreach_sub_(tensors.steps, [found_inf] * len(tensors.steps))


def fused_step(tensors: GroupTensors, hyper: Hyper, grad_scale=None, found_inf=None) -> None:
    """:func:`fused_run` without a cached plan (tests and one-off calls)."""
    if tensors.params:
        masters = [m is not None for m in tensors.master_params]
        plan = fused_plan(tensors.params, masters, tensors.layouts, tensors.tensor_indices)
        fused_run(plan, tensors, hyper, grad_scale, found_inf)


def _kernel_grads(grads: list[torch.Tensor], param_dtype: torch.dtype) -> list[torch.Tensor]:
    """The kernels read contiguous grads, all of the params' dtype or all float32."""
    dtype = grads[0].dtype
    if dtype not in (param_dtype, torch.float32) or any(g.dtype != dtype for g in grads):
        dtype = torch.float32
        return [g.to(dtype).contiguous() for g in grads]
    return [g if g.is_contiguous() else g.contiguous() for g in grads]


if _ops.has_cuda_extension():

    @torch.library.register_fake("magma_ext::fused_step")
    def _fused_step_fake(*args, **kwargs) -> None:
        return None
