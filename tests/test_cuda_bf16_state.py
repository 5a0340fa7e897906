"""Moments stored in bfloat16 on the fused CUDA path, against the PyTorch reference
(docs/ALGORITHM.md section 6).

The rule: the kernels round a float32 moment with the same word of the same rounding stream as
the reference, so they store what the reference stores wherever their float32 values agree bit
for bit.  Where the float32 values differ (another rounding, or cancellation in
beta1 * m + (1 - beta1) * g, where the two differ by an ulp of the terms, not of the result),
the stored values differ by that difference and one bfloat16 ulp at most.  Each comparison
starts both paths from the same state, so one step's differences are measured (a difference
would otherwise decay through the betas and show up again, smaller, at every later step).  The
measured rates are printed: run this file with ``-s`` to see them.
"""

from __future__ import annotations

import pytest
import torch

from cuda_helpers import (
    PARAM_TOL, SHAPES, STATE_TOL, CapturedStep, clone_lists, concat_lists, feed_same_grads, new_block_sums,
    op_lists, params_of, pieces, requires_gpu, step_whole_and_ranks, twins, whole_and_ranks,
)
from magma_ext import Magma, _ops, rounding
from magma_ext.layout import BlockLayout
from magma_ext.rounding import EXP_AVG, EXP_AVG_SQ

pytestmark = requires_gpu

BF16 = dict(exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16)
STATE_DTYPES = {
    "bf16-bf16": BF16,
    "f32-bf16": dict(exp_avg_sq_dtype=torch.bfloat16),
    "bf16-f32": dict(exp_avg_dtype=torch.bfloat16),
}
MOMENTS = (("exp_avg", EXP_AVG), ("exp_avg_sq", EXP_AVG_SQ))
BASES = ["adam", "rmsprop", "laprop"]
MASKS = ["magma", "skip", "none"]
BLOCKS = ["tensor", "row", 7, 3000]
PARAM_DTYPES = {"f32": (torch.float32, False), "bf16_master": (torch.bfloat16, True)}
LR = 1e-2
SEED = 12345  # Magma's seed where the test builds the optimizers (twins() takes a params seed)
OPTIONS = dict(lr=LR, weight_decay=0.1)
HYPER = dict(lr=LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, base="adam", mask="magma",
             keep_prob=0.5, tau=2.0, score_ema=0.9, seed=SEED)
# A score is formed from float32 sums of the stored moments: where one element's stored m is a
# bfloat16 ulp (2**-8 relative) off, a block of b elements moves its cosine by about 2**-8 / b
# and the score by a tenth of a quarter of that (score_ema 0.9, sigmoid'/tau <= 1/8): below
# 1e-4 of a score of about 0.5 for the 7-element blocks, far below for larger ones.
SCORE_TOL = dict(rtol=1e-4, atol=1e-6)
# An element whose stored moment is a bfloat16 ulp off takes an update up to 2**-7 off; the
# updates here are below 4 lr (|m / sqrt(v)| of about 1, weight decay 0.1 on weights of about 3).
PARAM_ATOL_WHERE_MOMENTS_DIFFER = 4 * LR * 2**-7


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element, how many bfloat16 steps separate a and b (bfloat16 tensors): 0 when equal."""
    def ordered(x):
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits >= 0, bits, -(bits & 0x7FFF))
    return (ordered(a) - ordered(b)).abs()


# Two stored moments rounded with the same random numbers from float32 values within STATE_TOL
# of each other are within that and one bfloat16 ulp (at most 2**-7 of the value) of each other.
STORED_TOL = dict(rtol=STATE_TOL["rtol"] + 2**-7, atol=STATE_TOL["atol"])


def assert_stored_close(a: torch.Tensor, b: torch.Tensor, msg: str) -> None:
    torch.testing.assert_close(a.float(), b.float(), **STORED_TOL, msg=lambda m: f"{msg}: {m}")


def state_of(optimizer, key):
    return [optimizer.state[p][key] for p in params_of(optimizer)]


def copy_state(source, target):
    """Give ``target`` the parameters and state of ``source`` (none yet: its first state)."""
    target.init_state()
    with torch.no_grad():
        for p, q in zip(params_of(source), params_of(target)):
            q.copy_(p)
            for key, value in source.state[p].items():
                if isinstance(value, torch.Tensor):
                    target.state[q][key].copy_(value)


def optimizer_over(shapes, dtype, master, fused, **options):
    params = [torch.zeros(s, device="cuda", dtype=dtype, requires_grad=True) for s in shapes]
    optimizer = Magma(params, fused=fused, master_weights=master, seed=SEED, **OPTIONS, **options)
    optimizer.init_state()
    return optimizer


def common_state(optimizer, seed=0, step=7.0):
    """Random parameters and bfloat16-exact moments (so any state dtype holds them exactly)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in params_of(optimizer):
            state = optimizer.state[p]
            p.copy_(torch.randn(p.shape, device="cuda", generator=generator) * 3)
            if "master_param" in state:
                state["master_param"].copy_(p)
            m = torch.randn(p.shape, device="cuda", generator=generator) * 0.1
            v = torch.rand(p.shape, device="cuda", generator=generator) * 0.01
            state["exp_avg"].copy_(m.to(torch.bfloat16))
            state["exp_avg_sq"].copy_(v.to(torch.bfloat16))
            state["step"].fill_(step)


