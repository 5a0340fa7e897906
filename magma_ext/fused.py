"""Glue between a group's tensor lists and the compiled ops of :mod:`magma_ext._ops`.

The kernels take lists of one parameter dtype with or without master weights, so a group's
tensors are split into sub-lists of one kind (:class:`FusedPlan`); each sub-list is one native
call per half of the step.  Step counters are advanced on the device, as torch's fused Adam
does, so nothing synchronises with the host.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _ops
from .types import GroupTensors, Hyper


@dataclass
class FusedSublist:
    """Tensors of one (param dtype, master weights) kind: one native call per half step."""

    members: list[int]  # positions in the group's lists
    has_master: bool
    block_sizes: list[int]
    offsets: list[int]
    logical_numels: list[int]
    tensor_indices: list[int]
    first_row: int  # this sub-list's first row in the group's block_sums
    rows: int


@dataclass
class FusedPlan:
    """How a group's lists split into native calls; fixed while the parameters are."""

    sublists: list[FusedSublist]
    everything: bool  # a single sublist holding every tensor in order

    @property
    def row_order(self) -> list[int]:
        """Positions in the group's lists of the pieces whose blocks fill block_sums, in row order."""
        return [i for sub in self.sublists for i in sub.members]


def fused_plan(params, has_master, layouts, tensor_indices) -> FusedPlan:
    """Split a group's tensors by (param dtype, master weights); grads are checked per step."""
    kinds = defaultdict(list)
    for i, (p, master) in enumerate(zip(params, has_master)):
        kinds[(p.dtype, master)].append(i)
    sublists, row = [], 0
    for (_, master), members in kinds.items():
        rows = sum(layouts[i].num_blocks for i in members)
        sublists.append(FusedSublist(
            members=members, has_master=master,
            block_sizes=[layouts[i].block_size for i in members],
            offsets=[layouts[i].offset for i in members],
            # negative: a column slice's piece, whose blocks the kernels must never take as whole
            logical_numels=[-layouts[i].logical_numel if layouts[i].sliced else layouts[i].logical_numel
                            for i in members],
            tensor_indices=[tensor_indices[i] for i in members],
            first_row=row, rows=rows,
        ))
        row += rows
    return FusedPlan(sublists, everything=len(sublists) == 1)


def _calls(plan: FusedPlan, tensors: GroupTensors, hyper: Hyper, grad_scale, found_inf):
    """The positional lists and keyword arguments of each sub-list's native call."""
    keywords = dict(
        lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps,
        weight_decay=hyper.weight_decay, base=hyper.base, mask=hyper.mask,
        keep_prob=hyper.keep_prob, tau=hyper.tau, score_ema=hyper.score_ema, seed=hyper.seed,
        grad_scale=grad_scale, found_inf=found_inf,
    )
    for sub in plan.sublists:
        if plan.everything:
            pick = lambda items: items  # noqa: E731
        else:
            pick = lambda items: [items[i] for i in sub.members]  # noqa: E731
        params = pick(tensors.params)
        lists = (
            params, _kernel_grads(pick(tensors.grads), params[0].dtype), pick(tensors.exp_avgs),
            pick(tensors.exp_avg_sqs), pick(tensors.scores),
            pick(tensors.master_params) if sub.has_master else [], pick(tensors.steps),
            sub.tensor_indices, sub.block_sizes, sub.offsets, sub.logical_numels,
        )
        yield sub, lists, keywords


def fused_run(
    plan: FusedPlan,
    tensors: GroupTensors,
    hyper: Hyper,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    reduce_block_sums: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """One Magma step of a group's CUDA tensors through the compiled ops, in place.

    With ``reduce_block_sums`` the step runs as two halves: ``moments_partials`` fills one
    (blocks, 3) buffer whose rows follow ``plan.row_order``, the callback completes the sums
    of blocks split across ranks in place, and ``finalize_apply`` finishes the step.
    """
    torch._foreach_add_(tensors.steps, 1)
    if grad_scale is not None:
        grad_scale = grad_scale.to(torch.float32)
    if found_inf is not None:
        found_inf = found_inf.to(torch.float32)
    calls = list(_calls(plan, tensors, hyper, grad_scale, found_inf))
    if reduce_block_sums is None:
        for _, lists, keywords in calls:
            _ops.fused_step(*lists, **keywords)
    else:
        rows = sum(sub.rows for sub in plan.sublists) if hyper.mask == "magma" else 0
        block_sums = torch.empty((rows, 3), dtype=torch.float32, device=tensors.params[0].device)
        views = [block_sums[sub.first_row:sub.first_row + sub.rows] if rows else block_sums
                 for sub, _, _ in calls]
        for (_, lists, keywords), view in zip(calls, views):
            _ops.moments_partials(*lists, view, **keywords)
        reduce_block_sums(block_sums)
        for (_, lists, keywords), view in zip(calls, views):
            _ops.finalize_apply(*lists, view, **keywords)
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
