"""Master weights kept as 16-bit remainders beside bfloat16 parameters (``store_param_remainders``).

The encoding (magma_ext/param_remainders.py) on every sampled bit pattern; runs with remainders
against runs with whole float32 masters, whose masters they must equal bit for bit; the state it
keeps; resumes, and checkpoints of one form loaded into the other in either order of model and
optimizer; the errors; FSDP2 and DCP on CPU ranks.
"""

from __future__ import annotations

import io

import pytest
import torch

import sharded_cases as cases
from distributed_helpers import run_ranks
from helpers import assert_bitwise_equal
from magma_ext import Magma
from magma_ext.param_remainders import REMAINDER_KEY, join, split

SHAPES = [(9, 13), (1,), (0, 4), (33,), (4, 3, 5)]
WHOLE = dict(master_weights=True)
REMAINDERS = dict(master_weights=True, store_param_remainders=True)
COMBOS = [("adam", "magma", "tensor"), ("adam", "magma", "row"), ("laprop", "skip", 7),
          ("rmsprop", "magma", "row"), ("adam", "none", "tensor")]


def _bit_patterns() -> torch.Tensor:
    """2**20 random float32 bit patterns, every high half with a low half of 0 and of 0x8000
    (the ties), and the edges: zeros, the largest finite values, infinities, NaNs."""
    gen = torch.Generator().manual_seed(0)
    random = torch.randint(0, 2**32, (2**20,), generator=gen, dtype=torch.int64)
    highs = torch.arange(2**16, dtype=torch.int64) << 16
    edges = torch.tensor([0, 0x80000000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F800000, 0xFF800000,
                          0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x00008000, 0x80008000, 0x00000001])
    unsigned = torch.cat([random, highs, highs | 0x8000, highs | 0x7FFF, highs | 0xFFFF, edges])
    return (unsigned - ((unsigned >> 31) << 32)).to(torch.int32)


def test_join_undoes_split_for_every_bit_pattern():
    bits = _bit_patterns()
    param, remainder = split(bits.view(torch.float32))
    assert param.dtype == torch.bfloat16 and remainder.dtype == torch.int16
    assert_bitwise_equal(join(param, remainder).view(torch.int32), bits)


def test_the_parameter_is_the_master_rounded_to_nearest_ties_away_from_zero():
    bits = _bit_patterns()
    master = bits.view(torch.float32)
    param, _ = split(master)
    finite, tie = torch.isfinite(master), (bits & 0xFFFF) == 0x8000
    nearest_even = master.to(torch.bfloat16)
    assert torch.equal(param[finite & ~tie].view(torch.int16), nearest_even[finite & ~tie].view(torch.int16))
    ties = master[finite & tie]
    assert ties.numel() > 30000
    assert torch.all(param[finite & tie].float().abs() > ties.abs())  # away from zero, always


def _params(dtype=torch.bfloat16, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _feed(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype=p.dtype, device=p.device)


def _run(options, steps, combo=COMBOS[0], dtype=torch.bfloat16, first=0, params=None, optimizer=None):
    base, mask, block = combo
    params = params if params is not None else _params(dtype)
    optimizer = optimizer or Magma(params, lr=0.02, weight_decay=0.1, base=base, mask=mask, block=block,
                                   seed=5, **options)
    for step in range(first, first + steps):
        _feed(params, step)
        optimizer.step()
    return params, optimizer


def _masters(params, optimizer) -> list[torch.Tensor]:
    """Every parameter's float32 master weight, whichever form its state keeps it in."""
    out = []
    for p in params:
        state = optimizer.state[p]
        out.append(state["master_param"] if "master_param" in state else join(p.detach(), state[REMAINDER_KEY]))
    return out


def _assert_same_masters(params, optimizer, expected_params, expected_optimizer, what=""):
    for i, (actual, expected) in enumerate(zip(_masters(params, optimizer), _masters(expected_params, expected_optimizer))):
        assert_bitwise_equal(actual, expected, f"{what} master of parameter {i}")


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(map(str, c)))
def test_remainders_follow_whole_masters_bit_for_bit(combo):
    whole_params, whole = _run(WHOLE, 12, combo)
    params, optimizer = _run(REMAINDERS, 12, combo)
    _assert_same_masters(params, optimizer, whole_params, whole, str(combo))
    masters = _masters(params, optimizer)
    for p, q, master in zip(params, whole_params, masters):
        assert_bitwise_equal(p.detach(), split(master)[0], "the parameter is the master's high half")
        assert_bitwise_equal(q.detach(), master.to(torch.bfloat16), "whole masters round to nearest even")
    assert any(bool((m != p0.float()).any()) for m, p0 in zip(masters, _params()))  # the run moved
    assert any(bool((optimizer.state[p][REMAINDER_KEY] != 0).any()) for p in params)  # below bf16's bits
    for i, state in enumerate(optimizer.state.values()):
        for key in ("exp_avg", "exp_avg_sq", "magma_score"):
            assert_bitwise_equal(state[key], whole.state[whole_params[i]][key], f"{key} of parameter {i}")


