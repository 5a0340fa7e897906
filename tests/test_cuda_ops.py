"""The compiled ops themselves: schemas, pieces at offsets, the split step, opcheck, torch.compile
and the ops' input checks.

The split step (moments_partials, then finalize_apply) must give fused_step's results bit for
bit, fill block_sums as its contract says (magma_ext/_ops.py, csrc/fused_step.cpp), and, with
the rows of blocks shared by several pieces summed in between (what an all-reduce across ranks
does), give the pieces of a tensor the step of the whole tensor.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from cuda_helpers import PARAM_TOL, STATE_TOL, requires_gpu, step_whole_and_ranks, whole_and_ranks
from cuda_helpers import clone_lists as _clone
from cuda_helpers import concat_lists as _concat
from cuda_helpers import new_block_sums as _new_block_sums
from cuda_helpers import op_lists as _lists
from cuda_helpers import pieces as _pieces
from cuda_helpers import rows_of as _rows
from magma_ext import _ops, has_cuda_extension
from magma_ext.fused import fused_step
from magma_ext.layout import BlockLayout
from magma_ext.reference import build_block_index, magma_step

try:
    from magma_ext.types import GroupTensors, Hyper
except ImportError:  # TODO: import from magma_ext.types only, once that module has landed
    from magma_ext.reference import GroupTensors, Hyper

OPS = ("fused_step", "moments_partials", "finalize_apply")
SPLIT_OPS = ("moments_partials", "finalize_apply")
LIST_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "scores", "master_params", "steps",
              "tensor_indices", "block_sizes", "offsets", "logical_numels")
HYPER_NAMES = ("lr", "beta1", "beta2", "eps", "weight_decay", "base", "mask", "keep_prob", "tau",
               "score_ema", "seed")
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, base="adam",
             mask="magma", keep_prob=0.5, tau=2.0, score_ema=0.9, seed=99)

# (logical_numel, cuts, block_size): pieces of one logical tensor cut at `cuts`.
PIECE_CASES = [
    pytest.param(30000, [9000, 12001], 300, id="single-and-two-pass"),  # [0, 9000) single pass
    pytest.param(10000, [2500, 7001], 10000, id="one-block-three-pieces"),
    pytest.param(70000, [1, 40000], 16385, id="blocks-over-a-chunk"),  # several items per block
    pytest.param(9000, [3000, 6000], 3000, id="whole-blocks"),  # the single-pass kernel only
    pytest.param(5000, [2222], 1, id="element-blocks"),
]


# ---------------------------------------------------------------------------- without a GPU


@pytest.mark.skipif(not has_cuda_extension(), reason="the CUDA extension is not built")
def test_extension_registers_its_ops_with_exact_mutations():
    written = {
        "fused_step": {"params", "exp_avgs", "exp_avg_sqs", "scores", "master_params"},
        "moments_partials": {"params", "exp_avgs", "exp_avg_sqs", "scores", "master_params", "block_sums"},
        "finalize_apply": {"params", "scores", "master_params"},
    }
    for op, expected in written.items():
        schema = getattr(torch.ops.magma_ext, op).default._schema
        names = [a.name for a in schema.arguments]
        assert names[:len(LIST_NAMES)] == list(LIST_NAMES), op
        assert names[-1] == ("found_inf" if op == "fused_step" else "block_sums"), op
        assert {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write} == expected, op
        types = {a.name: str(a.type) for a in schema.arguments}
        assert types["base"] == types["mask"] == "str", op
        assert not schema.returns, op


def test_wrappers_take_the_documented_arguments():
    keywords = [*HYPER_NAMES, "grad_scale", "found_inf"]
    for op in OPS:
        parameters = inspect.signature(getattr(_ops, op)).parameters.values()
        positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
        keyword_only = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY]
        assert positional == list(LIST_NAMES) + ([] if op == "fused_step" else ["block_sums"]), op
        assert keyword_only == keywords, op


def test_load_error_is_empty_exactly_when_loaded():
    assert (_ops.load_error() == "") == _ops.has_cuda_extension()


# ---------------------------------------------------------------------------- helpers


def _hyper(**changes):
    return Hyper(**{**HYPER, **changes})


def _split_step(t: GroupTensors, block_sums: torch.Tensor, **hyper) -> None:
    _ops.moments_partials(*_lists(t), block_sums, **hyper)
    _ops.finalize_apply(*_lists(t), block_sums, **hyper)


def _assert_lists_close(a: GroupTensors, b: GroupTensors):
    for name in ("params", "exp_avgs", "exp_avg_sqs", "scores", "steps"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            tol = PARAM_TOL[x.dtype] if name == "params" else STATE_TOL
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"{name}: {m}")


def _assert_lists_equal(a: GroupTensors, b: GroupTensors):
    for name in ("params", "exp_avgs", "exp_avg_sqs", "scores", "master_params"):
        for i, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name))):
            if x is not None:
                assert torch.equal(x, y), f"{name}[{i}] differs"


# ---------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("logical_numel, cuts, block_size", PIECE_CASES)
@pytest.mark.parametrize("mask", ["magma", "skip"])
@requires_gpu
def test_pieces_at_offsets_match_reference(logical_numel, cuts, block_size, mask):
    tensors = _pieces(logical_numel, cuts, block_size, tensor_index=5)
    expected = _clone(tensors)
    hyper = _hyper(mask=mask)
    fused_step(tensors, hyper)
    magma_step(expected, hyper, build_block_index(expected.layouts, expected.tensor_indices, "cuda"))
    _assert_lists_close(tensors, expected)


@pytest.mark.parametrize("mask", ["magma", "skip"])
@requires_gpu
def test_seed_above_2_to_the_63_matches_reference(mask):
    """The wrappers pass an unsigned seed's bits through the schema's int64."""
    tensors = _pieces(30000, [9000, 12001], 300, tensor_index=7)
    expected = _clone(tensors)
    hyper = _hyper(mask=mask, seed=2**64 - 99)
    fused_step(tensors, hyper)
    magma_step(expected, hyper, build_block_index(expected.layouts, expected.tensor_indices, "cuda"))
    _assert_lists_close(tensors, expected)


@pytest.mark.parametrize("tensor_index", [2**32 - 1, 2**32, 2**32 + 5, 2**61 + 12345, 2**62 - 1])
@pytest.mark.parametrize("mask", ["magma", "skip"])
@requires_gpu
def test_tensor_indices_of_names_match_reference(tensor_index, mask):
    """Indices of 32 bits and more (names' indices, docs/ALGORITHM.md section 4): the high bits
    reach the kernels' Philox offset as they reach the reference's."""
    tensors = _pieces(30000, [9000, 12001], 300, tensor_index=tensor_index)
    expected = _clone(tensors)
    hyper = _hyper(mask=mask)
    for _ in range(3):
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


# ---------------------------------------------------------------------------- the split step


def _expected_block_sums(t: GroupTensors, grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 rows (<m, g>, |m|^2, |g|^2) of every block of `t`, from its updated exp_avgs and
    its grads / grad_scale, and the sums of the terms' absolute values (the error scale)."""
    exact, magnitude = [], []
    for m, g, layout in zip(t.exp_avgs, t.grads, t.layouts):
        if layout.numel == 0:
            continue
        m64, g64 = m.double(), g.double() / grad_scale
        lengths = torch.tensor(layout.lengths(), device="cuda")
        block = torch.repeat_interleave(torch.arange(layout.num_blocks, device="cuda"), lengths)
        terms = torch.stack([m64 * g64, m64 * m64, g64 * g64], dim=1)
        sums = torch.zeros(layout.num_blocks, 3, dtype=torch.float64, device="cuda")
        exact.append(sums.index_add(0, block, terms))
        magnitude.append(torch.zeros_like(sums).index_add(0, block, terms.abs()))
    return torch.cat(exact), torch.cat(magnitude)


@pytest.mark.parametrize("logical_numel, cuts, block_size", PIECE_CASES)
@pytest.mark.parametrize("mask", ["magma", "skip", "none"])
@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["float32", "bfloat16-master"])
@requires_gpu
def test_split_step_equals_fused_step_bit_for_bit(logical_numel, cuts, block_size, mask, dtype, master):
    # The pieces of one tensor, then a second tensor whole (two passes: its block is > 8192),
    # so that rows of several tensors and launches of both kernels meet in one list.
    tensors = _concat(_pieces(logical_numel, cuts, block_size, tensor_index=5, dtype=dtype, master=master),
                      _pieces(20000, [], 20000, tensor_index=6, dtype=dtype, seed=1, master=master))
    split = _clone(tensors)
    hyper = dict(HYPER, mask=mask, grad_scale=torch.full((), 4.0, device="cuda"))  # 4: exact unscaling
    _ops.fused_step(*_lists(tensors), **hyper)
    block_sums = _new_block_sums(split, mask)
    _ops.moments_partials(*_lists(split), block_sums, **hyper)
    if mask == "magma":
        # The kernels add float32 products along chains of at most ~40 roundings (16 elements per
        # thread, 5 shuffle levels, up to 5 warp levels, then a few items per block in finalize),
        # each of relative error 2**-24: |error| <= 40 * 2**-24 * sum|terms| < 2.4e-6 * sum|terms|.
        # The float64 oracle is exact to far below that; 1e-5 leaves a margin of 4.
        exact, magnitude = _expected_block_sums(split, grad_scale=4.0)
        error = (block_sums.double() - exact).abs()
        assert block_sums.shape == (_rows(split), 3)
        assert bool((error <= 1e-5 * magnitude + 1e-30).all()), f"worst error {error.max().item()}"
    else:
        assert block_sums.shape == (0, 3)
    _ops.finalize_apply(*_lists(split), block_sums, **hyper)
    _assert_lists_equal(split, tensors)


