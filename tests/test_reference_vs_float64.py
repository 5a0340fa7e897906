"""The optimizer (CPU, reference path) against the independent float64 oracle, every state tensor.

Every base x mask x block combination runs 24 steps over tensors of odd shapes (including a
one-element and an empty tensor), with fresh random gradients each step and weight decay on.
Tolerances: see NOTE [float32 tolerances against float64] in conftest.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import float64_magma as oracle
from helpers import assert_scaled_close
from magma_ext import Magma

SHAPES = [(5, 7), (13,), (3, 4, 5), (1,), (0,), (2, 1, 3)]
STEPS = 24
BASES = ["adam", "rmsprop", "laprop"]
MASKS = ["magma", "skip", "none"]
BLOCKS = [pytest.param("tensor", id="tensor"), pytest.param("row", id="row"), pytest.param(7, id="int7")]

OPTIONS = dict(lr=0.03, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1, keep_prob=0.5,
               tau=2.0, score_ema=0.9, seed=20260217)


def _run_and_compare(groups_options: list[dict], shapes_per_group: list[list[tuple]], steps: int = STEPS,
                     grad_none_at: set[tuple[int, int]] = frozenset()):
    """Step Magma and the oracle side by side; compare params and all state after every step.

    ``grad_none_at`` holds (step, param position) pairs whose grad is None at that step.
    """
    gen = torch.Generator().manual_seed(1234)
    inits = [[torch.randn(s, generator=gen) for s in shapes] for shapes in shapes_per_group]
    params = [[torch.nn.Parameter(x.clone()) for x in group] for group in inits]
    optimizer = Magma([{"params": ps, **o} for ps, o in zip(params, groups_options)])
    reference = oracle.Float64Magma([{"params": xs, **o} for xs, o in zip(inits, groups_options)])
    flat = [p for group in params for p in group]

    for step in range(1, steps + 1):
        grads = []
        for position, p in enumerate(flat):
            if (step, position) in grad_none_at:
                p.grad = None
                grads.append(None)
            else:
                p.grad = torch.randn(p.shape, generator=gen)
                grads.append(p.grad.clone())
        optimizer.step()
        reference.step(grads)

        for position, (p, ref) in enumerate(zip(flat, reference.params)):
            where = f"step {step}, param {position} {tuple(p.shape)}"
            assert_scaled_close(p, ref.param, f"{where} param")
            state = optimizer.state[p]
            if ref.step == 0:
                assert len(state) == 0, where
                continue
            assert state["step"].dtype == torch.float32 and state["step"].shape == ()
            assert state["step"].item() == ref.step, where
            assert state["magma_tensor_index"] == ref.tensor_index, where
            for key in ("exp_avg", "exp_avg_sq", "magma_score"):
                assert state[key].dtype == torch.float32, f"{where} {key}"
            assert_scaled_close(state["exp_avg"], ref.exp_avg, f"{where} exp_avg")
            assert_scaled_close(state["exp_avg_sq"], ref.exp_avg_sq, f"{where} exp_avg_sq")
            assert state["magma_score"].shape == (len(ref.magma_score),), where
            assert_scaled_close(state["magma_score"], torch.tensor(ref.magma_score, dtype=torch.float64),
                                f"{where} magma_score")
    return optimizer, reference


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("base", BASES)
def test_matches_float64(base, mask, block):
    _run_and_compare([dict(OPTIONS, base=base, mask=mask, block=block)], [SHAPES])


def test_oracle_masks_are_not_trivial():
    """Guard for the test above: over its run some blocks are kept and some dropped each step."""
    kept = [oracle.keep_block(OPTIONS["seed"], t, b, s, 0.5) for t, b, s in itertools.product(range(6), range(9), range(1, 25))]
    assert 0.4 < sum(kept) / len(kept) < 0.6


# keep_prob=0 is invalid with masks "magma" and "skip" (see test_validation).
@pytest.mark.parametrize("mask,keep_prob", [
    pytest.param(mask, p, id=f"{mask}-p={p}")
    for mask, p in [("magma", 0.3), ("magma", 1.0), ("skip", 0.3), ("skip", 1.0)]
])
def test_matches_float64_keep_prob(mask, keep_prob):
    _run_and_compare([dict(OPTIONS, mask=mask, keep_prob=keep_prob, block=3)], [SHAPES], steps=8)


@pytest.mark.parametrize("tau,score_ema", [(0.5, 0.0), (2.0, 1.0), (10.0, 0.5)], ids=["tau0.5-ema0", "tau2-ema1", "tau10-ema0.5"])
def test_matches_float64_score_options(tau, score_ema):
    _run_and_compare([dict(OPTIONS, tau=tau, score_ema=score_ema, block="row")], [SHAPES], steps=8)


def test_matches_float64_several_groups_and_missing_grads():
    """Per-group options, tensor indices counted across groups, and params that skip some steps."""
    groups = [
        dict(OPTIONS, base="laprop", mask="magma", block="row", keep_prob=0.7),
        dict(OPTIONS, base="adam", mask="skip", block=2, keep_prob=0.4, seed=5, lr=0.01),
        dict(OPTIONS, base="rmsprop", mask="magma", block="tensor", magma=False, weight_decay=0.0),
    ]
    shapes = [[(4, 3), (6,)], [(3, 3), (0,), (5,)], [(2, 2), (7,)]]
    # Param 1 has no grad on its first three steps, param 4 on every even step.
    missing = {(s, 1) for s in (1, 2, 3)} | {(s, 4) for s in range(2, 13, 2)}
    _run_and_compare(groups, shapes, steps=12, grad_none_at=missing)
