"""Sharded Magma on several processes (gloo, CPU) against one process: same masks, same numbers.

Every sharded run here must give, at every step, the parameters a single process gives (the
masks then agree too: a kept block moves by about lr, a masked one not at all); the only
difference allowed is the order in which the partial sums of a split block are added, which
moves a score by a few float32 ulps (NOTE: [float32 tolerances against float64] in helpers.py
bounds that far below RTOL).
"""

from __future__ import annotations

import re

import pytest
import torch

import sharded_cases as cases
from distributed_helpers import RankError, run_ranks
from helpers import assert_scaled_close

STEPS = 20


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [2, 4])
def test_flat_shards_follow_the_single_process_run(world_size):
    results = run_ranks(world_size, cases.flat_shard_body, world_size, cases.COMBOS, STEPS)
    for combo in cases.COMBOS:
        expected, final = cases.single_process_run(combo, STEPS)
        cases.assert_same_history(cases.assemble(results, combo), expected, f"{combo}, {world_size} ranks")
        for result in results:  # moments and the scores of every block a piece touches
            ranges, _, states = result[combo]
            for index, ((lo, hi), state) in enumerate(zip(ranges, states)):
                whole = final[index]
                for key in ("exp_avg", "exp_avg_sq"):
                    assert_scaled_close(state[key], whole[key].reshape(-1)[lo:hi], f"{combo} {key} {index}")
                if hi > lo:
                    size = _block_size(cases.SHAPES[index], combo[2])
                    blocks = slice(lo // size, (hi - 1) // size + 1)
                    assert_scaled_close(state["magma_score"], whole["magma_score"][blocks], f"{combo} score {index}")


def _block_size(shape, block):
    from magma_ext.layout import block_size_for

    return block_size_for(tuple(shape), block)


@pytest.mark.multiprocess
def test_ddp_follows_the_single_process_run():
    combos = [("adam", "magma", "tensor"), ("laprop", "skip", "row"), ("rmsprop", "magma", 7)]
    results = run_ranks(2, cases.ddp_body, 2, combos, STEPS)
    for combo in combos:
        expected = cases.single_process_model_run(combo, STEPS)
        for result in results:
            cases.assert_same_history(result[combo], expected, f"DDP {combo}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size,hsdp,combos", [
    pytest.param(2, False, cases.COMBOS, id="fsdp2-2-ranks-every-combo"),
    pytest.param(4, False, [("adam", "magma", b) for b in cases.BLOCKS] + [("laprop", "skip", "row")],
                 id="fsdp2-4-ranks-empty-shards"),
    pytest.param(4, True, [("adam", "magma", "tensor"), ("rmsprop", "magma", "row")], id="hsdp-2x2"),
])
def test_fsdp2_follows_the_single_process_run(world_size, hsdp, combos):
    results = run_ranks(world_size, cases.fsdp_body, world_size, combos, STEPS, hsdp)
    for combo in combos:
        expected = cases.single_process_model_run(combo, STEPS)
        history, scores = results[0][combo]
        cases.assert_same_history(history, expected, f"FSDP2 {world_size} ranks {combo}")
        for rank, result in enumerate(results[1:], start=1):  # empty shards included
            assert all(torch.equal(a, b) for a, b in zip(result[combo][1], scores)), f"rank {rank}: {combo}"


@pytest.mark.multiprocess
@pytest.mark.parametrize("resume_world_size", [1, 4])
@pytest.mark.parametrize("block", ["tensor", "row", 7], ids=str)
def test_dcp_checkpoint_of_2_ranks_resumes_on_another_count(tmp_path, block, resume_world_size):
    combo, first, rest = ("adam", "magma", block), 6, 6
    expected = cases.single_process_model_run(combo, first + rest)
    saved = run_ranks(2, cases.dcp_save_body, 2, combo, first, str(tmp_path))
    cases.assert_same_history(saved[0], expected[:first], "before the checkpoint")
    resumed = run_ranks(resume_world_size, cases.dcp_resume_body, resume_world_size, combo, first, rest, str(tmp_path))
    cases.assert_same_history(resumed[0], expected[first:], f"resumed on {resume_world_size} ranks")


@pytest.mark.multiprocess
def test_zero_redundancy_optimizer_with_numbered_parameters():
    history = run_ranks(2, cases.zero_redundancy_body, 2, STEPS, True)
    expected, _ = cases.single_process_run(("adam", "magma", "tensor"), STEPS)
    for result in history:
        cases.assert_same_history(result, expected, "ZeroRedundancyOptimizer")


@pytest.mark.multiprocess
def test_zero_redundancy_optimizer_without_numbering_is_refused_on_every_rank():
    with pytest.raises((ValueError, RankError), match="number_parameters"):
        run_ranks(2, cases.zero_redundancy_body, 2, 1, False)


@pytest.mark.multiprocess
@pytest.mark.parametrize("case,match", [
    pytest.param("overlap", "overlap", id="overlapping-pieces"),
    pytest.param("shape", "logical shape", id="shapes-disagree"),
    pytest.param("kind", "tensor index 0", id="one-index-two-tensors"),
])
def test_bad_pieces_raise_on_every_rank_and_change_nothing(case, match):
    results = run_ranks(2, cases.bad_piece_body, 2, case)
    for rank, result in enumerate(results):
        assert result is not None, f"rank {rank} did not raise"
        kind, message, unchanged = result
        assert kind == "ValueError" and re.search(match, message), (rank, message)
        assert unchanged, f"rank {rank}: state or parameters changed"
    assert results[0][1] == results[1][1]  # the same message everywhere


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size,block,reason", [
    pytest.param(2, 7, "would cut across them", id="N-element-blocks-across-column-slices"),
    pytest.param(4, "row", "unequal widths", id="row-blocks-of-unequal-column-slices"),
])
def test_dtensor_sharded_along_dim_1_into_blocks_pieces_cannot_express_is_refused(world_size, block, reason):
    for message, unchanged in run_ranks(world_size, cases.shard_dim_1_body, world_size, block, 1):
        assert "'encoder.weight'" in message and "Shard(dim=1)" in message and reason in message, message
        assert unchanged


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size,block", [(4, "tensor"), (2, "row")], ids=str)
def test_dtensor_sharded_along_dim_1_follows_one_process(world_size, block):
    """Tensor blocks of any shards; row blocks of equal column slices (6 columns on 2 ranks)."""
    results = run_ranks(world_size, cases.shard_dim_1_body, world_size, block, STEPS)
    expected, _ = cases.single_process_run(("adam", "magma", block), STEPS, shapes=[(5, 6)], names=["encoder.weight"])
    for result in results:
        cases.assert_same_history(result, expected, f"Shard(1), {world_size} ranks, block={block!r}")


