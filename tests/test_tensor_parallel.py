"""Magma under DTensor tensor parallelism, alone and with FSDP2 over it on a 2-D mesh (gloo, CPU),
against one process; DCP checkpoints across those layouts; layouts it refuses.

As in test_sharded_training.py, every run must give at every step the parameters one process
gives, up to the order in which float32 sums are added (of a split block's partial sums, and of
the row-parallel matmul's all-reduce), which NOTE: [float32 tolerances against float64] in
helpers.py bounds far below RTOL; the elements that move at each step must be the same (the
same masks), and so must the final scores.
"""

from __future__ import annotations

import pytest
import torch

import tp_cases as cases
from distributed_helpers import run_ranks
from helpers import assert_scaled_close
from magma_ext.placements import cuts_of
from sharded_cases import assert_same_history

STEPS = 20
_expected = {}


def expected(combo, steps=STEPS):
    if (combo, steps) not in _expected:
        _expected[(combo, steps)] = cases.single_process_run(combo, steps)
    return _expected[(combo, steps)]


def check(results, what):
    for key in results[0]:
        combo = key[0]
        history, scores = expected(combo)
        for rank, result in enumerate(results):
            got_history, got_scores = result[key]
            assert_same_history(got_history, history, f"{what} rank {rank} {key}")
            for i, (a, e) in enumerate(zip(got_scores, scores)):
                assert_scaled_close(a, e, f"{what} rank {rank} {key}: score of parameter {i}")


@pytest.mark.multiprocess
def test_fsdp2_over_tensor_parallel_dp2_tp2_follows_one_process():
    """Every base x mask x block, sequence-parallel norms; and plain (not parallelized) norms."""
    runs = [(combo, True) for combo in cases.COMBOS]
    runs += [(("adam", "magma", block), False) for block in cases.BLOCKS]
    check(run_ranks(4, cases.layout_body, 2, 2, runs, STEPS, timeout=900), "dp2 x tp2")


@pytest.mark.multiprocess
def test_tensor_parallel_alone_tp2_follows_one_process():
    runs = [(combo, True) for combo in cases.COMBOS] + [(("laprop", "magma", "row"), False)]
    check(run_ranks(2, cases.layout_body, 1, 2, runs, STEPS, timeout=600), "tp2")


@pytest.mark.multiprocess
def test_dcp_checkpoint_of_dp2_tp2_resumes_on_dp4_and_on_one_process(tmp_path):
    first, rest = 6, 6
    paths = {block: str(tmp_path / str(block)) for block in cases.BLOCKS}
    saved = run_ranks(4, cases.dcp_save_body, 2, 2, paths, first, timeout=600)
    for block in cases.BLOCKS:
        history, _ = expected(("adam", "magma", block), first + rest)
        assert_same_history(saved[0][block], history[:first], f"dp2 x tp2 before the checkpoint, {block}")
    for dp in (4, 1):
        resumed = run_ranks(dp, cases.dcp_resume_body, dp, 1, paths, first, rest, timeout=600)
        for block in cases.BLOCKS:
            history, _ = expected(("adam", "magma", block), first + rest)
            assert_same_history(resumed[0][block], history[first:], f"resumed on dp{dp}, {block}")


@pytest.mark.multiprocess
def test_a_group_over_mesh_dimensions_that_are_not_the_world_is_made_once():
    for rank, (ranks, total, cached) in enumerate(run_ranks(4, cases.group_body)):
        pair = [0, 1] if rank < 2 else [2, 3]
        assert ranks == pair and total == sum(pair) and cached, (rank, ranks, total)


@pytest.mark.multiprocess
def test_layouts_pieces_cannot_express_are_refused_on_every_rank_with_nothing_changed():
    from torch.distributed.tensor import Partial, Shard

    refused = [  # placements, shape, block, what the message must say
        ((Shard(1),), (4, 6), 7, "would cut across them"),
        ((Shard(1),), (4, 5), "row", "unequal widths"),
        ((Shard(2),), (2, 3, 4), "row", "they cut dimension 2"),
        ((Partial(),), (4, 6), "tensor", "Partial"),
    ]
    results = run_ranks(2, cases.refused_body, 2, [case[:3] for case in refused])
    for i, (placements, shape, block, reason) in enumerate(refused):
        messages = {result[i][0] for result in results}
        assert len(messages) == 1, f"case {i}: the ranks raised different errors: {messages}"
        message = messages.pop()
        assert "'layer.weight'" in message and repr(placements[0]) in message and reason in message, message
        assert f"block={block!r}" in message or block == "tensor", message
        assert all(result[i][1] for result in results), f"case {i}: something changed"


@pytest.mark.parametrize("placements,mesh_shape,match", [
    pytest.param("S0 SS0", (2, 2), "is cut before it", id="strided-after-a-shard-of-its-dim"),
    pytest.param("SS0(3) S0", (2, 2), "split factor 3", id="strided-with-a-wrong-split-factor"),
])
def test_placements_fsdp2_does_not_write_are_refused(placements, mesh_shape, match):
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    spelled = {"S0": Shard(0), "SS0": _StridedShard(0, split_factor=2), "SS0(3)": _StridedShard(0, split_factor=3)}
    with pytest.raises(ValueError, match=match):
        cuts_of([spelled[p] for p in placements.split()], mesh_shape, "parameter 'w': ")


def test_boxes_of_fsdp2_over_tensor_parallel_tile_the_tensor_as_torch_lays_them_out():
    """FSDP2 over TP: the tp shard first, the dp shard inside it (torch.chunk both times); the
    rank order of the example in torch's _StridedShard docstring, and uneven sizes."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    cuts = cuts_of([_StridedShard(0, split_factor=2), Shard(0)], (2, 2), "")
    assert [cuts.box((8, 8), (d, t))[0] for d in range(2) for t in range(2)] == [(0, 2), (4, 6), (2, 4), (6, 8)]
    assert [cuts.box((10, 6), (d, t))[0] for d in range(2) for t in range(2)] == [(0, 3), (5, 8), (3, 5), (8, 10)]
    assert cuts.mesh_dims == (0, 1) and cuts.cut_dims == (0,) and not cuts.has_empty_shard((10, 6))
    assert cuts_of([_StridedShard(0, split_factor=2), Shard(0)], (2, 2), "").has_empty_shard((3,))
    rowwise = cuts_of([Shard(0), Shard(1)], (2, 2), "")
    assert rowwise.box((6, 10), (1, 0)) == ((3, 6), (0, 5)) and rowwise.parts(1) == 2
