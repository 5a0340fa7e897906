"""Behaviour of magma_ext.Magma on CPU: masks, parity with AdamW, checkpoints, and the torch.optim API."""

from __future__ import annotations

import collections
import copy
import io
import math

import pytest
import torch

import float64_magma as oracle
from helpers import assert_bitwise_equal, assert_scaled_close, assert_snapshots_equal, snapshot
from magma_ext import Magma

ODD_SHAPES = [(5, 7), (13,), (3, 4, 5), (1,)]
BLOCK_KINDS = [pytest.param("tensor", id="tensor"), pytest.param("row", id="row"),
               pytest.param(7, id="int7"), pytest.param(1, id="int1")]


def _params(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _grads(shapes, steps, seed=1):
    """A fixed gradient sequence: grads[step][position]."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone().to(p.dtype)


def _run(params, grads_per_step, **options):
    optimizer = Magma(params, **options)
    for grads in grads_per_step:
        _set_grads(params, grads)
        optimizer.step()
    return optimizer


# ---------------------------------------------------------------- masks, bit for bit


@pytest.mark.parametrize("mask", ["magma", "skip"])
@pytest.mark.parametrize("block", BLOCK_KINDS)
def test_kept_blocks_follow_the_contract(block, mask):
    """A block changes at step t exactly when the contract's Philox draw keeps it."""
    seed, keep_prob, steps = 99, 0.5, 6
    params = _params(ODD_SHAPES)
    optimizer = Magma(params, lr=0.1, mask=mask, keep_prob=keep_prob, block=block, seed=seed)
    kept_total = dropped_total = 0
    for step, grads in enumerate(_grads(ODD_SHAPES, steps), start=1):
        before = [p.detach().clone() for p in params]
        m_before = [optimizer.state[p]["exp_avg"].clone() if optimizer.state[p] else torch.zeros(p.shape)
                    for p in params]
        _set_grads(params, grads)
        optimizer.step()
        for index, (p, old) in enumerate(zip(params, before)):
            new, old = p.detach().reshape(-1), old.reshape(-1)
            for b, (start, stop) in enumerate(oracle.block_ranges(tuple(p.shape), block)):
                where = f"step {step} tensor {index} block {b}"
                if oracle.keep_block(seed, index, b, step, keep_prob):
                    kept_total += 1
                    assert bool((new[start:stop] != old[start:stop]).all()), f"{where}: kept but not updated"
                else:
                    dropped_total += 1
                    assert_bitwise_equal(new[start:stop], old[start:stop], f"{where}: dropped but written")
            # Moments are dense: every element's momentum moves, kept or not.
            assert bool((optimizer.state[p]["exp_avg"] != m_before[index]).all())
    assert kept_total > 0 and dropped_total > 0


@pytest.mark.parametrize("mask", ["magma", "skip"])
@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.9], ids=lambda p: f"p={p}")
def test_kept_fraction_within_five_sigma(keep_prob, mask):
    n = 20_000
    (param,) = _params([(n,)])
    before = param.detach().clone()
    optimizer = Magma([param], lr=0.1, mask=mask, keep_prob=keep_prob, block=1, seed=3)
    param.grad = torch.randn(n)
    optimizer.step()
    changed = int((param.detach() != before).sum())
    sigma = math.sqrt(n * keep_prob * (1 - keep_prob))
    assert abs(changed - n * keep_prob) < 5 * sigma


# keep_prob=0 is refused with masks "magma" and "skip" (test_validation); test_philox checks
# that its draw keeps no block.
@pytest.mark.parametrize("mask,keep_prob,expected_changed", [
    pytest.param("magma", 1.0, 20_000, id="magma-p=1-all"),
    pytest.param("skip", 1.0, 20_000, id="skip-p=1-all"),
])
def test_keep_prob_extremes(mask, keep_prob, expected_changed):
    (param,) = _params([(20_000,)])
    before = param.detach().clone()
    optimizer = Magma([param], lr=0.1, mask=mask, keep_prob=keep_prob, block=1)
    for _ in range(3):
        param.grad = torch.randn(param.shape)
        optimizer.step()
    assert int((param.detach() != before).sum()) == expected_changed