# ---------------------------------------------------------------------------- one step, the rule


@pytest.mark.parametrize("state_dtypes", list(STATE_DTYPES))
@pytest.mark.parametrize("dtype_name", list(PARAM_DTYPES))
@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("base", BASES)
def test_kernels_round_the_float32_value_the_reference_rounds(base, mask, block, dtype_name, state_dtypes):
    """From one state, one step of four optimizers: kernels and reference, float32 and bfloat16
    moments.  Each path's stored moments are its float32 moments rounded with the Python
    rounding stream, bit for bit; the two paths' float32 moments agree within STATE_TOL, so
    their stored ones are equal wherever the float32 ones are."""
    dtype, master = PARAM_DTYPES[dtype_name]
    options = dict(base=base, mask=mask, block=block)
    narrow = STATE_DTYPES[state_dtypes]
    runs = {(fused, name): optimizer_over(SHAPES, dtype, master, fused, **options, **dtypes)
            for fused in (True, False) for name, dtypes in (("f32", {}), ("bf16", narrow))}
    for optimizer in runs.values():
        common_state(optimizer)
    generator = torch.Generator(device="cuda").manual_seed(77)
    grads = [torch.randn(s, device="cuda", generator=generator).to(dtype) for s in SHAPES]
    for optimizer in runs.values():
        for p, g in zip(params_of(optimizer), grads):
            p.grad = g.clone()
        optimizer.step()
    differ = {"float32": 0, "stored": 0, "elements": 0}
    for key, moment in MOMENTS:
        if runs[(True, "bf16")].state[params_of(runs[(True, "bf16")])[0]][key].dtype != torch.bfloat16:
            continue
        if base == "laprop" and key == "exp_avg":
            continue  # LaProp's m reads the stored v: the float32 runs computed another m
        for k32, r32, k16, r16, p in zip(*(state_of(runs[run], key) for run in
                                           ((True, "f32"), (False, "f32"), (True, "bf16"), (False, "bf16"))),
                                         params_of(runs[(True, "bf16")])):
            index = runs[(True, "bf16")].state[p]["magma_tensor_index"]
            step = runs[(True, "bf16")].state[p]["step"]
            for stored, exact, who in ((k16, k32, "kernels'"), (r16, r32, "reference's")):
                expected = rounding.round_moment(exact, moment, SEED, index, 0, step).to(torch.bfloat16)
                assert torch.equal(stored.view(torch.int16), expected.view(torch.int16)), \
                    f"{key}: the {who} stored moments are not their float32 ones rounded by the stream"
            torch.testing.assert_close(k32, r32, **STATE_TOL, msg=lambda m: f"{key} in float32: {m}")
            same32 = k32.view(torch.int32) == r32.view(torch.int32)
            assert torch.equal(k16[same32].view(torch.int16), r16[same32].view(torch.int16)), key
            differ["float32"] += int((~same32).sum())
            differ["stored"] += int((k16.view(torch.int16) != r16.view(torch.int16)).sum())
            differ["elements"] += k16.numel()
    print(f"rounding agreement {base}/{mask}/{block}/{dtype_name}/{state_dtypes}: float32 moments differ "
          f"at {differ['float32']} of {differ['elements']}, stored bfloat16 at {differ['stored']}")


