"""Moments stored in bfloat16 (docs/ALGORITHM.md section 6) on the PyTorch path, on the CPU.

The rounding stream bit for bit (against Philox4x32-10 of the documented counter) and its
independence of how a tensor is cut into pieces; stochastic rounding statistically; the step
reading its moments as stored; the constant-gradient run in which round-to-nearest stalls the
second moment and stochastic rounding follows the float32 one; checkpoints between float32 and
bfloat16 state; sharded runs (gloo) against one process.
"""

from __future__ import annotations

import io

import pytest
import torch

import float64_magma as oracle
import sharded_cases as cases
from distributed_helpers import run_ranks
from helpers import assert_bitwise_equal, assert_snapshots_equal, snapshot
from magma_ext import Magma, declare_piece, rounding
from magma_ext.rounding import EXP_AVG, EXP_AVG_SQ, ROUNDING_KEY

BF16 = dict(exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16)
STATE_DTYPES = {
    "bf16-bf16": BF16,
    "f32-bf16": dict(exp_avg_sq_dtype=torch.bfloat16),
    "bf16-f32": dict(exp_avg_dtype=torch.bfloat16),
}


def _step_tensor(t: int) -> torch.Tensor:
    return torch.tensor(float(t))


# ---------------------------------------------------------------------------- the rounding stream


@pytest.mark.parametrize("seed,tensor_index,offset,step", [
    (0, 0, 0, 1),
    (12345, 7, 3, 200),
    (2**64 - 1, 2**33 + 5, 2**34 + 1, 2**31),  # high words of index and quad, seed's top bit
    (99, 2**62 - 1, 4 * (2**34 - 1), 4096),  # the last quad the counter holds
])
def test_rounding_words_are_philox_of_the_documented_counter(seed, tensor_index, offset, step):
    words = rounding.rounding_words(seed, tensor_index, offset, 9, _step_tensor(step))
    key = seed ^ ROUNDING_KEY
    for k in range(9):
        e = offset + k
        q = e >> 2
        counter = (step % 2**32, q % 2**32, tensor_index % 2**32, (tensor_index >> 32) | ((q >> 32) << 30))
        expected = oracle.philox4x32_10(counter, (key % 2**32, key >> 32))[e & 3]
        assert int(words[k]) == expected, f"element {e}"


def test_rounding_words_of_a_piece_are_those_of_the_whole_tensor():
    whole = rounding.rounding_words(5, 11, 0, 1000, _step_tensor(9))
    for offset, numel in [(0, 1), (1, 7), (3, 250), (998, 2), (517, 0)]:
        piece = rounding.rounding_words(5, 11, offset, numel, _step_tensor(9))
        assert torch.equal(piece, whole[offset:offset + numel]), (offset, numel)


def test_rounding_stream_differs_by_step_index_seed_and_has_its_own_key():
    base = rounding.rounding_words(5, 11, 0, 64, _step_tensor(9))
    for other in (rounding.rounding_words(5, 11, 0, 64, _step_tensor(10)),
                  rounding.rounding_words(5, 12, 0, 64, _step_tensor(9)),
                  rounding.rounding_words(6, 11, 0, 64, _step_tensor(9))):
        assert (other != base).float().mean() > 0.9
    assert base.min() >= 0 and base.max() < 2**32


def test_stochastic_round_picks_a_neighbour_and_keeps_representable_values():
    values = torch.randn(10000) * 10 ** torch.randint(-6, 6, (10000,)).float()
    noise = torch.randint(0, 2**16, (10000,))
    rounded = rounding.stochastic_round(values, noise)
    down = values.view(torch.int32).bitwise_and(-65536).view(torch.float32)
    up = (values.view(torch.int32).bitwise_and(-65536) + 65536).view(torch.float32)
    assert torch.equal(rounded, rounded.to(torch.bfloat16).float())  # bfloat16 values
    assert ((rounded == down) | (rounded == up)).all()
    exact = values.to(torch.bfloat16).float()
    assert torch.equal(rounding.stochastic_round(exact, noise), exact)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
    out = rounding.stochastic_round(special, torch.full((5,), 65535))
    assert torch.equal(out[:2], special[:2]) and out[2].isnan() and torch.equal(out[3:].view(torch.int32),
                                                                                 special[3:].view(torch.int32))