@pytest.mark.parametrize("logical_numel, cuts, block_size", PIECE_CASES)
@pytest.mark.parametrize("mask", ["magma", "skip", "none"])
@requires_gpu
def test_pieces_with_summed_block_sums_match_the_whole_tensor(logical_numel, cuts, block_size, mask):
    """Each piece stepped as on its own rank, the rows of shared blocks summed in between (an
    all-reduce by hand), gives the step of the whole tensor."""
    whole, ranks = whole_and_ranks(logical_numel, cuts, block_size, tensor_index=3)
    step_whole_and_ranks(whole, ranks, dict(HYPER, mask=mask))

    for name in ("params", "exp_avgs", "exp_avg_sqs"):
        joined = torch.cat([getattr(rank, name)[0] for rank in ranks])
        torch.testing.assert_close(joined, getattr(whole, name)[0], **STATE_TOL, msg=lambda m: f"{name}: {m}")
    for rank in ranks:
        first = rank.layouts[0].first_block
        expected = whole.scores[0][first:first + rank.layouts[0].num_blocks]
        torch.testing.assert_close(rank.scores[0], expected, **STATE_TOL)
    for left, right in zip(ranks, ranks[1:]):  # a block shared by two pieces: the same score
        last = (left.layouts[0].offset + left.layouts[0].numel - 1) // block_size
        if last == right.layouts[0].first_block:
            assert torch.equal(left.scores[0][-1], right.scores[0][0])


