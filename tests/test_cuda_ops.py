"""The fused op itself: registration, sharded pieces, 64-bit sizes, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch

from cuda_helpers import PARAM_TOL, STATE_TOL, requires_gpu
from magma_ext import has_cuda_extension
from magma_ext.fused import fused_step, fused_step_op
from magma_ext.layout import BlockLayout
from magma_ext.reference import GroupTensors, Hyper, build_block_index, magma_step


@pytest.mark.skipif(not has_cuda_extension(), reason="the CUDA extension is not built")
def test_extension_registers_its_op():
    schema = str(torch.ops.magma_ext.fused_step.default._schema)
    for mutated in ("Tensor(a!)[] params", "Tensor(b!)[] exp_avgs", "Tensor(c!)[] exp_avg_sqs",
                    "Tensor(d!)[] scores", "Tensor(e!)[] master_params"):
        assert mutated in schema


def _hyper(**changes):
    values = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, base="adam",
                  mask="magma", keep_prob=0.5, tau=2.0, score_ema=0.9, seed=99)
    values.update(changes)
    return Hyper(**values)


def _pieces(logical_numel, cuts, block_size, tensor_index, dtype=torch.float32, seed=0):
    """A logical tensor cut at `cuts` into pieces, as GroupTensors lists (state included)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    bounds = [0, *cuts, logical_numel]
    layouts = [BlockLayout(numel=b - a, block_size=block_size, offset=a, logical_numel=logical_numel)
               for a, b in zip(bounds, bounds[1:])]
    f32 = dict(device="cuda", dtype=torch.float32)
    return GroupTensors(
        params=[torch.randn(l.numel, generator=generator, **f32).to(dtype) for l in layouts],
        grads=[torch.randn(l.numel, generator=generator, **f32).to(dtype) for l in layouts],
        exp_avgs=[torch.randn(l.numel, generator=generator, **f32) * 0.1 for l in layouts],
        exp_avg_sqs=[torch.rand(l.numel, generator=generator, **f32) * 0.01 for l in layouts],
        scores=[torch.rand(l.num_blocks, generator=generator, **f32) for l in layouts],
        steps=[torch.full((), 3.0, **f32) for _ in layouts],
        master_params=[None] * len(layouts),
        layouts=layouts,
        tensor_indices=[tensor_index] * len(layouts),
    )


def _clone(tensors: GroupTensors) -> GroupTensors:
    copy = lambda items: [t.clone() if isinstance(t, torch.Tensor) else t for t in items]  # noqa: E731
    return GroupTensors(*(copy(getattr(tensors, f)) for f in GroupTensors.__dataclass_fields__))


def _assert_lists_close(a: GroupTensors, b: GroupTensors):
    for name in ("params", "exp_avgs", "exp_avg_sqs", "scores", "steps"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            tol = PARAM_TOL[x.dtype] if name == "params" else STATE_TOL
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "logical_numel, cuts, block_size",
    [
        (10000, [2500, 7001], 300),  # pieces start and end inside blocks
        (10000, [2500, 7001], 10000),  # one tensor block split over three pieces
        (70000, [1, 40000], 16385),  # blocks over a chunk, a one-element piece
        (9000, [3000, 6000], 3000),  # pieces of whole blocks: the single-pass kernel
        (5000, [2222], 1),  # element-wise blocks
    ],
)
@pytest.mark.parametrize("mask", ["magma", "skip"])
@requires_gpu
def test_pieces_at_offsets_match_reference(logical_numel, cuts, block_size, mask):
    tensors = _pieces(logical_numel, cuts, block_size, tensor_index=5)
    expected = _clone(tensors)
    hyper = _hyper(mask=mask)
    fused_step(tensors, hyper)
    magma_step(expected, hyper, build_block_index(expected.layouts, expected.tensor_indices, "cuda"))
    _assert_lists_close(tensors, expected)


@requires_gpu
def test_tensor_over_2_to_the_31_elements():
    numel = 2**31 + 4099
    try:
        param = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
        tensors = GroupTensors(
            params=[param], grads=[torch.randn(numel, device="cuda", dtype=torch.bfloat16)],
            exp_avgs=[torch.zeros(numel, device="cuda")], exp_avg_sqs=[torch.zeros(numel, device="cuda")],
            scores=[torch.full((1,), 0.5, device="cuda")], steps=[torch.zeros((), device="cuda")],
            master_params=[None], layouts=[BlockLayout(numel=numel, block_size=numel)], tensor_indices=[0],
        )
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    tail = slice(numel - 5000, numel)
    expected = GroupTensors(
        params=[param[tail].clone()], grads=[tensors.grads[0][tail].clone()],
        exp_avgs=[torch.zeros(5000, device="cuda")], exp_avg_sqs=[torch.zeros(5000, device="cuda")],
        scores=[torch.full((1,), 0.5, device="cuda")], steps=[torch.zeros((), device="cuda")],
        master_params=[None], layouts=[BlockLayout(numel=5000, block_size=5000)], tensor_indices=[0],
    )
    hyper = _hyper(mask="none")
    fused_step(tensors, hyper)
    magma_step(expected, hyper, build_block_index(expected.layouts, expected.tensor_indices, "cuda"))
    torch.testing.assert_close(param[tail], expected.params[0], **PARAM_TOL[torch.bfloat16])
    torch.testing.assert_close(tensors.exp_avg_sqs[0][tail], expected.exp_avg_sqs[0], **STATE_TOL)


def _op_args(tensors: GroupTensors):
    layouts = tensors.layouts
    args = (tensors.params, tensors.grads, tensors.exp_avgs, tensors.exp_avg_sqs, tensors.scores, [],
            tensors.steps, tensors.tensor_indices, [l.block_size for l in layouts],
            [l.offset for l in layouts], [l.logical_numel for l in layouts])
    scalars = (1e-2, None, 0.9, 0.999, 1e-8, 0.0, 0, 0, 0.5, 2.0, 0.9, 3, None, None)
    return args + scalars


@requires_gpu
def test_opcheck():
    tensors = _pieces(20000, [9000], 300, tensor_index=1)
    torch.library.opcheck(torch.ops.magma_ext.fused_step.default, _op_args(tensors))


@requires_gpu
def test_torch_compile_fullgraph_matches_eager():
    eager = _pieces(20000, [9000], 5000, tensor_index=2)
    compiled = _clone(eager)

    def step(t: GroupTensors):
        fused_step_op(t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.scores, [], t.steps,
                      t.tensor_indices, [5000, 5000], [0, 9000], [20000, 20000],
                      lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, base="adam",
                      mask="magma", keep_prob=0.5, tau=2.0, score_ema=0.9, seed=1)

    step(eager)
    torch.compile(step, fullgraph=True)(compiled)
    _assert_lists_close(compiled, eager)