@pytest.mark.parametrize("moment", [EXP_AVG, EXP_AVG_SQ])
def test_stochastic_rounding_is_unbiased_over_100k_draws(moment):
    # 100k elements of one value each, rounded with the stream's words (as torchao tests its
    # rounding): the mean matches the value to a few standard errors of one bfloat16 ulp.
    for value in (1.0 + 2**-9, -3.3, 0.7 + 2**-10, 1e-3):
        values = torch.full((100_000,), value)
        rounded = rounding.round_moment(values, moment, 7, 3, 12, _step_tensor(5)).double()
        ulp = 2.0 ** (torch.tensor(abs(value)).log2().floor().item() - 7)
        fraction_up = ((rounded.abs() > abs(value)).double().mean()).item()
        expected_up = (abs(value) % ulp) / ulp
        assert abs(rounded.mean().item() - value) < 5 * ulp / 2 / 100_000 ** 0.5, value
        assert abs(fraction_up - expected_up) < 5 * 0.5 / 100_000 ** 0.5, value


# ---------------------------------------------------------------------------- the step


def _optimizer(shapes=((5, 7), (13,), (3, 4, 5)), seed=0, **options):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    return params, Magma(params, lr=0.03, weight_decay=0.1, keep_prob=0.5, seed=11, **options)


def _feed(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("name", list(STATE_DTYPES))
@pytest.mark.parametrize("base", ["adam", "rmsprop"])
def test_each_new_moment_is_the_float32_one_rounded_by_the_stream(name, base):
    """From the same state, bfloat16 moments are the float32 path's new moments rounded with the
    stream's words of (tensor index, element, step); the float32 moment stays exact."""
    options = STATE_DTYPES[name]
    params, optimizer = _optimizer(base=base, **options)
    for step in range(3):
        _feed(params, step)
        optimizer.step()
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = Magma(twin_params, lr=0.03, weight_decay=0.1, keep_prob=0.5, seed=11, base=base)
    twin.load_state_dict(optimizer.state_dict())  # float32 state holding the bfloat16 values
    _feed(params, 3)
    _feed(twin_params, 3)
    optimizer.step()
    twin.step()
    for p, q in zip(params, twin_params):
        state, exact = optimizer.state[p], twin.state[q]
        for key, moment in (("exp_avg", EXP_AVG), ("exp_avg_sq", EXP_AVG_SQ)):
            if state[key].dtype == torch.float32:
                assert torch.equal(state[key], exact[key]), key
                continue
            expected = rounding.round_moment(exact[key], moment, 11, state["magma_tensor_index"], 0, exact["step"])
            assert_bitwise_equal(state[key], expected.to(torch.bfloat16), key)


def test_direction_reads_the_moments_as_stored():
    """mask "none", one step from zero state: the update is -lr * m / (sqrt(v) + eps) with the
    bias-corrected *bfloat16* moments, not the float32 ones."""
    p = torch.nn.Parameter(torch.zeros(4096))
    optimizer = Magma([p], lr=1.0, mask="none", eps=1e-8, **BF16)
    p.grad = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    optimizer.step()
    m, v = optimizer.state[p]["exp_avg"].float(), optimizer.state[p]["exp_avg_sq"].float()
    bias1, bias2 = 1 - torch.tensor(0.9), 1 - torch.tensor(0.999)  # in float32, as the step
    expected = -(m / bias1) / ((v / bias2).sqrt() + 1e-8)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)
    float32 = p.grad / (p.grad.abs() + 1e-8)  # the update float32 moments would give
    assert (p.detach() + float32).abs().max() > 1e-3


def test_same_bits_every_run_and_after_a_resume_from_a_saved_checkpoint():
    params, optimizer = _optimizer(**BF16)
    history = []
    for step in range(12):
        _feed(params, step)
        optimizer.step()
        if step == 5:
            buffer = io.BytesIO()
            torch.save({"params": [p.detach().clone() for p in params], "optim": optimizer.state_dict()}, buffer)
        history.append(snapshot(optimizer))
    again_params, again = _optimizer(**BF16)
    for step in range(12):
        _feed(again_params, step)
        again.step()
        assert_snapshots_equal(snapshot(again), history[step])
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_params, resumed = _optimizer(**BF16)
    with torch.no_grad():
        for p, value in zip(resumed_params, saved["params"]):
            p.copy_(value)
    resumed.load_state_dict(saved["optim"])
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in resumed.state.values())
    for step in range(6, 12):
        _feed(resumed_params, step)
        resumed.step()
        assert_snapshots_equal(snapshot(resumed), history[step])