@pytest.mark.parametrize("mask", ["magma", "skip", "none"])
def test_two_runs_are_bitwise_identical(mask):
    grads = _grads(ODD_SHAPES + [(0,)], 10)
    runs = [_run(_params(ODD_SHAPES + [(0,)]), grads, lr=0.05, mask=mask, block=3, weight_decay=0.1, seed=8)
            for _ in range(2)]
    assert_snapshots_equal(snapshot(runs[0]), snapshot(runs[1]))


# ---------------------------------------------------------------- parity with torch.optim.AdamW


@pytest.mark.parametrize("options", [
    pytest.param(dict(mask="none"), id="mask-none"),
    pytest.param(dict(mask="skip", keep_prob=1.0), id="skip-p=1"),
    pytest.param(dict(mask="magma", keep_prob=0.2, magma=False), id="group-magma-False"),
])
def test_dense_adam_matches_torch_adamw(options):
    """Float32 vs float32 with different op order: NOTE [float32 tolerances against float64] applies."""
    shapes = ODD_SHAPES + [(0,)]
    ours, theirs = _params(shapes), _params(shapes)
    hyper = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    magma_options = {k: v for k, v in options.items() if k != "magma"}
    groups = [{"params": ours, **({"magma": False} if "magma" in options else {})}]
    optimizer = Magma(groups, **hyper, **magma_options)
    reference = torch.optim.AdamW(theirs, **hyper, foreach=False)
    for step, grads in enumerate(_grads(shapes, 100), start=1):
        _set_grads(ours, grads)
        _set_grads(theirs, grads)
        optimizer.step()
        reference.step()
        for p, q in zip(ours, theirs):
            where = f"step {step} {tuple(p.shape)}"
            assert_scaled_close(p, q, f"{where} param")
            for key in ("exp_avg", "exp_avg_sq"):
                assert_scaled_close(optimizer.state[p][key], reference.state[q][key], f"{where} {key}")
            assert optimizer.state[p]["step"].item() == reference.state[q]["step"].item() == step


# ---------------------------------------------------------------- checkpoints


def _save_load(state_dict, how):
    if how == "in-memory":
        return copy.deepcopy(state_dict)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("fresh_options", [
    pytest.param({}, id="same-options"),
    pytest.param(dict(seed=12345, keep_prob=0.9, lr=1.0), id="fresh-optimizer-other-options"),
])
@pytest.mark.parametrize("how", ["in-memory", "torch.save-BytesIO"])
@pytest.mark.parametrize("mask", ["magma", "skip"])
def test_state_dict_resume_is_bitwise_identical(mask, how, fresh_options):
    """Stop after 5 of 12 steps, reload into a fresh optimizer: the trajectory does not change.

    The fresh optimizer is built with other options on purpose: the checkpoint's param groups
    (seed, keep_prob, lr) must win, as in torch.optim, or the masks would change.
    """
    shapes = ODD_SHAPES + [(0,)]
    options = dict(lr=0.05, mask=mask, block="row", keep_prob=0.5, weight_decay=0.1, seed=77)
    grads = _grads(shapes, 12)
    straight = _run(_params(shapes), grads, **options)

    first = _params(shapes)
    interrupted = _run(first, grads[:5], **options)
    checkpoint = _save_load(interrupted.state_dict(), how)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = Magma(resumed_params, **{**options, **fresh_options})
    resumed.load_state_dict(checkpoint)
    for step_grads in grads[5:]:
        _set_grads(resumed_params, step_grads)
        resumed.step()
    assert_snapshots_equal(snapshot(resumed), snapshot(straight))


def test_state_dict_holds_documented_state():
    (p,) = _params([(4, 3)])
    optimizer = _run([p], _grads([(4, 3)], 2), block="row")
    state = optimizer.state_dict()["state"][0]
    assert state["step"].dtype == torch.float32 and state["step"].shape == () and state["step"].item() == 2
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (4, 3)
    assert state["magma_score"].dtype == torch.float32 and state["magma_score"].shape == (4,)
    assert state["magma_tensor_index"] == 0


# ---------------------------------------------------------------- torch.optim API


