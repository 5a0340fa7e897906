"""Pipeline stages (torch.distributed.pipelining, gloo) against one process: Magma over each
stage's named parameters follows one Magma over the whole model.

The stages' gradients are the one-process run's bit for bit (the same micro-batches, backward in
the same order, one thread: ``pipeline_cases.single_process_run``), so the optimizers see equal
inputs and any difference is theirs: parameters and state must be equal, not close. Under FSDP2 a
block cut by the shards adds its partial sums across ranks in another order, which moves a score
by a few float32 ulps (and so the next gradients), so there gradients, parameters and state are
compared as in test_sharded_training.py (NOTE: [float32 tolerances against float64] in
helpers.py) and the parameters must move the same elements.

Without names a stage numbers its tensors from 0 and draws other masks:
tests/test_identity.py::test_without_names_a_stage_draws_other_masks shows it in one process.
"""

from __future__ import annotations

import pytest

import pipeline_cases as cases
import sharded_cases
from distributed_helpers import run_ranks
from helpers import assert_bitwise_equal, assert_scaled_close

pytestmark = pytest.mark.multiprocess

STEPS = 20
TIMEOUT = 600.0  # seconds: two shared cores, one torch start-up per rank
SCHEDULES = ("gpipe", "1f1b")
# Every base x mask x block on stages split as torchtitan splits, both schedules; then pipeline()'s
# traced split with names, and without names after numbering the whole model.
RUNS = [("copied", SCHEDULES[i % 2], combo) for i, combo in enumerate(sharded_cases.COMBOS)] + [
    ("traced", "gpipe", ("adam", "magma", "row")), ("traced-numbered", "1f1b", ("laprop", "skip", 7))]
FSDP_RUNS = [("gpipe", ("adam", "magma", "row")), ("1f1b", ("laprop", "skip", 7)),
             ("1f1b", ("rmsprop", "magma", "tensor"))]
FSDP_MICROBATCHES = 2


def _assert_stage_follows(stage_run, expected, what, exact):
    """One stage's gradients, parameters and state equal the one-process run's (``exact``) or
    follow them within tolerance, the parameters moving the same elements. Returns its names."""
    grads, params, state = stage_run
    names = list(params[0])
    expected_grads, expected_params, expected_state = expected
    same = assert_bitwise_equal if exact else assert_scaled_close
    for step, (got, want) in enumerate(zip(grads, expected_grads), start=1):
        for name in names:
            same(got[name], want[name], f"{what}: gradient of {name} at step {step}")
    if exact:
        for step, (got, want) in enumerate(zip(params, expected_params), start=1):
            for name in names:
                assert_bitwise_equal(got[name], want[name], f"{what}: {name} after step {step}")
    else:
        sharded_cases.assert_same_history([[p[name] for name in names] for p in params],
                                          [[p[name] for name in names] for p in expected_params], what)
    for name in names:
        assert state[name].keys() == expected_state[name].keys(), f"{what}: state keys of {name}"
        for key, value in state[name].items():
            check = assert_bitwise_equal if key == "magma_tensor_index" else same
            check(value, expected_state[name][key], f"{what}: {key} of {name}")
    return names


def test_two_stages_follow_the_whole_model():
    results = run_ranks(2, cases.pipeline_body, RUNS, STEPS, timeout=TIMEOUT)
    for run in RUNS:
        split, _, combo = run
        expected = cases.single_process_run(combo, STEPS, named=split != "traced-numbered")
        names = [_assert_stage_follows(result[run], expected, f"{run}, stage {rank}", exact=True)
                 for rank, result in enumerate(results)]
        assert sorted(names[0] + names[1]) == sorted(expected[1][0]), f"{run}: each parameter on one stage"


def test_two_stages_of_two_fsdp2_shards_follow_the_whole_model():
    results = run_ranks(4, cases.pipeline_fsdp_body, FSDP_RUNS, STEPS, FSDP_MICROBATCHES, timeout=TIMEOUT)
    for run in FSDP_RUNS:
        expected = cases.single_process_run(run[1], STEPS, microbatches=FSDP_MICROBATCHES, dp_size=2)
        for rank, result in enumerate(results):  # ranks 0, 1: stage 0; ranks 2, 3: stage 1
            names = _assert_stage_follows(result[run], expected, f"pp x FSDP2 {run}, rank {rank}", exact=False)
            assert names[0] == ("embed.weight" if rank < 2 else "layers.2.0.weight"), (rank, names)