# ---------------------------------------------------------------------------- round to nearest stalls


def test_constant_gradient_round_to_nearest_stalls_v_and_stochastic_rounding_tracks_float32():
    """beta2 = 0.999, v_0 = 1, g^2 = 2: v moves by 0.001 a step, an eighth of a bfloat16 ulp at
    1.  Stored to nearest it never moves; rounded stochastically its mean over 4096 elements
    follows the float32 v (here 1.632 after 1000 steps) within a few standard errors."""
    n, steps, beta2 = 4096, 1000, 0.999
    runs = {}
    for name, options in (("float32", {}), ("stochastic", BF16)):
        p = torch.nn.Parameter(torch.zeros(n))
        optimizer = Magma([p], lr=0.0, betas=(0.9, beta2), mask="none", **options)
        optimizer.init_state()
        optimizer.state[p]["exp_avg_sq"].fill_(1.0)
        p.grad = torch.full((n,), 2.0**0.5)
        for _ in range(steps):
            optimizer.step()
        runs[name] = optimizer.state[p]["exp_avg_sq"].double()
    nearest = torch.ones(n, dtype=torch.bfloat16)
    for _ in range(steps):  # the same recursion, stored to nearest
        nearest = (beta2 * nearest.float() + (1 - beta2) * 2.0).to(torch.bfloat16)
    exact = 2 - beta2**steps  # v_t - 2 = beta2^t (v_0 - 2)
    torch.testing.assert_close(runs["float32"], torch.full((n,), exact, dtype=torch.float64), rtol=1e-4, atol=0)
    assert torch.equal(nearest, torch.ones(n, dtype=torch.bfloat16))  # stalled at v_0
    spread = runs["stochastic"].std().item()
    assert 0 < spread < 0.05
    assert abs(runs["stochastic"].mean().item() - exact) < 5 * spread / n**0.5


# ---------------------------------------------------------------------------- checkpoints and options


def test_float32_checkpoint_loads_into_bfloat16_state_to_nearest_and_back_exactly():
    params, optimizer = _optimizer()
    for step in range(4):
        _feed(params, step)
        optimizer.step()
    saved = optimizer.state_dict()
    narrow_params, narrow = _optimizer(**BF16)
    narrow.load_state_dict(saved)
    for p, q in zip(params, narrow_params):
        for key in ("exp_avg", "exp_avg_sq"):
            assert_bitwise_equal(narrow.state[q][key], optimizer.state[p][key].to(torch.bfloat16), key)
        assert narrow.state[q]["magma_score"].dtype == torch.float32
    wide_params, wide = _optimizer()
    wide.load_state_dict(narrow.state_dict())
    for p, q in zip(narrow_params, wide_params):
        for key in ("exp_avg", "exp_avg_sq"):
            assert_bitwise_equal(wide.state[q][key], narrow.state[p][key].float(), key)


def test_adamw_checkpoint_loads_into_bfloat16_state():
    params = [torch.nn.Parameter(torch.randn(6, 3)) for _ in range(2)]
    adamw = torch.optim.AdamW(params, lr=0.01)
    for step in range(3):
        _feed(params, step)
        adamw.step()
    magma = Magma(params, lr=0.01, **BF16)
    magma.load_state_dict(adamw.state_dict())
    for p in params:
        assert_bitwise_equal(magma.state[p]["exp_avg_sq"], adamw.state[p]["exp_avg_sq"].to(torch.bfloat16))
    _feed(params, 3)
    magma.step()


def test_changing_a_state_dtype_mid_run_is_refused_and_changes_nothing():
    params, optimizer = _optimizer()
    _feed(params, 0)
    optimizer.step()
    before = snapshot(optimizer)
    optimizer.param_groups[0]["exp_avg_sq_dtype"] = torch.bfloat16
    _feed(params, 1)
    with pytest.raises(ValueError, match="exp_avg_sq is torch.float32 but its group's exp_avg_sq_dtype"):
        optimizer.step()
    assert_snapshots_equal(snapshot(optimizer), before)