def test_closure_is_called_once_and_its_grads_are_used():
    inputs, targets = torch.randn(8, 5), torch.randn(8, 3)
    models = [torch.nn.Linear(5, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [Magma(m.parameters(), lr=0.05, block="row", seed=4) for m in models]
    calls = []

    def closure():
        calls.append(1)
        optimizers[0].zero_grad()
        loss = torch.nn.functional.mse_loss(models[0](inputs), targets)
        loss.backward()
        return loss

    for _ in range(3):
        returned = optimizers[0].step(closure)
        optimizers[1].zero_grad()
        expected = torch.nn.functional.mse_loss(models[1](inputs), targets)
        expected.backward()
        optimizers[1].step()
        assert returned.item() == expected.item()
    assert len(calls) == 3
    assert_snapshots_equal(snapshot(optimizers[0]), snapshot(optimizers[1]))


def test_step_lr_scheduler_equals_setting_lr_by_hand():
    shapes = ODD_SHAPES
    grads = _grads(shapes, 8)
    scheduled_params, manual_params = _params(shapes), _params(shapes)
    scheduled = Magma(scheduled_params, lr=0.1, block=2, seed=6)
    manual = Magma(manual_params, lr=0.1, block=2, seed=6)
    scheduler = torch.optim.lr_scheduler.StepLR(scheduled, step_size=2, gamma=0.5)
    for step, step_grads in enumerate(grads):
        manual.param_groups[0]["lr"] = 0.1 * 0.5 ** (step // 2)
        _set_grads(scheduled_params, step_grads)
        _set_grads(manual_params, step_grads)
        scheduled.step()
        manual.step()
        scheduler.step()
    assert scheduled.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)
    assert_snapshots_equal(snapshot(scheduled), snapshot(manual))


def test_step_lr_to_zero_freezes_params_but_not_moments():
    params = _params(ODD_SHAPES)
    optimizer = Magma(params, lr=0.1, weight_decay=0.1, mask="skip", keep_prob=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.0)
    for step, grads in enumerate(_grads(ODD_SHAPES, 6), start=1):
        before = [p.detach().clone() for p in params]
        m_before = [optimizer.state[p]["exp_avg"].clone() if optimizer.state[p] else None for p in params]
        _set_grads(params, grads)
        optimizer.step()
        scheduler.step()
        for p, old, m_old in zip(params, before, m_before):
            if step <= 3:
                assert bool((p.detach() != old).all()), f"step {step}: lr 0.1 must move every element"
            else:
                assert_bitwise_equal(p.detach(), old, f"step {step}: lr 0 must not move params")
                assert bool((optimizer.state[p]["exp_avg"] != m_old).all())


@pytest.mark.parametrize("mask", ["magma", "skip", "none"])
def test_tensor_lr_gives_the_same_result_as_float_lr(mask):
    """A 0-d float32 lr may round differently from the Python float in the last bit only."""
    shapes = ODD_SHAPES + [(0,)]
    grads = _grads(shapes, 10)
    options = dict(mask=mask, weight_decay=0.1, block="row", seed=2)
    with_float = _run(_params(shapes), grads, lr=0.01, **options)
    with_tensor = _run(_params(shapes), grads, lr=torch.tensor(0.01), **options)
    other_lr = _run(_params(shapes), grads, lr=0.011, **options)
    a, b, c = snapshot(with_float), snapshot(with_tensor), snapshot(other_lr)
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert_scaled_close(b[key], value, str(key), rtol=1e-6, atol_scale=1e-7)
        else:
            assert b[key] == value, key
    assert any(not torch.equal(a[(i, "param")], c[(i, "param")]) for i in range(len(shapes) - 1))


def test_params_without_grads_are_skipped_but_keep_their_tensor_index():
    shapes = [(3, 2), (4,), (2, 2)]
    params = _params(shapes)
    idle_before = params[1].detach().clone()
    optimizer = Magma(params, lr=0.1, block=1, seed=21)
    for grads in _grads(shapes, 3):
        _set_grads(params, [grads[0], None, grads[2]])
        optimizer.step()
    assert len(optimizer.state[params[1]]) == 0
    assert_bitwise_equal(params[1].detach(), idle_before)
    assert optimizer.state[params[0]]["magma_tensor_index"] == 0
    assert optimizer.state[params[2]]["magma_tensor_index"] == 2
    # Its first step later is its own t = 1, drawn with tensor index 1.
    before = params[1].detach().clone()
    _set_grads(params, [None, torch.randn(4), None])
    optimizer.step()
    state = optimizer.state[params[1]]
    assert state["magma_tensor_index"] == 1 and state["step"].item() == 1
    assert optimizer.state[params[0]]["step"].item() == 3
    changed = (params[1].detach() != before).tolist()
    assert changed == [oracle.keep_block(21, 1, b, 1, 0.5) for b in range(4)]


@pytest.mark.parametrize("mask", ["magma", "skip", "none"])
@pytest.mark.parametrize("block", BLOCK_KINDS)
def test_empty_tensors(block, mask):
    shapes = [(0,), (3, 4), (0, 4), (4, 0, 2)]
    params = _params(shapes)
    optimizer = _run(params, _grads(shapes, 3), lr=0.1, block=block, mask=mask, keep_prob=1.0)
    for p in params:
        state = optimizer.state[p]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
        if p.numel() == 0:
            assert state["magma_score"].numel() == 0
    assert not torch.equal(params[1].detach(), _params(shapes)[1].detach())


def test_only_empty_tensors():
    params = _params([(0,), (0, 3)])
    optimizer = _run(params, _grads([(0,), (0, 3)], 2))
    assert all(optimizer.state[p]["step"].item() == 2 for p in params)


def test_add_param_group_gets_next_tensor_index_and_works():
    first = _params([(3, 3), (5,)])
    optimizer = Magma(first, lr=0.1, block=1, seed=31)
    for grads in _grads([(3, 3), (5,)], 2):
        _set_grads(first, grads)
        optimizer.step()
    added = _params([(6,), (2, 4)], seed=5)
    optimizer.add_param_group({"params": added, "mask": "skip", "keep_prob": 0.25, "block": 1})
    assert optimizer.param_groups[1]["seed"] == 31 and optimizer.param_groups[1]["mask"] == "skip"
    for step in (1, 2):
        before = [p.detach().clone() for p in added]
        _set_grads(first + added, [torch.randn(p.shape) for p in first + added])
        optimizer.step()
        for offset, (p, old) in enumerate(zip(added, before)):
            tensor_index = 2 + offset
            assert optimizer.state[p]["magma_tensor_index"] == tensor_index
            changed = (p.detach() != old).reshape(-1).tolist()
            assert changed == [oracle.keep_block(31, tensor_index, b, step, 0.25) for b in range(p.numel())]


def test_magma_false_group_behaves_exactly_like_mask_none():
    shapes = ODD_SHAPES
    grads = _grads(shapes, 8)
    params = _params(shapes)
    off = Magma([{"params": params, "magma": False}], lr=0.05, mask="magma", keep_prob=0.1, block=1,
                weight_decay=0.1)
    for step_grads in grads:
        _set_grads(params, step_grads)
        off.step()
    none = _run(_params(shapes), grads, lr=0.05, mask="none", keep_prob=0.1, block=1, weight_decay=0.1)
    assert_snapshots_equal(snapshot(off), snapshot(none))
    assert all(bool((off.state[p]["magma_score"] == 0.5).all()) for p in off.param_groups[0]["params"])


# ---------------------------------------------------------------- master weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_master_weights_are_the_ones_updated(dtype):
    shapes = [(5, 7), (13,)]
    low = _params(shapes, dtype=dtype)
    full = [torch.nn.Parameter(p.detach().float()) for p in low]
    # lr so small that most updates vanish in the low-precision param but not in the master.
    options = dict(lr=1e-4, mask="skip", keep_prob=1.0, weight_decay=0.1)
    optimizer = Magma(low, master_weights=True, **options)
    reference = Magma(full, **options)
    for grads in _grads(shapes, 5):
        _set_grads(low, grads)
        _set_grads(full, [g.to(dtype) for g in grads])
        optimizer.step()
        reference.step()
        for p, q in zip(low, full):
            master = optimizer.state[p]["master_param"]
            assert master.dtype == torch.float32 and p.dtype == dtype
            assert_bitwise_equal(p.detach(), master.to(dtype))
            assert_scaled_close(master, q, "master vs float32 run")
            for key in ("exp_avg", "exp_avg_sq", "magma_score"):
                assert optimizer.state[p][key].dtype == torch.float32
                assert_scaled_close(optimizer.state[p][key], reference.state[q][key], key)
    initial = _params(shapes, dtype=dtype)
    masters_moved = sum(int((optimizer.state[p]["master_param"] != p0.detach().float()).sum())
                        for p, p0 in zip(low, initial))
    params_moved = sum(int((p.detach() != p0.detach()).sum()) for p, p0 in zip(low, initial))
    assert masters_moved == sum(p.numel() for p in low) and params_moved < masters_moved


@pytest.mark.parametrize("dtype,master_weights", [
    (torch.float32, True), (torch.bfloat16, False)], ids=["fp32-master-on", "bf16-master-off"])
def test_no_master_copy_when_not_needed(dtype, master_weights):
    params = _params([(4,)], dtype=dtype)
    optimizer = _run(params, _grads([(4,)], 1), master_weights=master_weights)
    assert "master_param" not in optimizer.state[params[0]]
    assert optimizer.state[params[0]]["exp_avg"].dtype == torch.float32


# ---------------------------------------------------------------- degenerate inputs


def _all_finite(optimizer):
    return all(torch.isfinite(v).all() for v in snapshot(optimizer).values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("base", ["adam", "rmsprop", "laprop"])
def test_zero_grads_and_zero_momentum_give_neutral_score(base):
    """cos(0, 0) is defined as 0, so the score stays at sigmoid(0) = 0.5 and nothing is NaN."""
    params = _params(ODD_SHAPES)
    before = [p.detach().clone() for p in params]
    optimizer = Magma(params, lr=0.1, base=base, block="row", keep_prob=1.0)
    for _ in range(3):
        _set_grads(params, [torch.zeros(p.shape) for p in params])
        optimizer.step()
    assert _all_finite(optimizer)
    for p, old in zip(params, before):
        assert_scaled_close(optimizer.state[p]["magma_score"], torch.full_like(optimizer.state[p]["magma_score"], 0.5))
        assert_bitwise_equal(p.detach(), old)  # D = 0 and no weight decay: nothing moves


@pytest.mark.parametrize("base", ["adam", "rmsprop", "laprop"])
def test_zero_grad_with_momentum_pulls_score_toward_half(base):
    params = _params(ODD_SHAPES)
    optimizer = Magma(params, lr=0.1, base=base, block="row", score_ema=0.8, weight_decay=0.1)
    shift = _grads(ODD_SHAPES, 1, seed=7)[0]
    for grads in _grads(ODD_SHAPES, 4):
        _set_grads(params, [g + 2 * s.sign() for g, s in zip(grads, shift)])  # aligned grads: score > 0.5
        optimizer.step()
    scores_before = [optimizer.state[p]["magma_score"].clone() for p in params]
    assert all(bool((s > 0.5).all()) for s in scores_before)
    _set_grads(params, [torch.zeros(p.shape) for p in params])
    optimizer.step()
    assert _all_finite(optimizer)
    for p, old in zip(params, scores_before):
        assert_scaled_close(optimizer.state[p]["magma_score"], 0.8 * old.double() + 0.2 * 0.5)


# ---------------------------------------------------------------- GradScaler protocol


def _set_amp(optimizer, found_inf: float, grad_scale: float):
    optimizer.found_inf = torch.tensor(found_inf)
    optimizer.grad_scale = torch.tensor(grad_scale)


def _clear_amp(optimizer):
    del optimizer.found_inf
    del optimizer.grad_scale


@pytest.mark.parametrize("mask", ["magma", "skip", "none"])
def test_found_inf_skips_the_whole_step(mask):
    shapes = ODD_SHAPES + [(0,)]
    grads = _grads(shapes, 4)
    options = dict(lr=0.05, mask=mask, block="row", weight_decay=0.1, seed=3)
    params = _params(shapes)
    optimizer = _run(params, grads[:2], **options)
    before = snapshot(optimizer)
    _set_grads(params, [torch.full(p.shape, float("inf")) for p in params])
    _set_amp(optimizer, found_inf=1.0, grad_scale=2.0)
    optimizer.step()
    _clear_amp(optimizer)
    assert_snapshots_equal(snapshot(optimizer), before)
    # The skipped step left no trace: the masks of later steps are those of a run without it.
    for step_grads in grads[2:]:
        _set_grads(params, step_grads)
        optimizer.step()
    assert_snapshots_equal(snapshot(optimizer), snapshot(_run(_params(shapes), grads, **options)))


def test_found_inf_on_first_step_creates_no_progress():
    params = _params(ODD_SHAPES)
    before = [p.detach().clone() for p in params]
    optimizer = Magma(params, lr=0.1)
    _set_grads(params, [torch.full(p.shape, float("nan")) for p in params])
    _set_amp(optimizer, found_inf=1.0, grad_scale=1.0)
    optimizer.step()
    for p, old in zip(params, before):
        assert_bitwise_equal(p.detach(), old)
        state = optimizer.state[p]
        if state:
            assert state["step"].item() == 0
            assert bool((state["exp_avg"] == 0).all() and (state["exp_avg_sq"] == 0).all())
            assert bool((state["magma_score"] == 0.5).all())


@pytest.mark.parametrize("mask", ["magma", "skip", "none"])
def test_grad_scale_divides_grads(mask):
    shapes = ODD_SHAPES
    grads = _grads(shapes, 4)
    options = dict(lr=0.05, mask=mask, block=3, weight_decay=0.1, seed=3)
    params = _params(shapes)
    scaled = Magma(params, **options)
    for step_grads in grads:
        _set_grads(params, [4.0 * g for g in step_grads])
        _set_amp(scaled, found_inf=0.0, grad_scale=4.0)
        scaled.step()
        _clear_amp(scaled)
    unscaled = _run(_params(shapes), grads, **options)
    a, b = snapshot(scaled), snapshot(unscaled)
    assert a.keys() == b.keys()
    for key, value in b.items():
        if isinstance(value, torch.Tensor):
            assert_scaled_close(a[key], value, str(key), rtol=1e-6, atol_scale=1e-7)
        else:
            assert a[key] == value, key


def test_torch_grad_scaler_skips_inf_steps():
    model = torch.nn.Linear(4, 3)
    optimizer = Magma(model.parameters(), lr=0.1, mask="skip", keep_prob=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    loss = model(torch.randn(2, 4)).sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    after_good = snapshot(optimizer)
    model.weight.grad.fill_(float("inf"))
    scaler.step(optimizer)
    scaler.update()
    assert_snapshots_equal(snapshot(optimizer), after_good)
    assert scaler.get_scale() == 4.0


# ---------------------------------------------------------------- host cost of a step


class _CountingState(collections.defaultdict):
    """optimizer.state that counts lookups (each hashes a tensor in Python)."""

    lookups = 0

    def __getitem__(self, key):
        self.lookups += 1
        return super().__getitem__(key)


@pytest.mark.parametrize("mask", ["magma", "none"])
def test_a_step_looks_up_each_parameters_state_once(mask):
    # Host time before a step's first kernel adds to the step's time on the GPU.
    shapes = ODD_SHAPES
    params = _params(shapes)
    idle = torch.nn.Parameter(torch.randn(3))  # no grad: not looked up at all
    optimizer = Magma(params + [idle], lr=0.1, mask=mask, block="row")
    grads = _grads(shapes, 3)
    _set_grads(params, grads[0])
    optimizer.step()
    reference = _run(_params(shapes), grads, lr=0.1, mask=mask, block="row")
    optimizer.state = _CountingState(dict, optimizer.state)
    for step_grads in grads[1:]:
        _set_grads(params, step_grads)
        optimizer.step()
    assert optimizer.state.lookups == 2 * len(params)
    for p, q in zip(params, reference.param_groups[0]["params"]):
        assert_bitwise_equal(p.detach(), q.detach())
