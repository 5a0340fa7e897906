"""Regression tests for what an outside probe found (issue 9): each failed before its fix."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

from helpers import assert_scaled_close, assert_snapshots_equal, fused_over_cpu_refusal, snapshot
import magma_ext
from magma_ext import Magma, functional

SHAPES = [(4, 3), (5,), (2, 3, 2)]


def _params(seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(step, shapes=SHAPES):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen) for s in shapes]


def _steps(optimizer, params, first, count):
    for step in range(first, first + count):
        for p, g in zip(params, _grads(step, [tuple(p.shape) for p in params])):
            p.grad = g.clone()
        optimizer.step()


def _same_state(a, b):
    assert_snapshots_equal(snapshot(a), snapshot(b))


# ---------------------------------------------------------------- 1. copy and pickle

@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_steps_like_the_original(how):
    params = _params()
    original = Magma(params, lr=0.05, keep_prob=0.5, seed=3)
    _steps(original, params, 0, 3)
    if how == "deepcopy":
        twin_params, twin = copy.deepcopy((params, original))
    else:
        twin_params, twin = pickle.loads(pickle.dumps((params, original)))
    _steps(original, params, 3, 4)
    _steps(twin, twin_params, 3, 4)
    _same_state(twin, original)


# ---------------------------------------------------------------- 2. a failed load changes nothing

def _options(optimizer):
    """Every group's options, and its params by identity."""
    return [({k: v for k, v in g.items() if k != "params"}, list(map(id, g["params"])))
            for g in optimizer.param_groups]


def _checkpoint():
    params = _params()
    optimizer = Magma(params, lr=0.05)
    _steps(optimizer, params, 0, 2)
    return optimizer.state_dict()


@pytest.mark.parametrize("change,exc,match", [
    pytest.param(dict(keep_prob=1.5), ValueError, "keep_prob", id="keep_prob-1.5"),
    pytest.param(dict(mask="bogus"), ValueError, "mask", id="mask-bogus"),
    pytest.param(dict(amsgrad=True), ValueError, "amsgrad", id="amsgrad"),
    pytest.param(dict(maximize=True), ValueError, "maximize", id="maximize"),
])
def test_bad_loaded_group_changes_nothing(change, exc, match):
    _assert_load_refused_and_changes_nothing(change, exc, match)


def test_loaded_fused_group_over_cpu_params_is_refused_and_changes_nothing(extension_loaded):
    _assert_load_refused_and_changes_nothing(
        dict(fused=True), RuntimeError, "loaded parameter group 0: " + fused_over_cpu_refusal(extension_loaded))


def _assert_load_refused_and_changes_nothing(change, exc, match):
    state_dict = _checkpoint()
    state_dict["param_groups"][0].update(change)
    params = _params(seed=1)
    optimizer = Magma(params, lr=0.01, keep_prob=0.7)
    _steps(optimizer, params, 0, 1)
    before, groups_before = snapshot(optimizer), _options(optimizer)
    with pytest.raises(exc, match=match):
        optimizer.load_state_dict(state_dict)
    assert_snapshots_equal(snapshot(optimizer), before)
    assert _options(optimizer) == groups_before
    _steps(optimizer, params, 1, 1)  # still usable


@pytest.mark.parametrize("key,value,match", [
    pytest.param("exp_avg", torch.zeros(7, 7), r"exp_avg has shape \(7, 7\) but the parameter has shape \(4, 3\)",
                 id="exp_avg-shape"),
    pytest.param("magma_score", torch.zeros(3), "magma_score has 3", id="score-size"),
    pytest.param("master_param", torch.zeros(2), "master_param has shape", id="master-shape"),
])
def test_mismatched_state_shapes_are_named_and_change_nothing(key, value, match):
    state_dict = _checkpoint()
    state_dict["state"][0][key] = value
    params = _params()
    optimizer = Magma(params, lr=0.05)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=match):
        optimizer.load_state_dict(state_dict)
    assert_snapshots_equal(snapshot(optimizer), before)