@requires_gpu
def test_found_inf_skips_every_op():
    tensors = _pieces(30000, [9000, 12001], 300, tensor_index=1)
    before = _clone(tensors)
    hyper = dict(HYPER, found_inf=torch.ones((), device="cuda"))
    block_sums = torch.full((_rows(tensors), 3), 7.0, device="cuda")
    _ops.fused_step(*_lists(tensors), **hyper)
    _split_step(tensors, block_sums, **hyper)
    _assert_lists_equal(tensors, before)
    assert bool((block_sums == 7.0).all())


# ---------------------------------------------------------------------------- opcheck and compile


def _op_args(op: str, tensors: GroupTensors, mask: str, block_sums=None) -> tuple:
    """Positional arguments of torch.ops.magma_ext.<op> in schema order."""
    scalars = (1e-2, None, 0.9, 0.999, 1e-8, 0.1, "adam", mask, 0.5, 2.0, 0.9, 3, None, None)
    return _lists(tensors) + scalars + (() if op == "fused_step" else (block_sums,))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mask", ["magma", "skip", "none"])
@requires_gpu
def test_opcheck(op, mask):
    # Pieces at odd offsets: [0, 9000) takes the single-pass kernel, the others two passes.
    tensors = _pieces(20000, [9000, 12001], 300, tensor_index=1)
    block_sums = None
    if op != "fused_step":
        block_sums = _new_block_sums(tensors, mask)
        if mask == "magma":  # realistic sums for finalize_apply: those of this very step
            _ops.moments_partials(*_lists(_clone(tensors)), block_sums, **dict(HYPER, mask=mask))
    torch.library.opcheck(getattr(torch.ops.magma_ext, op).default, _op_args(op, tensors, mask, block_sums))


@requires_gpu
def test_torch_compile_fullgraph_fused_step_matches_eager():
    eager = _pieces(20000, [9000], 5000, tensor_index=2)
    compiled = _clone(eager)

    def step(t: GroupTensors):
        _ops.fused_step(*_lists(t), **HYPER)

    step(eager)
    torch.compile(step, fullgraph=True)(compiled)
    _assert_lists_close(compiled, eager)