# ---------------------------------------------------------------------------- step after step


def one_step_agrees(fused, reference, step):
    """Copy the fused run's state into the reference, step both on the same grads, compare: the
    moments within STORED_TOL, the scores within SCORE_TOL, the parameters within PARAM_TOL
    wherever both moments agree.  Returns (differing stored moments, moments)."""
    copy_state(fused, reference)
    feed_same_grads(fused, reference, step)
    fused.step()
    reference.step()
    differing = total = 0
    for p, q in zip(params_of(fused), params_of(reference)):
        fs, rs = fused.state[p], reference.state[q]
        agree = torch.ones(p.shape, dtype=torch.bool, device="cuda")
        for key, _ in MOMENTS:
            if fs[key].dtype == torch.bfloat16:
                apart = ulps_apart(fs[key], rs[key])
                assert_stored_close(fs[key], rs[key], f"step {step}: {key}")
                agree &= apart == 0
                differing += int((apart > 0).sum())
                total += apart.numel()
            else:
                torch.testing.assert_close(fs[key], rs[key], **STATE_TOL)
        torch.testing.assert_close(fs["magma_score"], rs["magma_score"], **SCORE_TOL)
        torch.testing.assert_close(p[agree], q[agree], **PARAM_TOL[p.dtype])
        torch.testing.assert_close(p[~agree].float(), q[~agree].float(), rtol=PARAM_TOL[p.dtype]["rtol"],
                                   atol=PARAM_ATOL_WHERE_MOMENTS_DIFFER)
    return differing, total


@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("base", BASES)
def test_fused_follows_the_reference_step_after_step(base, mask, block):
    fused, reference = twins(SHAPES, base=base, mask=mask, block=block, **OPTIONS, **BF16)
    differing = total = 0
    for step in range(12):
        d, t = one_step_agrees(fused, reference, step)
        differing, total = differing + d, total + t
    assert differing <= max(0.001 * total, 8), f"{differing} of {total} stored moments differ"
    print(f"step after step {base}/{mask}/{block}: {differing} of {total} stored moments one ulp apart")


def test_many_tensors_fill_several_launches():
    generator = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 3000, (1100,), generator=generator).tolist()
    shapes = [(n,) for n in sizes] + [(40, 50)] * 20 + [(70000,)] + [(9001,)] * 300
    for block in ("tensor", "row"):
        fused, reference = twins(shapes, block=block, **OPTIONS, **BF16)
        for step in range(2):
            one_step_agrees(fused, reference, step)


def test_float32_grads_on_bfloat16_params_with_master_weights():
    fused, reference = twins(SHAPES, torch.bfloat16, master_weights=True, block="row", **OPTIONS, **BF16)
    for step in range(3):
        copy_state(fused, reference)
        feed_same_grads(fused, reference, step, grad_dtype=torch.float32)
        fused.step()
        reference.step()
        for key, _ in MOMENTS:
            for a, b in zip(state_of(fused, key), state_of(reference, key)):
                assert_stored_close(a, b, f"step {step}: {key}")


def test_state_is_bfloat16_and_steps_are_deterministic():
    runs = []
    for _ in range(2):
        fused, _ = twins([(4097,), (3, 9000), (300, 40)], block="row", **OPTIONS, **BF16)
        for step in range(5):
            feed_same_grads(fused, _, step)
            fused.step()
        runs.append([v for p in params_of(fused) for v in fused.state[p].values() if isinstance(v, torch.Tensor)])
    assert all(s.dtype == torch.bfloat16 for s in state_of(fused, "exp_avg") + state_of(fused, "exp_avg_sq"))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- pieces and the split ops

# (logical_numel, cuts, block_size): pieces of one logical tensor, odd offsets included.
PIECE_CASES = [
    pytest.param(30000, [9000, 12001], 300, id="single-and-two-pass"),
    pytest.param(70000, [1, 40000], 16385, id="blocks-over-a-chunk"),
    pytest.param(5000, [2222], 1, id="element-blocks"),
]


