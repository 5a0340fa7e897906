"""Invalid inputs, as data: each row is (keyword arguments, exception type, message regex).

The regex names the offending argument, so a message that blames the wrong one fails.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_snapshots_equal, fused_over_cpu_refusal, snapshot
from magma_ext import Magma


def _param(*shape, dtype=torch.float32):
    return torch.nn.Parameter(torch.randn(shape).to(dtype))


def _err(id_, kwargs, exc, match):
    return pytest.param(kwargs, exc, match, id=id_)


# Options that are invalid wherever they appear: constructor keyword or param-group entry.
BAD_OPTIONS = [
    _err("lr-negative", dict(lr=-1e-3), ValueError, "lr"),
    _err("betas0-is-1", dict(betas=(1.0, 0.999)), ValueError, "betas"),
    _err("betas0-negative", dict(betas=(-0.1, 0.999)), ValueError, "betas"),
    _err("betas1-is-1", dict(betas=(0.9, 1.0)), ValueError, "betas"),
    _err("betas1-negative", dict(betas=(0.9, -0.5)), ValueError, "betas"),
    _err("eps-negative", dict(eps=-1e-8), ValueError, "eps"),
    _err("weight_decay-negative", dict(weight_decay=-0.1), ValueError, "weight_decay"),
    _err("keep_prob-negative", dict(keep_prob=-0.1), ValueError, "keep_prob"),
    _err("keep_prob-above-1", dict(keep_prob=1.1), ValueError, "keep_prob"),
    _err("keep_prob-0-with-skip", dict(keep_prob=0.0, mask="skip"), ValueError, "keep_prob"),
    _err("keep_prob-0-with-magma", dict(keep_prob=0.0, mask="magma"), ValueError, "keep_prob.*no masked weight"),
    _err("keep_prob-0-by-default-mask", dict(keep_prob=0), ValueError, "keep_prob.*mask='magma'"),
    _err("tau-zero", dict(tau=0.0), ValueError, "tau"),
    _err("tau-negative", dict(tau=-2.0), ValueError, "tau"),
    _err("score_ema-negative", dict(score_ema=-0.1), ValueError, "score_ema"),
    _err("score_ema-above-1", dict(score_ema=1.5), ValueError, "score_ema"),
    _err("seed-negative", dict(seed=-1), ValueError, "seed"),
    _err("seed-2**64", dict(seed=2**64), ValueError, "seed"),
    _err("seed-float", dict(seed=1.0), TypeError, "seed"),
    _err("seed-str", dict(seed="x"), TypeError, "seed"),
    _err("block-0", dict(block=0), ValueError, "block"),
    _err("block-negative", dict(block=-3), ValueError, "block"),
    _err("block-float", dict(block=2.5), TypeError, "block"),
    _err("block-col", dict(block="col"), ValueError, "block"),
    _err("block-bool", dict(block=True), TypeError, "block"),
    _err("base-sgd", dict(base="sgd"), ValueError, "base"),
    _err("mask-foo", dict(mask="foo"), ValueError, "mask"),
    _err("exp_avg_dtype-int8", dict(exp_avg_dtype=torch.int8), ValueError, "exp_avg_dtype"),
    _err("exp_avg_dtype-str", dict(exp_avg_dtype="bfloat16"), ValueError, "exp_avg_dtype"),
    _err("exp_avg_dtype-float16", dict(exp_avg_dtype=torch.float16), ValueError, "exp_avg_dtype"),
    _err("exp_avg_dtype-None", dict(exp_avg_dtype=None), ValueError, "exp_avg_dtype"),
    _err("exp_avg_sq_dtype-int8", dict(exp_avg_sq_dtype=torch.int8), ValueError, "exp_avg_sq_dtype"),
    _err("exp_avg_sq_dtype-str", dict(exp_avg_sq_dtype="torch.bfloat16"), ValueError, "exp_avg_sq_dtype"),
    _err("exp_avg_sq_dtype-float64", dict(exp_avg_sq_dtype=torch.float64), ValueError, "exp_avg_sq_dtype"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_OPTIONS)
def test_constructor_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Magma([_param(3, 2)], **kwargs)


def test_constructor_rejects_fused_over_cpu_params(extension_loaded):
    with pytest.raises(RuntimeError, match=fused_over_cpu_refusal(extension_loaded)):
        Magma([_param(3, 2)], fused=True)


def test_add_param_group_rejects_fused_over_cpu_params_and_changes_nothing(extension_loaded):
    optimizer = Magma([_param(3, 2)], lr=0.1)
    before = snapshot(optimizer)
    with pytest.raises(RuntimeError, match="parameter group 1: " + fused_over_cpu_refusal(extension_loaded)):
        optimizer.add_param_group({"params": [_param(4)], "fused": True})
    assert len(optimizer.param_groups) == 1
    assert_snapshots_equal(snapshot(optimizer), before)


GROUP_ONLY = [
    _err("magma-not-bool", dict(magma="yes"), TypeError, "magma"),
]


@pytest.mark.parametrize("group_options,exc,match", BAD_OPTIONS + GROUP_ONLY)
def test_add_param_group_rejects_and_changes_nothing(group_options, exc, match):
    kept = _param(3, 2)
    optimizer = Magma([kept], lr=0.1)
    kept.grad = torch.randn(3, 2)
    optimizer.step()
    before = snapshot(optimizer)
    groups_before = len(optimizer.param_groups)
    with pytest.raises(exc, match=match):
        optimizer.add_param_group({"params": [_param(4)], **group_options})
    assert len(optimizer.param_groups) == groups_before
    assert_snapshots_equal(snapshot(optimizer), before)


@pytest.mark.parametrize("group_options,exc,match", BAD_OPTIONS[:3] + GROUP_ONLY)
def test_constructor_rejects_bad_second_group(group_options, exc, match):
    with pytest.raises(exc, match=match):
        Magma([{"params": [_param(2)]}, {"params": [_param(3)], **group_options}])


def _twice_in_one_list():
    p = _param(2)
    return [p, _param(3), p]


def _twice_across_groups():
    p = _param(2)
    return [{"params": [p]}, {"params": [_param(3), p]}]


BAD_PARAMS = [
    pytest.param(_twice_in_one_list, ValueError, "more than once|duplicate|twice", id="listed-twice"),
    pytest.param(_twice_across_groups, ValueError, "more than one|more than once|duplicate|twice",
                 id="twice-across-groups"),
    pytest.param(lambda: [_param(2), _param(2, dtype=torch.complex64)], TypeError, "complex", id="complex-param"),
]


@pytest.mark.parametrize("make_params,exc,match", BAD_PARAMS)
def test_constructor_rejects_bad_params(make_params, exc, match):
    with pytest.raises(exc, match=match):
        Magma(make_params())


def test_add_param_group_rejects_param_already_present():
    p = _param(2)
    optimizer = Magma([p, _param(3)])
    with pytest.raises(ValueError):
        optimizer.add_param_group({"params": [_param(4), p]})
    assert len(optimizer.param_groups) == 1


# Boundary values that are valid: validation must not be stricter than ALGORITHM.md.
VALID_EDGES = [
    pytest.param(dict(lr=0.0), id="lr-0"),
    pytest.param(dict(lr=torch.tensor(0.01)), id="lr-tensor"),
    pytest.param(dict(betas=(0.0, 0.0)), id="betas-0"),
    pytest.param(dict(eps=0.0), id="eps-0"),
    pytest.param(dict(keep_prob=1.0, mask="skip"), id="keep_prob-1-skip"),
    pytest.param(dict(keep_prob=0.0, mask="none"), id="keep_prob-0-none"),
    pytest.param(dict(score_ema=0.0), id="score_ema-0"),
    pytest.param(dict(score_ema=1.0), id="score_ema-1"),
    pytest.param(dict(tau=1e-3), id="tau-small"),
    pytest.param(dict(seed=2**64 - 1), id="seed-max"),
    pytest.param(dict(block=1), id="block-1"),
    pytest.param(dict(block=10**6), id="block-huge"),
    pytest.param(dict(fused=False), id="fused-False"),
    pytest.param(dict(exp_avg_dtype=torch.bfloat16), id="exp_avg_dtype-bfloat16"),
    pytest.param(dict(exp_avg_sq_dtype=torch.bfloat16), id="exp_avg_sq_dtype-bfloat16"),
    pytest.param(dict(exp_avg_dtype=torch.float32, exp_avg_sq_dtype=torch.float32), id="state-dtypes-float32"),
]


@pytest.mark.parametrize("kwargs", VALID_EDGES)
def test_valid_edges_are_accepted(kwargs):
    p = _param(3, 2)
    optimizer = Magma([p], **kwargs)
    p.grad = torch.randn(3, 2)
    optimizer.step()
    assert torch.isfinite(p).all()
    assert optimizer.state[p]["step"].item() == 1


# ---------------------------------------------------------------- errors at step()


def _sparse_grad(p):
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), p.shape, check_invariants=True)


def _complex_grad(p):
    # A real param cannot hold a complex grad, so the tensor turns complex after construction.
    p.data = torch.randn(p.shape, dtype=torch.complex64)
    p.grad = torch.randn(p.shape, dtype=torch.complex64)


@pytest.mark.parametrize("where", ["same-group", "later-group"])
@pytest.mark.parametrize("make_bad,match", [
    pytest.param(_sparse_grad, "sparse", id="sparse-grad"),
    pytest.param(_complex_grad, "complex|real", id="complex-grad"),
])
def test_bad_grad_at_step_changes_nothing(make_bad, match, where):
    good, bad = _param(4, 3), _param(5)
    groups = [{"params": [good, bad]}] if where == "same-group" else [{"params": [good]}, {"params": [bad]}]
    optimizer = Magma(groups, lr=0.1, mask="skip", keep_prob=1.0)
    good.grad, bad.grad = torch.randn(4, 3), torch.randn(5)
    optimizer.step()
    good.grad = torch.randn(4, 3)
    make_bad(bad)
    before = snapshot(optimizer)
    with pytest.raises(TypeError, match=match):
        optimizer.step()
    assert_snapshots_equal(snapshot(optimizer), before)
