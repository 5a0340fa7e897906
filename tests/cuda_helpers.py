"""Shared pieces of the GPU tests: twin optimizers (fused and reference) fed the same grads."""

from __future__ import annotations

import pytest
import torch

from magma_ext import Magma, _ops, has_cuda_extension
from magma_ext.layout import BlockLayout
from magma_ext.types import GroupTensors

requires_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_cuda_extension()),
    reason="needs a CUDA GPU and magma_ext's CUDA extension",
)

# Tolerances of fused vs reference.  Moments and scores are float32 in both and depend only on
# the gradients, so they differ by a few ulps however many steps ran (the betas decay older
# rounding): STATE_TOL.  After one step the parameters differ by the rounding of one update:
# PARAM_TOL (one ulp of a bfloat16/float16 parameter is 2**-8/2**-11 relative).  Over a run the
# scores (their block sums reduced in another order) scale each update a few roundings apart
# from the reference's, and a low-precision parameter re-rounded every step can flip one ulp
# either way, so the differences of a parameter random-walk: TRAJECTORY_TOL allows about 200
# float32 roundings at |param| ~ 4 (200 * 2**-24 * 4 = 5e-5), and 8 ulps at |param| ~ 2 for
# bfloat16/float16 (seen on an H100: at most 4 bfloat16 ulps, on 1 element in 16385, after 200
# steps).
STATE_TOL = dict(rtol=2e-5, atol=1e-6)
PARAM_TOL = {
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
}
TRAJECTORY_TOL = {
    torch.float32: dict(rtol=1e-5, atol=5e-5),
    torch.bfloat16: dict(rtol=2**-5, atol=2**-3),
    torch.float16: dict(rtol=2**-8, atol=2**-6),
}

# Odd sizes: empty, one element, work-item edges (kChunk = 8192), rows above the single-pass
# limit (8192 elements).
SHAPES = [(5, 7), (13,), (0,), (1,), (3, 4, 5), (33, 257), (8193,), (16385,), (3, 9000), (2, 16384), (0, 4)]


def random_params(shapes, dtype, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, device="cuda", generator=generator).to(dtype) for s in shapes]


def twins(shapes, dtype=torch.float32, master_weights=False, seed=0, **options):
    """A fused and a reference Magma over identical copies of the same parameters."""
    fused_params = [p.requires_grad_() for p in random_params(shapes, dtype, seed)]
    reference_params = [p.detach().clone().requires_grad_() for p in fused_params]
    fused = Magma(fused_params, fused=True, master_weights=master_weights, **options)
    reference = Magma(reference_params, fused=False, master_weights=master_weights, **options)
    return fused, reference