def _step_whole_and_pieces(logical_numel, cuts, block_size, mask, state_dtypes):
    whole, ranks = whole_and_ranks(logical_numel, cuts, block_size, tensor_index=3, state_dtypes=state_dtypes)
    step_whole_and_ranks(whole, ranks, dict(HYPER, mask=mask))
    return whole, ranks


@pytest.mark.parametrize("logical_numel, cuts, block_size", PIECE_CASES)
@pytest.mark.parametrize("mask", MASKS)
def test_pieces_round_as_the_whole_tensor(logical_numel, cuts, block_size, mask):
    """Pieces stepped as on their own ranks store the whole tensor's moments, bit for bit wherever
    their float32 moments are the whole tensor's (the stream is keyed by each element's index in
    the logical tensor; a piece may take another kernel than the whole tensor)."""
    runs = {dtype: _step_whole_and_pieces(logical_numel, cuts, block_size, mask, (dtype, dtype))
            for dtype in (torch.float32, torch.bfloat16)}
    for name in ("exp_avgs", "exp_avg_sqs"):
        joined32, joined16 = (torch.cat([getattr(part, name)[0] for part in runs[dtype][1]])
                              for dtype in (torch.float32, torch.bfloat16))
        whole32, whole16 = (getattr(runs[dtype][0], name)[0] for dtype in (torch.float32, torch.bfloat16))
        same32 = joined32.view(torch.int32) == whole32.view(torch.int32)
        assert torch.equal(joined16[same32].view(torch.int16), whole16[same32].view(torch.int16)), name
        assert_stored_close(joined16, whole16, name)
        print(f"pieces {logical_numel}/{cuts}/{block_size}/{mask} {name}: float32 differ at "
              f"{int((~same32).sum())} of {same32.numel()}")
    joined = torch.cat([part.params[0] for part in runs[torch.bfloat16][1]])
    torch.testing.assert_close(joined, runs[torch.bfloat16][0].params[0], rtol=PARAM_TOL[torch.float32]["rtol"],
                               atol=PARAM_ATOL_WHERE_MOMENTS_DIFFER)


@pytest.mark.parametrize("state_dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                          (torch.bfloat16, torch.float32)], ids=["bf16-bf16", "f32-bf16", "bf16-f32"])
@pytest.mark.parametrize("logical_numel, cuts, block_size", PIECE_CASES)
@pytest.mark.parametrize("mask", MASKS)
def test_split_step_equals_fused_step_bit_for_bit(logical_numel, cuts, block_size, mask, state_dtypes):
    tensors = concat_lists(pieces(logical_numel, cuts, block_size, tensor_index=5, state_dtypes=state_dtypes),
                           pieces(20000, [], 20000, tensor_index=6, seed=1, state_dtypes=state_dtypes))
    split = clone_lists(tensors)
    hyper = dict(HYPER, mask=mask)
    _ops.fused_step(*op_lists(tensors), **hyper)
    block_sums = new_block_sums(split, mask)
    _ops.moments_partials(*op_lists(split), block_sums, **hyper)
    _ops.finalize_apply(*op_lists(split), block_sums, **hyper)
    for name in ("params", "exp_avgs", "exp_avg_sqs", "scores"):
        for i, (a, b) in enumerate(zip(getattr(split, name), getattr(tensors, name))):
            assert torch.equal(a, b), f"{name}[{i}]"


# (mask, block size, offset): pieces far into a logical tensor of 2**36 elements, through the
# one-pass kernel at odd offsets and the single-pass block kernel at block-aligned ones.
STREAM_CASES = [
    ("none", 2**36, 0), ("none", 2**36, 3), ("none", 2**36, 2**34 + 1), ("none", 2**36, 2**36 - 20000),
    ("magma", 2000, 0), ("magma", 2000, 2000 * 8589935), ("magma", 30000, 30000 * 2290000 + 7),
]


@pytest.mark.parametrize("tensor_index", [5, 2**32 + 5, 2**62 - 1])
@pytest.mark.parametrize("mask, block_size, offset", STREAM_CASES)
def test_kernel_stream_at_large_indices_and_offsets_is_the_python_stream(tensor_index, mask, block_size, offset):
    """A piece far into a large logical tensor, rounded by the kernels: its bfloat16 moments are
    its float32 ones (from the same kernels) rounded with the Python stream at its offset."""
    layout = BlockLayout(numel=20000, block_size=block_size, offset=offset, logical_numel=2**36)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        t = pieces(20000, [], 20000, tensor_index=tensor_index, seed=4, state_dtypes=(dtype, dtype))
        t.layouts[0] = layout
        t.scores[0] = torch.full((layout.num_blocks,), 0.5, device="cuda")
        t.exp_avgs[0] = t.exp_avgs[0].to(torch.bfloat16).to(dtype)
        t.exp_avg_sqs[0] = t.exp_avg_sqs[0].to(torch.bfloat16).to(dtype)
        _ops.fused_step(*op_lists(t), **dict(HYPER, mask=mask))
        results[dtype] = t
    for name, moment in (("exp_avgs", EXP_AVG), ("exp_avg_sqs", EXP_AVG_SQ)):
        exact = getattr(results[torch.float32], name)[0]
        stored = getattr(results[torch.bfloat16], name)[0]
        expected = rounding.round_moment(exact, moment, SEED, tensor_index, offset,
                                         results[torch.float32].steps[0]).to(torch.bfloat16)
        assert torch.equal(stored.view(torch.int16), expected.view(torch.int16)), name


# ---------------------------------------------------------------------------- graphs, syncs, skips


def test_cuda_graph_capture_with_bfloat16_state():
    shapes = [(257,), (33, 65), (5000,), (3, 9000)]
    fused, _ = twins(shapes, lr=torch.tensor(LR, device="cuda"), capturable=True, block="row", weight_decay=0.1,
                     **BF16)
    feed_same_grads(fused, _, 0)
    fused.step()
    captured = CapturedStep(fused)
    eager = Magma([p.detach().clone().requires_grad_() for p in params_of(fused)], fused=True, lr=LR,
                  weight_decay=0.1, block="row", **BF16)
    copy_state(fused, eager)
    for step in range(1, 6):
        feed_same_grads(fused, eager, step)
        captured.replay()
        eager.step()
    for p, q in zip(params_of(fused), params_of(eager)):  # replays are the eager steps, bit for bit
        assert torch.equal(p, q)
        for key, value in fused.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, eager.state[q][key]), key