@requires_gpu
def test_torch_compile_fullgraph_split_step_matches_eager():
    eager = _pieces(30000, [9000, 12001], 300, tensor_index=2)
    compiled = _clone(eager)
    rows = _rows(eager)

    def step(t: GroupTensors, lr: torch.Tensor):
        block_sums = torch.empty((rows, 3), device="cuda")
        _ops.moments_partials(*_lists(t), block_sums, **dict(HYPER, lr=lr))
        block_sums.mul_(1.0)  # where an all-reduce would go
        _ops.finalize_apply(*_lists(t), block_sums, **dict(HYPER, lr=lr))

    lr = torch.full((), 1e-2, device="cuda")
    step(eager, lr)
    torch.compile(step, fullgraph=True)(compiled, lr)
    _assert_lists_close(compiled, eager)


# ---------------------------------------------------------------------------- input checks


def _valid_args(op: str) -> dict:
    """Valid arguments of `op` by name (mask "magma"): pieces of both kernels, block_sums."""
    tensors = _pieces(20000, [9000, 12001], 300, tensor_index=1)
    args = dict(zip(LIST_NAMES, _lists(tensors)), **HYPER, grad_scale=None, found_inf=None)
    if op != "fused_step":
        args["block_sums"] = _new_block_sums(tensors, "magma")
    return args


def _call(op: str, args: dict) -> None:
    positional = [args[name] for name in LIST_NAMES]
    if op != "fused_step":
        positional.append(args["block_sums"])
    keywords = {name: args[name] for name in (*HYPER_NAMES, "grad_scale", "found_inf")}
    getattr(_ops, op)(*positional, **keywords)


def _item(name: str, i: int, change):
    """Mutation: entry i of list `name` becomes change(entry)."""
    def mutate(args):
        items = list(args[name])
        items[i] = change(items[i])
        args[name] = items
    return mutate


def _set(name: str, value):
    """Mutation: argument `name` becomes value(args) (or value, if not callable)."""
    def mutate(args):
        args[name] = value(args) if callable(value) else value
    return mutate


def _with_masters(mutation=None):
    """Mutation: float32 master weights for every piece, then `mutation`."""
    def mutate(args):
        args["master_params"] = [p.clone() for p in args["params"]]
        if mutation is not None:
            mutation(args)
    return mutate