def params_of(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def feed_same_grads(fused, reference, step, grad_dtype=None):
    """Fresh random grads, identical for both optimizers."""
    generator = torch.Generator(device="cuda").manual_seed(1000 + step)
    for p, q in zip(params_of(fused), params_of(reference)):
        grad = torch.randn(p.shape, device="cuda", generator=generator).to(grad_dtype or p.dtype)
        if grad.dtype != p.dtype:  # torch >= 2.10 wants the param to allow another grad dtype
            p.grad_dtype = q.grad_dtype = None
        p.grad = grad
        q.grad = grad.clone()


def assert_same_state(fused, reference, where="", trajectory=False):
    """Every state tensor and every parameter of the two optimizers agree.

    ``trajectory``: compare parameters (and master weights) with the tolerance of a long run.
    """
    for p, q in zip(params_of(fused), params_of(reference)):
        fs, rs = fused.state[p], reference.state[q]
        assert fs.keys() == rs.keys()
        for key, value in fs.items():
            if not isinstance(value, torch.Tensor):
                assert value == rs[key], (where, key)
            elif key != "master_param":
                torch.testing.assert_close(value, rs[key], **STATE_TOL, msg=lambda m: f"{where} {key}: {m}")
        param_tol = (TRAJECTORY_TOL if trajectory else PARAM_TOL)[p.dtype]
        if "master_param" in fs:
            master_tol = (TRAJECTORY_TOL if trajectory else PARAM_TOL)[torch.float32]
            torch.testing.assert_close(fs["master_param"], rs["master_param"], **master_tol,
                                       msg=lambda m: f"{where} master_param: {m}")
        torch.testing.assert_close(p, q, **param_tol, msg=lambda m: f"{where} param: {m}")


class CapturedStep:
    """``optimizer.step()`` captured in a CUDA graph, the parameters' current grads its inputs."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.static_grads = [p.grad for p in params_of(optimizer)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                optimizer.step()
        torch.cuda.current_stream().wait_stream(side)

    def replay(self):
        """One step on the grads the parameters hold now (copied into the graph's inputs)."""
        for static, p in zip(self.static_grads, params_of(self.optimizer)):
            static.copy_(p.grad)
            p.grad = static
        self.graph.replay()


def changed_blocks(before, after, optimizer):
    """Per parameter, which blocks changed on the last step (a block is kept iff it changed)."""
    from magma_ext.layout import layout_for

    result = []
    for old, p, group in zip(before, params_of(optimizer), _groups_per_param(optimizer)):
        layout = layout_for(tuple(p.shape), group["block"])
        changed = (old != p.detach()).reshape(-1)
        pieces = changed.split(layout.lengths()) if layout.numel else []
        result.append([bool(piece.any()) for piece in pieces])
    return result


def _groups_per_param(optimizer):
    return [group for group in optimizer.param_groups for _ in group["params"]]


# ---------------------------------------------------------------------------- lists of the ops


def pieces(logical_numel, cuts, block_size, tensor_index, dtype=torch.float32, seed=0, master=False,
           state_dtypes=(torch.float32, torch.float32)):
    """A logical tensor cut at `cuts` into pieces, as GroupTensors lists (state included, the
    moments of ``state_dtypes``; bfloat16 ones hold the float32 values rounded to nearest)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    bounds = [0, *cuts, logical_numel]
    layouts = [BlockLayout(numel=b - a, block_size=block_size, offset=a, logical_numel=logical_numel)
               for a, b in zip(bounds, bounds[1:])]
    f32 = dict(device="cuda", dtype=torch.float32)
    params = [torch.randn(l.numel, generator=generator, **f32).to(dtype) for l in layouts]
    return GroupTensors(
        params=params,
        grads=[torch.randn(l.numel, generator=generator, **f32).to(dtype) for l in layouts],
        exp_avgs=[(torch.randn(l.numel, generator=generator, **f32) * 0.1).to(state_dtypes[0]) for l in layouts],
        exp_avg_sqs=[(torch.rand(l.numel, generator=generator, **f32) * 0.01).to(state_dtypes[1]) for l in layouts],
        scores=[torch.rand(l.num_blocks, generator=generator, **f32) for l in layouts],
        steps=[torch.full((), 3.0, **f32) for _ in layouts],
        master_params=[p.to(torch.float32) for p in params] if master else [None] * len(layouts),
        layouts=layouts,
        tensor_indices=[tensor_index] * len(layouts),
    )


def concat_lists(*groups: GroupTensors) -> GroupTensors:
    """The lists of several GroupTensors, one after another."""
    return GroupTensors(*(sum((list(getattr(g, f)) for g in groups), [])
                          for f in GroupTensors.__dataclass_fields__))


def clone_lists(tensors: GroupTensors) -> GroupTensors:
    """A copy of every tensor of the lists."""
    copy = lambda items: [t.clone() if isinstance(t, torch.Tensor) else t for t in items]  # noqa: E731
    return GroupTensors(*(copy(getattr(tensors, f)) for f in GroupTensors.__dataclass_fields__))


def op_lists(t: GroupTensors) -> tuple:
    """The ops' leading positional arguments (steps already hold this step's count)."""
    masters = [] if all(m is None for m in t.master_params) else list(t.master_params)
    return (t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.scores, masters, t.steps,
            list(t.tensor_indices), [l.block_size for l in t.layouts], [l.offset for l in t.layouts],
            [l.logical_numel for l in t.layouts])


def rows_of(t: GroupTensors) -> int:
    """Rows of the lists' block_sums: one per block of each piece."""
    return sum(l.num_blocks for l in t.layouts)


def new_block_sums(t: GroupTensors, mask: str) -> torch.Tensor:
    """The block_sums a caller passes: (B, 3) for mask "magma", else (0, 3)."""
    return torch.empty((rows_of(t) if mask == "magma" else 0, 3), device="cuda")


def whole_and_ranks(logical_numel, cuts, block_size, tensor_index, state_dtypes=(torch.float32, torch.float32)):
    """A whole tensor's lists, and copies of its pieces cut at ``cuts`` as the ranks holding them
    would have them (each piece's blocks' scores included)."""
    whole = pieces(logical_numel, [], block_size, tensor_index=tensor_index, state_dtypes=state_dtypes)
    bounds = [0, *cuts, logical_numel]
    ranks = []
    for a, b in zip(bounds, bounds[1:]):
        layout = BlockLayout(numel=b - a, block_size=block_size, offset=a, logical_numel=logical_numel)
        blocks = slice(layout.first_block, layout.first_block + layout.num_blocks)
        ranks.append(GroupTensors(
            params=[whole.params[0][a:b].clone()], grads=[whole.grads[0][a:b].clone()],
            exp_avgs=[whole.exp_avgs[0][a:b].clone()], exp_avg_sqs=[whole.exp_avg_sqs[0][a:b].clone()],
            scores=[whole.scores[0][blocks].clone()], steps=[whole.steps[0].clone()],
            master_params=[None], layouts=[layout], tensor_indices=[tensor_index],
        ))
    return whole, ranks


def step_whole_and_ranks(whole: GroupTensors, ranks: list[GroupTensors], hyper: dict) -> None:
    """The whole tensor's fused step, and each rank's split step with the rows of shared blocks
    summed in between (an all-reduce by hand, in a fixed order)."""
    _ops.fused_step(*op_lists(whole), **hyper)
    sums = [new_block_sums(rank, hyper["mask"]) for rank in ranks]
    for rank, rows in zip(ranks, sums):
        _ops.moments_partials(*op_lists(rank), rows, **hyper)
    if hyper["mask"] == "magma":
        total = torch.zeros(whole.layouts[0].num_blocks, 3, device="cuda")
        for rank, rows in zip(ranks, sums):
            first = rank.layouts[0].first_block
            total[first:first + rows.shape[0]] += rows
        for rank, rows in zip(ranks, sums):
            first = rank.layouts[0].first_block
            rows.copy_(total[first:first + rows.shape[0]])
    for rank, rows in zip(ranks, sums):
        _ops.finalize_apply(*op_lists(rank), rows, **hyper)