def test_found_inf_leaves_bfloat16_state_untouched():
    fused, _ = twins([(33, 257), (16385,)], block="row", **OPTIONS, **BF16)
    feed_same_grads(fused, _, 0)
    fused.step()
    before = [v.clone() for p in params_of(fused) for v in fused.state[p].values() if isinstance(v, torch.Tensor)]
    fused.found_inf = torch.ones((), device="cuda")
    fused.step()
    after = [v for p in params_of(fused) for v in fused.state[p].values() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------------------- the ops refuse


def _valid(state_dtypes=(torch.bfloat16, torch.bfloat16)):
    return pieces(20000, [9000, 12001], 300, tensor_index=1, state_dtypes=state_dtypes)



@pytest.mark.parametrize("change, message", [
    pytest.param(lambda t: t.exp_avgs.__setitem__(1, t.exp_avgs[1].float()), r"exp_avgs must share one dtype",
                 id="mixed-exp_avgs"),
    pytest.param(lambda t: t.exp_avg_sqs.__setitem__(0, t.exp_avg_sqs[0].half()),
                 r"exp_avg_sqs\[0\] must be float32 or bfloat16, got Half", id="float16-exp_avg_sqs"),
    pytest.param(lambda t: t.layouts.__setitem__(0, BlockLayout(numel=9000, block_size=300, offset=0,
                                                                 logical_numel=20000, sliced=True)),
                 r"piece 0 is a piece of a column slice", id="column-slice"),
])
def test_ops_refuse_bad_bfloat16_moments(change, message):
    t = _valid()
    change(t)
    lists = list(op_lists(t))
    if t.layouts[0].sliced:
        lists[10] = [-n if layout.sliced else n for n, layout in zip(lists[10], t.layouts)]
    for op in ("fused_step", "moments_partials"):
        extra = () if op == "fused_step" else (new_block_sums(t, "magma"),)
        with pytest.raises(RuntimeError, match=rf"magma_ext\.{op}: .*{message}"):
            getattr(_ops, op)(*lists, *extra, **HYPER)
