"""magma_ext.megatron's piece mapping, without megatron-core: Megatron's tensor-parallel cuts and
distributed-optimizer ranges, declared as pieces on gloo ranks, step as one process does; and
the scores carried through checkpoints."""

from __future__ import annotations

import pytest

import megatron_cases as cases
from distributed_helpers import run_ranks
from magma_ext.megatron.layout import (
    TensorParallelSlice, is_paper_masked, logical_shape, piece_arguments, stable_name)

GROUPS = dict(split_group="SPLIT", replica_group="REPLICA")


def test_column_parallel_slices_are_contiguous_ranges_of_the_logical_tensor():
    tp = TensorParallelSlice(partition_dim=0, rank=1, size=2)
    assert logical_shape((4, 6), tp) == (8, 6)
    assert piece_arguments(3, (4, 6), 5, 20, tp, **GROUPS) == dict(
        index=3, offset=24 + 5, shape=(8, 6), group="SPLIT")


def test_row_parallel_slices_are_column_slices():
    tp = TensorParallelSlice(partition_dim=1, rank=1, size=4)
    assert logical_shape((6, 2), tp) == (6, 8)
    assert piece_arguments(2, (6, 2), 3, 9, tp, **GROUPS) == dict(
        index=2, offset=3, shape=(6, 8), group="SPLIT", split=(1, 4))


def test_replicated_tensors_are_pieces_over_the_replica_group_only():
    tp = TensorParallelSlice(partition_dim=None, rank=1, size=2)
    assert piece_arguments(0, (6,), 2, 4, tp, **GROUPS) == dict(index=0, offset=2, shape=(6,), group="REPLICA")
    whole = piece_arguments(0, (6,), 0, 6, tp, split_group="SPLIT", replica_group=None)
    assert whole == dict(index=0, offset=0, shape=(6,), group=None)
    one_rank = TensorParallelSlice(partition_dim=0, rank=0, size=1)  # TP=1: nothing is split
    assert piece_arguments(1, (4, 6), 0, 24, one_rank, **GROUPS)["group"] == "REPLICA"


@pytest.mark.parametrize("call, error", [
    (lambda: TensorParallelSlice(0, 2, 2), "rank 2 of 2"),
    (lambda: logical_shape((4, 6, 2), TensorParallelSlice(2, 0, 2)), "dimension 2"),
    (lambda: piece_arguments(0, (4,), 2, 9, TensorParallelSlice(0, 0, 2), **GROUPS), r"\[2, 9\)"),
    (lambda: piece_arguments(0, (4,), 1, 3, TensorParallelSlice(None, 0, 1), split_group=None,
                             replica_group=None), "replica_group"),
])
def test_impossible_layouts_are_refused(call, error):
    with pytest.raises(ValueError, match=error):
        call()


def test_the_paper_masks_attention_and_mlp_weights_only():
    names = {  # megatron-core GPTModel (local spec) parameter names, as DDP prefixes them
        "module.embedding.word_embeddings.weight": (2, False),
        "module.embedding.position_embeddings.weight": (2, False),
        "module.decoder.layers.0.input_layernorm.weight": (1, False),
        "module.decoder.layers.0.self_attention.linear_proj.weight": (2, True),
        "module.decoder.layers.0.self_attention.linear_proj.bias": (1, False),
        "module.decoder.layers.0.self_attention.linear_qkv.weight": (2, True),
        "module.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": (1, False),
        "module.decoder.layers.3.mlp.linear_fc1.weight": (2, True),
        "module.decoder.layers.3.mlp.linear_fc2.weight": (2, True),
        "module.decoder.layers.3.mlp.router.weight": (2, False),
        "module.decoder.final_layernorm.weight": (1, False),
        "module.output_layer.weight": (2, False),
    }
    for name, (ndim, masked) in names.items():
        assert is_paper_masked(name, ndim) is masked, name
    assert stable_name("module.module.decoder.x") == "decoder.x"


@pytest.mark.multiprocess
@pytest.mark.parametrize("tp_size, world_size, distributed_optimizer", [(2, 2, False), (2, 4, True), (1, 3, True)])
def test_tensor_and_data_parallel_pieces_follow_one_process(tp_size, world_size, distributed_optimizer):
    results = run_ranks(world_size, cases.tp_dp_body, world_size, tp_size, distributed_optimizer, cases.COMBOS,
                        cases.STEPS)
    cases.check_tp_dp_run(results, tp_size)


@pytest.mark.multiprocess
def test_n_element_blocks_of_a_row_parallel_slice_are_refused():
    with pytest.raises(ValueError, match="block=7.*column slice"):
        run_ranks(2, cases.tp_dp_body, 2, 2, False, [("adam", "magma", 7)], 1)
