"""Data parallelism 8 on CPU (gloo): the equality tests of sharded training, of Megatron-style
pieces and of the sparse parameter sync at 8 ranks, against one process. (The 8-GPU
measurements of the same features need a machine kind not lent so far.)"""

from __future__ import annotations

import pytest

import megatron_cases
import sharded_cases as cases
import tp_cases
from distributed_helpers import run_ranks
from sparse_gather_cases import EXACT_ROUTES, sync_body

pytestmark = pytest.mark.multiprocess

EIGHT = 8
STEPS = 20
COMBOS = [("adam", "magma", "tensor"), ("adam", "magma", "row"), ("rmsprop", "skip", 7), ("laprop", "magma", 7)]


def test_fsdp2_on_8_ranks_follows_the_single_process_run():
    results = run_ranks(EIGHT, cases.fsdp_body, EIGHT, COMBOS, STEPS, timeout=600)
    for combo in COMBOS:
        expected = cases.single_process_model_run(combo, STEPS)
        cases.assert_same_history(results[0][combo][0], expected, f"FSDP2 8 ranks {combo}")


def test_hsdp_over_tensor_parallel_2x2x2_follows_one_process():
    """(Replicate(), _StridedShard(0, sf=2), Shard(0)): pieces exchanged over a group made for the
    (dp, tp) ranks of each replica."""
    runs = [(combo, True) for combo in COMBOS]
    results = run_ranks(EIGHT, tp_cases.layout_body, 2, 2, runs, STEPS, 2, timeout=900)
    for key in results[0]:
        history, scores = tp_cases.single_process_run(key[0], STEPS)
        cases.assert_same_history(results[0][key][0], history, f"HSDP x TP {key}")


def test_flat_pieces_on_8_ranks_follow_the_single_process_run():
    results = run_ranks(EIGHT, cases.flat_shard_body, EIGHT, COMBOS, STEPS, timeout=600)
    for combo in COMBOS:
        expected, _ = cases.single_process_run(combo, STEPS)
        cases.assert_same_history(cases.assemble(results, combo), expected, f"8 ranks {combo}")


def test_megatron_dp8_and_tp2_dp4_pieces_follow_one_process():
    for tp_size in (1, 2):
        results = run_ranks(EIGHT, megatron_cases.tp_dp_body, EIGHT, tp_size, True, megatron_cases.COMBOS,
                            megatron_cases.STEPS, timeout=600)
        megatron_cases.check_tp_dp_run(results, tp_size)


@pytest.mark.parametrize("route", ["in place", "packed views", "packed chunks"])
def test_the_sparse_sync_on_8_ranks_equals_a_dense_gather(route):
    results = run_ranks(EIGHT, sync_body, EIGHT, 8, 6, route, timeout=600)
    for step in zip(*results):
        moved = sum(sent for sent, _, _, _ in step) if route in EXACT_ROUTES else EIGHT * step[0][0]
        assert all(sent + received == moved for sent, received, _, _ in step)