def _strided(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous tensor of t's numel, dtype and device."""
    return t.new_empty(2 * t.numel())[::2]


def _state_rows(name: str, numel_1: int):
    """Wrong device, dtype, contiguity and numel of entry 1 of state list `name`."""
    wrap = _with_masters if name == "master_params" else (lambda m: m)
    rows = [
        pytest.param(wrap(_item(name, 1, lambda t: t.cpu())), RuntimeError,
                     rf"{name}\[1\] is on cpu", id=f"{name}-device"),
        pytest.param(wrap(_item(name, 1, lambda t: t.double())), RuntimeError,
                     rf"{name}\[1\] must be float32", id=f"{name}-dtype"),
        pytest.param(wrap(_item(name, 1, lambda t: torch.cat([t.reshape(-1), t.reshape(-1)[:1]]))), RuntimeError,
                     rf"{name}\[1\] has {numel_1 + 1} elements, expected {numel_1}", id=f"{name}-numel"),
    ]
    if numel_1 > 1:  # a one-element tensor is contiguous whatever its stride
        rows.append(pytest.param(wrap(_item(name, 1, _strided)), RuntimeError,
                                 rf"{name}\[1\] must be contiguous", id=f"{name}-contiguity"))
    return rows


# Piece 1 is [9000, 12001) of 20000 elements in blocks of 300: 3001 elements, 11 blocks.
ERROR_CASES = [
    pytest.param(_set("grads", lambda a: a["grads"][:-1]), RuntimeError,
                 r"must have the same length", id="list-lengths"),
    pytest.param(_set("tensor_indices", lambda a: a["tensor_indices"] + [1]), RuntimeError,
                 r"must have the same length", id="index-list-length"),
    pytest.param(_set("master_params", lambda a: [a["params"][0].clone()]), RuntimeError,
                 r"master_params must be empty or as long as params", id="master-list-length"),
    *_state_rows("exp_avgs", 3001),
    *_state_rows("exp_avg_sqs", 3001),
    *_state_rows("scores", 11),
    *_state_rows("master_params", 3001),
    *_state_rows("steps", 1),
    pytest.param(_item("params", 1, lambda t: t.cpu()), RuntimeError, r"params\[1\] is on cpu", id="params-device"),
    pytest.param(_item("params", 1, lambda t: t.double()), RuntimeError, r"params must share one dtype",
                 id="params-dtype"),
    pytest.param(_item("params", 1, _strided), RuntimeError, r"params\[1\] must be contiguous",
                 id="params-contiguity"),
    pytest.param(_item("grads", 1, lambda t: t[:-1]), RuntimeError,
                 r"grads\[1\] must be a contiguous tensor like params\[1\]", id="grads-numel"),
    pytest.param(_item("grads", 1, lambda t: t.half()), RuntimeError, r"grads must share one dtype",
                 id="grads-dtype"),
    pytest.param(_set("base", "adamw"), RuntimeError,
                 re.escape("base must be 'adam', 'rmsprop' or 'laprop', got 'adamw'"), id="bad-base"),
    pytest.param(_set("mask", "dense"), RuntimeError,
                 re.escape("mask must be 'magma', 'skip' or 'none', got 'dense'"), id="bad-mask"),
    pytest.param(_set("keep_prob", 1.5), RuntimeError, r"keep_prob must be in \[0, 1\]", id="keep-prob-high"),
    pytest.param(_set("keep_prob", -0.25), RuntimeError, r"keep_prob must be in \[0, 1\]", id="keep-prob-low"),
    pytest.param(_item("logical_numels", 2, lambda n: n - 1), RuntimeError,
                 r"piece 2 lies outside its logical tensor", id="piece-past-the-end"),
    pytest.param(_item("offsets", 0, lambda n: -1), RuntimeError,
                 r"piece 0 lies outside its logical tensor", id="piece-before-the-start"),
    pytest.param(_item("block_sizes", 0, lambda n: 0), RuntimeError, r"block_sizes\[0\] must be >= 1",
                 id="block-size-0"),
    pytest.param(_item("tensor_indices", 0, lambda n: 2**62), RuntimeError,
                 r"tensor_indices\[0\] must be in \[0, 2\*\*62\)", id="tensor-index-2**62"),
    pytest.param(_item("tensor_indices", 0, lambda n: -1), RuntimeError,
                 r"tensor_indices\[0\] must be in \[0, 2\*\*62\)", id="tensor-index-negative"),
    pytest.param(_set("grad_scale", lambda a: torch.ones(2, device="cuda")), RuntimeError,
                 r"grad_scale must be a one-element float32 tensor", id="grad-scale-shape"),
    pytest.param(_set("found_inf", lambda a: torch.zeros(2, device="cuda")), RuntimeError,
                 r"found_inf must be a one-element float32 tensor", id="found-inf-shape"),
    pytest.param(_set("found_inf", lambda a: torch.zeros((), device="cuda", dtype=torch.float64)),
                 RuntimeError, r"found_inf must be a one-element float32 tensor", id="found-inf-dtype"),
    pytest.param(_set("lr", lambda a: torch.full((2,), 1e-3, device="cuda")), RuntimeError,
                 r"lr must be a one-element float32 tensor", id="lr-tensor-shape"),
]

# Mutations of the valid block_sums (mask "magma": 30 + 11 + 27 = 68 rows).
BLOCK_SUMS_CASES = [
    pytest.param(lambda a: a.update(block_sums=a["block_sums"][:-1]), id="rows-short"),
    pytest.param(lambda a: a.update(block_sums=torch.empty(a["block_sums"].shape[0], 4, device="cuda")),
                 id="four-columns"),
    pytest.param(lambda a: a.update(block_sums=a["block_sums"].reshape(-1)), id="flat"),
    pytest.param(lambda a: a.update(block_sums=a["block_sums"].double()), id="float64"),
    pytest.param(lambda a: a.update(block_sums=torch.empty(3, a["block_sums"].shape[0], device="cuda").t()),
                 id="not-contiguous"),
    pytest.param(lambda a: a.update(block_sums=a["block_sums"].cpu()), id="cpu"),
]


@pytest.mark.parametrize("mutation, error, message", ERROR_CASES)
@pytest.mark.parametrize("op", OPS)
@requires_gpu
def test_op_rejects_bad_inputs(op, mutation, error, message):
    args = _valid_args(op)
    _call(op, dict(args))  # the valid arguments pass
    mutation(args)
    with pytest.raises(error, match=rf"magma_ext\.{op}: .*{message}"):
        _call(op, args)


@pytest.mark.parametrize("mutation", BLOCK_SUMS_CASES)
@pytest.mark.parametrize("op", SPLIT_OPS)
@requires_gpu
def test_split_ops_reject_block_sums_of_the_wrong_shape(op, mutation):
    args = _valid_args(op)
    rows = args["block_sums"].shape[0]
    mutation(args)
    message = rf"magma_ext\.{op}: block_sums must be a contiguous float32 tensor of shape \({rows}, 3\)"
    with pytest.raises(RuntimeError, match=message):
        _call(op, args)