def test_state_keeps_a_remainder_for_bfloat16_and_a_whole_master_for_float16():
    bf16, f16, f32 = (_params(dtype, [(3, 5)])[0] for dtype in (torch.bfloat16, torch.float16, torch.float32))
    optimizer = Magma([bf16, f16, f32], **REMAINDERS)
    for p in (bf16, f16, f32):
        p.grad = torch.ones_like(p)
    optimizer.step()
    remainder = optimizer.state[bf16][REMAINDER_KEY]
    assert remainder.dtype == torch.int16 and remainder.shape == bf16.shape
    assert "master_param" not in optimizer.state[bf16]
    assert optimizer.state[f16]["master_param"].dtype == torch.float32
    assert REMAINDER_KEY not in optimizer.state[f16]
    assert REMAINDER_KEY not in optimizer.state[f32] and "master_param" not in optimizer.state[f32]


def test_masters_move_below_the_parameters_resolution():
    """An update far below a bfloat16 ulp leaves the parameter but not its master: the remainder
    carries it (what master weights are for)."""
    p = torch.nn.Parameter(torch.full((64,), 1.0, dtype=torch.bfloat16))
    optimizer = Magma([p], lr=1e-5, mask="none", **REMAINDERS)
    for _ in range(3):
        p.grad = torch.ones_like(p)
        optimizer.step()
    assert torch.all(p.detach() == 1.0)
    assert torch.all(join(p.detach(), optimizer.state[p][REMAINDER_KEY]) < 1.0)


def test_a_skipped_step_changes_no_parameter_or_remainder():
    params, optimizer = _run(REMAINDERS, 3)
    before = [(p.detach().clone(), optimizer.state[p][REMAINDER_KEY].clone()) for p in params]
    _feed(params, 3)
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    for p, (value, remainder) in zip(params, before):
        assert_bitwise_equal(p.detach(), value)
        assert_bitwise_equal(optimizer.state[p][REMAINDER_KEY], remainder)