def test_exchange_rows_follow_the_fused_paths_order(monkeypatch):
    """The fused path fills block_sums sub-list by sub-list (one per parameter dtype), so the
    exchange must be told the pieces in that order, not in the group's."""
    import torch.distributed as dist

    from magma_ext import Magma, declare_piece, functional, plan as plan_module

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        dtypes = [torch.float32, torch.bfloat16, torch.float32]
        params = [torch.nn.Parameter(torch.randn(6, dtype=dtype)) for dtype in dtypes]
        for index, p in enumerate(params):
            declare_piece(p, index=10 + index, offset=0, shape=(6,), group=dist.group.WORLD)
        captured = []
        monkeypatch.setattr(functional, "use_fused", lambda fused, params: True)  # plan as on a GPU
        monkeypatch.setattr(plan_module.BlockSumExchange, "build",
                            classmethod(lambda cls, records, device, groups=(): captured.append(records)))
        optimizer = Magma(params)
        for p in params:
            p.grad = torch.randn_like(p)
        ((_, group_plan, _),) = optimizer._planner.plan(optimizer.param_groups, optimizer.state, [])
        assert group_plan.devices[0].plan.row_order == [0, 2, 1]
        assert [record.piece.index for record in captured[0]] == [10, 12, 11]
    finally:
        dist.destroy_process_group()