def test_checkpoint_of_another_model_reports_the_shape_not_the_block():
    saved = Magma(_params(shapes=[(6, 2)]), lr=0.1)
    p = saved.param_groups[0]["params"][0]
    p.grad = torch.randn(6, 2)
    saved.step()
    target = Magma(_params(shapes=[(3, 4)]), lr=0.1)
    with pytest.raises(ValueError, match=r"shape \(6, 2\) but the parameter has shape \(3, 4\)"):
        target.load_state_dict(saved.state_dict())


# ---------------------------------------------------------------- 3. AdamW checkpoints

def test_adamw_checkpoint_continues_as_magma_mask_none():
    adam_params = _params()
    adamw = torch.optim.AdamW(adam_params, lr=0.02, weight_decay=0.1)
    _steps(adamw, adam_params, 0, 3)
    magma_params = [torch.nn.Parameter(p.detach().clone()) for p in adam_params]
    magma = Magma(magma_params, mask="none", lr=1.0, weight_decay=0.0)
    magma.load_state_dict(adamw.state_dict())
    group = magma.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["mask"]) == (0.02, 0.1, "none")
    for i, p in enumerate(magma_params):
        assert magma.state[p]["magma_tensor_index"] == i
        assert torch.equal(magma.state[p]["magma_score"], torch.full((1,), 0.5))
    _steps(adamw, adam_params, 3, 5)
    _steps(magma, magma_params, 3, 5)
    for a, m in zip(adam_params, magma_params):
        assert_scaled_close(m, a, "param")
        assert_scaled_close(magma.state[m]["exp_avg_sq"], adamw.state[a]["exp_avg_sq"], "exp_avg_sq")


def test_adamw_checkpoint_keeps_each_groups_magma_options():
    params = _params()
    adamw = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}], lr=0.02)
    _steps(adamw, params, 0, 2)
    magma = Magma([{"params": params[:2], "block": "row"}, {"params": params[2:], "magma": False}],
                  keep_prob=0.3)
    magma.load_state_dict(adamw.state_dict())
    assert magma.param_groups[0]["block"] == "row" and magma.param_groups[0]["magma"] is True
    assert magma.param_groups[1]["magma"] is False and magma.param_groups[1]["keep_prob"] == 0.3
    assert magma.state[params[0]]["magma_score"].shape == (4,)  # row blocks of a (4, 3) tensor
    _steps(magma, params, 2, 2)


def test_magma_checkpoint_loads_into_adamw():
    magma_params = _params()
    magma = Magma(magma_params, mask="none", lr=0.02)
    _steps(magma, magma_params, 0, 3)
    adam_params = [torch.nn.Parameter(p.detach().clone()) for p in magma_params]
    adamw = torch.optim.AdamW(adam_params, lr=0.02, weight_decay=0.0)
    adamw.load_state_dict(copy.deepcopy(magma.state_dict()))  # AdamW would share the tensors
    _steps(magma, magma_params, 3, 3)
    _steps(adamw, adam_params, 3, 3)
    for a, m in zip(adam_params, magma_params):
        assert_scaled_close(a, m, "param")


# ---------------------------------------------------------------- 4. a step saved as a number

def test_python_number_step_loads_as_a_tensor():
    params = _params()
    reference = Magma(params, lr=0.05, seed=5)
    _steps(reference, params, 0, 2)
    state_dict = copy.deepcopy(reference.state_dict())  # state_dict() shares the live state
    for state in state_dict["state"].values():
        state["step"] = float(state["step"].item())
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = Magma(copies, lr=0.05, seed=5)
    loaded.load_state_dict(state_dict)
    assert all(isinstance(loaded.state[p]["step"], torch.Tensor) for p in copies)
    _steps(reference, params, 2, 3)
    _steps(loaded, copies, 2, 3)
    _same_state(loaded, reference)


# ---------------------------------------------------------------- 5. named parameters