def test_loaded_groups_keep_this_optimizers_state_dtypes():
    params, optimizer = _optimizer(**BF16)
    _feed(params, 0)
    optimizer.step()
    saved = optimizer.state_dict()
    saved["param_groups"][0]["exp_avg_dtype"] = "not a dtype"  # ignored: the checkpoint's are
    wide_params, wide = _optimizer()
    wide.load_state_dict(saved)
    assert wide.param_groups[0]["exp_avg_dtype"] == wide.param_groups[0]["exp_avg_sq_dtype"] == torch.float32
    assert all(s["exp_avg"].dtype == torch.float32 for s in wide.state.values())


@pytest.mark.parametrize("name", list(STATE_DTYPES))
def test_state_has_the_dtypes_of_its_group(name):
    options = STATE_DTYPES[name]
    params, optimizer = _optimizer(**options)
    plain = torch.nn.Parameter(torch.randn(3))
    optimizer.add_param_group({"params": [plain]})
    optimizer.init_state()
    for p in params:
        assert optimizer.state[p]["exp_avg"].dtype == options.get("exp_avg_dtype", torch.float32)
        assert optimizer.state[p]["exp_avg_sq"].dtype == options.get("exp_avg_sq_dtype", torch.float32)
        assert optimizer.state[p]["magma_score"].dtype == torch.float32
    # add_param_group merges the defaults: the new group takes the constructor's dtypes
    assert optimizer.state[plain]["exp_avg"].dtype == options.get("exp_avg_dtype", torch.float32)


def test_an_optimizer_pickled_before_the_dtype_options_unpickles_with_float32_moments():
    import copy

    params, optimizer = _optimizer()
    _feed(params, 0)
    optimizer.step()
    state = copy.copy(optimizer.__getstate__())
    state["defaults"] = {k: v for k, v in state["defaults"].items() if not k.endswith("_dtype")}
    state["param_groups"] = [{k: v for k, v in g.items() if not k.endswith("_dtype")} for g in state["param_groups"]]
    old = Magma.__new__(Magma)
    old.__setstate__(state)
    assert old.defaults["exp_avg_dtype"] == old.param_groups[0]["exp_avg_sq_dtype"] == torch.float32
    _feed(params, 1)
    old.step()


# ---------------------------------------------------------------------------- pieces refused


def test_column_slice_piece_with_bfloat16_state_is_refused_naming_it():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        whole = torch.nn.Parameter(torch.randn(4, 6))
        piece = torch.nn.Parameter(torch.randn(12))
        declare_piece(piece, index=3, offset=0, shape=(4, 6), group=dist.group.WORLD, split=(0, 2))
        optimizer = Magma([("proj.weight", piece), ("other", whole)], **BF16)
        with pytest.raises(ValueError, match=r"'proj.weight' is a piece of column slice 0 of 2"):
            optimizer.init_state()
        assert not any(optimizer.state.values())
        piece.grad, whole.grad = torch.randn(12), torch.randn(4, 6)
        with pytest.raises(ValueError, match=r"'proj.weight' is a piece of column slice 0 of 2"):
            optimizer.step()
        assert not any(optimizer.state.values())
        fine = Magma([{"params": [piece]}, {"params": [whole], **BF16}])  # float32 state for the slice
        fine.step()
        assert fine.state[piece]["exp_avg"].dtype == torch.float32
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_dtensor_sharded_along_dim_1_with_bfloat16_state_is_refused():
    for message, unchanged in run_ranks(2, cases.shard_dim_1_body, 2, "tensor", 1, BF16):
        assert "'encoder.weight' is a DTensor sharded along a dimension other than 0" in message, message
        assert unchanged