def _saved(params, optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's state dicts through torch.save, as a checkpoint holds them."""
    buffer = io.BytesIO()
    torch.save(({i: p.detach() for i, p in enumerate(params)}, optimizer.state_dict()), buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _restored(saved, options, model_first: bool):
    model_state, optimizer_state = saved
    params = _params()
    optimizer = Magma(params, lr=0.02, weight_decay=0.1, seed=5, **options)

    def load_model():
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(model_state[i])

    if model_first:
        load_model()
    optimizer.load_state_dict(optimizer_state)
    if not model_first:
        load_model()
    return params, optimizer


@pytest.mark.parametrize("saved_with,loaded_with", [(REMAINDERS, REMAINDERS), (WHOLE, REMAINDERS), (REMAINDERS, WHOLE)],
                         ids=["remainders", "whole-to-remainders", "remainders-to-whole"])
@pytest.mark.parametrize("model_first", [True, False], ids=["model-first", "optimizer-first"])
def test_a_checkpoint_of_either_form_resumes_the_uninterrupted_masters(saved_with, loaded_with, model_first):
    whole_params, whole = _run(WHOLE, 10)
    params, optimizer = _run(saved_with, 5)
    saved = _saved(params, optimizer)
    if saved_with is REMAINDERS:
        assert saved[1]["state"][0][REMAINDER_KEY].dtype == torch.int16 and "master_param" not in saved[1]["state"][0]
    params, optimizer = _restored(saved, loaded_with, model_first)
    _run(loaded_with, 5, first=5, params=params, optimizer=optimizer)
    _assert_same_masters(params, optimizer, whole_params, whole)
    form = REMAINDER_KEY if loaded_with is REMAINDERS else "master_param"
    assert all(form in state for state in optimizer.state.values())


def test_turning_remainders_on_and_off_mid_run_converts_the_masters_exactly():
    whole_params, whole = _run(WHOLE, 9)
    params, optimizer = _run(WHOLE, 3)
    optimizer.param_groups[0]["store_param_remainders"] = True
    _run(WHOLE, 3, first=3, params=params, optimizer=optimizer)
    assert all(REMAINDER_KEY in s and "master_param" not in s for s in optimizer.state.values())
    optimizer.param_groups[0]["store_param_remainders"] = False
    _run(WHOLE, 3, first=6, params=params, optimizer=optimizer)
    assert all("master_param" in s and REMAINDER_KEY not in s for s in optimizer.state.values())
    _assert_same_masters(params, optimizer, whole_params, whole)


def test_a_conversion_inside_cuda_graph_capture_is_refused_changing_nothing(monkeypatch):
    params, optimizer = _run(WHOLE, 2)
    optimizer.param_groups[0]["store_param_remainders"] = True
    _feed(params, 2)
    before = [(p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)})
              for p in params]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="captured in a CUDA graph; take one step outside"):
        optimizer.step()
    for p, (value, state) in zip(params, before):
        assert_bitwise_equal(p.detach(), value)
        assert state.keys() == {k for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
        for key in state:
            assert_bitwise_equal(optimizer.state[p][key], state[key], key)


@pytest.mark.parametrize("options,error,match", [
    (dict(store_param_remainders=1, master_weights=True), TypeError, "store_param_remainders must be a bool"),
    (dict(store_param_remainders=True), ValueError, "store_param_remainders=True needs master_weights=True"),
])
def test_bad_options_are_refused_naming_them(options, error, match):
    with pytest.raises(error, match=match):
        Magma(_params(), **options)
    optimizer = Magma(_params()[:1])
    with pytest.raises(error, match=f"parameter group 1: {match}"):
        optimizer.add_param_group({"params": _params()[1:], **options})


def test_fused_true_with_remainders_is_refused():
    with pytest.raises(ValueError, match="store_param_remainders=True is not taken by the CUDA kernels"):
        Magma(_params(), fused=True, **REMAINDERS)


@pytest.mark.parametrize("remainder,match", [
    (torch.zeros(9, 13, dtype=torch.float32), "must be an int16 tensor beside a bfloat16 parameter"),
    (torch.zeros(9, 12, dtype=torch.int16), "master_param_remainder has shape"),
], ids=["dtype", "shape"])
def test_a_bad_loaded_remainder_is_refused_changing_nothing(remainder, match):
    params, optimizer = _run(REMAINDERS, 2)
    state = optimizer.state_dict()
    state["state"][0] = {**state["state"][0], REMAINDER_KEY: remainder}
    before = optimizer.state_dict()
    with pytest.raises(ValueError, match=match):
        optimizer.load_state_dict(state)
    for i, p in enumerate(params):
        assert_bitwise_equal(optimizer.state[p][REMAINDER_KEY], before["state"][i][REMAINDER_KEY])


def test_a_remainder_beside_a_float16_parameter_is_refused():
    params, optimizer = _run(REMAINDERS, 1)
    state = optimizer.state_dict()
    float16 = Magma(_params(torch.float16), **REMAINDERS)
    with pytest.raises(ValueError, match="beside torch.float16"):
        float16.load_state_dict(state)


# ---------------------------------------------------------------------------- FSDP2 and DCP


def _bf16_fsdp_run(rank, world_size, options, steps, path=None, resume_from=None, then=None):
    """FSDP2 over a bfloat16 model: the masters (local shards) after ``steps`` steps; a DCP
    checkpoint written to ``path`` after them, or read from ``resume_from`` before them, after
    which the group's options are updated with ``then``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    mesh = cases._mesh(world_size, False, "cpu")
    model = cases.mlp().to(torch.bfloat16)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = Magma(model.parameters(), block="row", **cases.OPTIONS, **options)
    first = 0
    if resume_from is not None:
        state = cases._checkpoint_state(model, optimizer)
        dcp.load(state, checkpoint_id=resume_from)
        set_optimizer_state_dict(model, optimizer, state["optim"])  # the optimizer first
        set_model_state_dict(model, state["model"])
        optimizer.param_groups[0].update(then or {})
        first = 4
    for step in range(first, first + steps):
        inputs, targets = cases.batch(step)
        rows = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
        torch.nn.functional.mse_loss(model(inputs[rows].bfloat16()).float(), targets[rows]).backward()
        optimizer.step()
        optimizer.zero_grad()
    if path is not None:
        dcp.save(cases._checkpoint_state(model, optimizer), checkpoint_id=path)
    form = REMAINDER_KEY if optimizer.param_groups[0]["store_param_remainders"] else "master_param"
    assert all(form in optimizer.state[p] for p in model.parameters())
    masters = []
    for p in model.parameters():
        state = optimizer.state[p]
        local = (state["master_param"].to_local() if "master_param" in state
                 else join(p.to_local().detach(), state[REMAINDER_KEY].to_local()))
        masters.append(local.clone())
    return masters


@pytest.mark.multiprocess
def test_fsdp2_remainders_follow_whole_masters_bit_for_bit():
    whole = run_ranks(2, _bf16_fsdp_run, 2, WHOLE, 6)
    remainders = run_ranks(2, _bf16_fsdp_run, 2, REMAINDERS, 6)
    for rank, (actual, expected) in enumerate(zip(remainders, whole)):
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_bitwise_equal(a, e, f"rank {rank} master {i}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("saved_with", [REMAINDERS, WHOLE], ids=["remainders", "whole"])
def test_dcp_checkpoint_resumes_fsdp2_remainders_exactly(tmp_path, saved_with):
    """DCP loads into the keys of the optimizer it is given, so a checkpoint of whole masters
    loads into an optimizer built as it was saved; turning remainders on then converts them."""
    uninterrupted = run_ranks(2, _bf16_fsdp_run, 2, WHOLE, 8)
    run_ranks(2, _bf16_fsdp_run, 2, saved_with, 4, str(tmp_path))
    resumed = run_ranks(2, _bf16_fsdp_run, 2, saved_with, 4, None, str(tmp_path), REMAINDERS)
    for rank, (actual, expected) in enumerate(zip(resumed, uninterrupted)):
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_bitwise_equal(a, e, f"rank {rank} master {i}")


# ---------------------------------------------------------------------------- CUDA (GPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_groups_with_remainders_run_the_pytorch_path_and_warn_once(monkeypatch):
    from magma_ext import functional

    monkeypatch.setattr(functional, "_warned", set())
    cpu_params, cpu = _run(REMAINDERS, 6)
    params = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
    optimizer = Magma(params, lr=0.02, weight_decay=0.1, seed=5, **REMAINDERS)
    with pytest.warns(UserWarning, match="store_param_remainders=True run the PyTorch path"):
        _feed(params, 0)
        optimizer.step()
    for step in range(1, 6):
        _feed(params, step)
        optimizer.step()
    for p, q in zip(params, cpu_params):
        torch.testing.assert_close(join(p.detach(), optimizer.state[p][REMAINDER_KEY]).cpu(),
                                   join(q.detach(), cpu.state[q][REMAINDER_KEY]), rtol=1e-5, atol=1e-6)