def test_named_parameters_are_accepted_and_kept():
    """Names are kept as torch.optim keeps them, and key the masks (docs/ALGORITHM.md section 4):
    plain tensors numbered with the same names follow the same trajectory."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    twin = copy.deepcopy(model)
    named = Magma(model.named_parameters(), lr=0.1, seed=2)
    magma_ext.number_parameters(twin.named_parameters())
    plain = Magma(twin.parameters(), lr=0.1, seed=2)
    assert named.param_groups[0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert named.state_dict()["param_groups"][0]["param_names"] == named.param_groups[0]["param_names"]
    for step in range(3):
        torch.manual_seed(step)
        model(torch.randn(5, 3)).square().sum().backward()
        torch.manual_seed(step)
        twin(torch.randn(5, 3)).square().sum().backward()
        named.step()
        plain.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_named_and_plain_params_do_not_mix():
    p, q = _params()[:2]
    with pytest.raises(TypeError, match="all tensors or all"):
        Magma([("p", p), q])


# ---------------------------------------------------------------- 6. tensor indices never reused

def test_removing_a_group_never_hands_out_a_live_index():
    params = _params()
    optimizer = Magma([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    _steps(optimizer, params, 0, 1)
    del optimizer.param_groups[0]
    newcomer = torch.nn.Parameter(torch.randn(6))
    optimizer.add_param_group({"params": [newcomer]})
    live = params[1:] + [newcomer]
    _steps(optimizer, live, 1, 1)
    indices = [optimizer.state[p]["magma_tensor_index"] for p in live]
    assert len(set(indices)) == len(indices), indices
    assert indices[:2] == [1, 2]  # the survivors keep theirs


# ---------------------------------------------------------------- 7. non-finite gradients

@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_grad_poisons_no_more_than_adamw(bad):
    shape = (6, 5)
    magma_param = torch.nn.Parameter(torch.randn(shape))
    adam_param = torch.nn.Parameter(magma_param.detach().clone())
    magma = Magma([magma_param], lr=0.01, keep_prob=1.0)
    adamw = torch.optim.AdamW([adam_param], lr=0.01, weight_decay=0.0)
    for step in range(4):
        grad = torch.randn(shape)
        if step == 1:
            grad[2, 3] = bad
        magma_param.grad, adam_param.grad = grad.clone(), grad.clone()
        magma.step()
        adamw.step()
    poisoned_magma = (~torch.isfinite(magma_param)).sum().item()
    poisoned_adamw = (~torch.isfinite(adam_param)).sum().item()
    assert poisoned_adamw >= 1
    assert poisoned_magma <= poisoned_adamw
    assert torch.isfinite(magma.state[magma_param]["magma_score"]).all()


# ---------------------------------------------------------------- 8. values checked where they enter

def test_numpy_seed_equals_int_seed():
    a_params, b_params = _params(), _params()
    a = Magma(a_params, lr=0.1, seed=np.int64(17))
    b = Magma(b_params, lr=0.1, seed=17)
    assert type(a.param_groups[0]["seed"]) is int
    _steps(a, a_params, 0, 3)
    _steps(b, b_params, 0, 3)
    _same_state(a, b)


@pytest.mark.parametrize("key,value,match", [
    pytest.param("mask", "bogus", "mask", id="mask-bogus"),
    pytest.param("keep_prob", 2.0, "keep_prob", id="keep_prob-2"),
    pytest.param("block", 0, "block", id="block-0"),
    pytest.param("lr", torch.tensor(-1.0), "lr", id="lr-negative-tensor"),
    pytest.param("exp_avg_dtype", torch.int8, "exp_avg_dtype", id="exp_avg_dtype-int8"),
    pytest.param("exp_avg_sq_dtype", torch.bfloat16, "exp_avg_sq_dtype", id="exp_avg_sq_dtype-changed"),
])
def test_values_written_into_param_groups_are_checked_before_a_step(key, value, match):
    params = _params()
    optimizer = Magma(params, lr=0.1)
    _steps(optimizer, params, 0, 1)
    optimizer.param_groups[0][key] = value
    for p, g in zip(params, _grads(1)):
        p.grad = g
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=match):
        optimizer.step()
    assert_snapshots_equal(snapshot(optimizer), before)


# ---------------------------------------------------------------- 9. no silent slow path

def test_cuda_params_without_the_extension_warn_once(monkeypatch):
    monkeypatch.setattr(functional, "_warned", set())
    monkeypatch.setattr(functional, "extension_error", lambda: "import magma_ext._C failed: X")
    with pytest.warns(UserWarning, match=r"PyTorch path.*import magma_ext._C failed: X.*pip install"):
        functional.warn_no_extension()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        functional.warn_no_extension()