# ---------------------------------------------------------------------------- sharded runs


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [2, 4])
def test_flat_shards_with_bfloat16_state_follow_one_process_bit_for_bit(world_size):
    combos = [("adam", "magma", "tensor"), ("laprop", "skip", "row"), ("rmsprop", "magma", 7), ("adam", "none", 7)]
    results = run_ranks(world_size, cases.flat_shard_body, world_size, combos, 8, False, "cpu", BF16)
    for combo in combos:
        expected, final = cases.single_process_run(combo, 8, options=BF16)
        cases.assert_same_history(cases.assemble(results, combo), expected, f"{combo}, {world_size} ranks")
        for result in results:
            ranges, _, states = result[combo]
            for index, ((lo, hi), state) in enumerate(zip(ranges, states)):
                for key in ("exp_avg", "exp_avg_sq"):
                    assert_bitwise_equal(state[key], final[index][key].reshape(-1)[lo:hi], f"{combo} {key} {index}")


# FSDP2 averages the ranks' gradients, which differ from one process's batch gradient in the
# last float32 bit; where that moves a new moment across a rounding boundary (probability about
# 2**-16 per float32 ulp), the two runs store moments one bfloat16 ulp apart and that element's
# update differs by up to 2**-7 of itself (lr 0.03 here): a few 1e-4 after 10 steps.  A block
# masked in one run and kept in the other moves by about lr, and assert_same_history also
# checks that the same elements moved at every step.
SHARDED_GRAD_TOL = dict(rtol=1e-3, atol_scale=1e-3)


@pytest.mark.multiprocess
def test_fsdp2_with_bfloat16_state_follows_one_process():
    combos = [("adam", "magma", "tensor"), ("adam", "magma", "row"), ("laprop", "magma", 7)]
    results = run_ranks(2, cases.fsdp_body, 2, combos, 10, False, False, "cpu", BF16)
    for combo in combos:
        expected = cases.single_process_model_run(combo, 10, options=BF16)
        cases.assert_same_history(results[0][combo][0], expected, f"FSDP2 bf16 state {combo}", **SHARDED_GRAD_TOL)


def _dcp_loaded_moments_body(rank, world_size, path, block, options):
    """FSDP2 on ``world_size`` ranks: the moments (local shards) right after loading ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    model = cases.fsdp_model(cases._mesh(world_size, False, "cpu"))
    optimizer = Magma(model.parameters(), block=block, **cases.OPTIONS, **options)
    state = cases._checkpoint_state(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return [{key: optimizer.state[p][key].to_local().clone() for key in ("exp_avg", "exp_avg_sq")}
            for p in model.parameters()]


@pytest.mark.multiprocess
@pytest.mark.parametrize("resume_world_size", [1, 4])
def test_dcp_checkpoint_carries_bfloat16_state_across_world_sizes(tmp_path, resume_world_size):
    combo, first, rest = ("adam", "magma", "row"), 5, 5
    expected = cases.single_process_model_run(combo, first + rest, options=BF16)
    saved = run_ranks(2, cases.dcp_save_body, 2, combo, first, str(tmp_path), BF16)
    cases.assert_same_history(saved[0], expected[:first], "before the checkpoint", **SHARDED_GRAD_TOL)
    resumed = run_ranks(resume_world_size, cases.dcp_resume_body, resume_world_size, combo, first, rest,
                        str(tmp_path), BF16)
    cases.assert_same_history(resumed[0], expected[first:], f"resumed on {resume_world_size} ranks",
                              **SHARDED_GRAD_TOL)
    loaded = run_ranks(resume_world_size, _dcp_loaded_moments_body, resume_world_size, str(tmp_path), "row", BF16)
    assert all(m.dtype == torch.bfloat16 for rank in loaded for p in rank for m in p.values())


@pytest.mark.multiprocess
def test_dcp_float32_checkpoint_loads_into_bfloat16_state_to_nearest(tmp_path):
    run_ranks(2, cases.dcp_save_body, 2, ("adam", "magma", "tensor"), 3, str(tmp_path))
    wide = run_ranks(2, _dcp_loaded_moments_body, 2, str(tmp_path), "tensor", {})
    narrow = run_ranks(2, _dcp_loaded_moments_body, 2, str(tmp_path), "tensor", BF16)
    for wide_rank, narrow_rank in zip(wide, narrow):
        for wide_state, narrow_state in zip(wide_rank, narrow_rank):
            for key in ("exp_avg", "exp_avg_sq"):
                assert_bitwise_equal(narrow_state[key], wide_state[key].to(torch.bfloat16), key)

