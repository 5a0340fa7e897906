"""The sparse parameter sync (magma_ext.megatron.sparse_gather) on CPU: the compact layout
against a brute-force one on random bucket layouts, and the gather on 2-4 gloo ranks against a
dense all-gather, bit for bit."""

from __future__ import annotations

import random

import pytest
import torch

from distributed_helpers import run_ranks
from magma_ext.megatron.buckets import Bucket
from magma_ext.megatron.changed_ranges import MaskRule, changed_ranges, shard_ranges
from magma_ext.megatron.sparse_gather import SparseGather
from magma_ext.megatron.sync_bytes import SyncBytes
from sparse_gather_cases import (EXACT_ROUTES, ROUTES, as_mask, brute_force_changed, random_bucket_tensors, random_rules,
                                 sync_body)


@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_the_compact_layout_matches_brute_force(size):
    rng = random.Random(size)
    for case in range(25):
        tensors, numel = random_bucket_tensors(rng, size)
        rules = random_rules(rng)
        step = rng.randint(1, 10_000)
        ranges = changed_ranges(tensors, rules, step)
        expected = brute_force_changed(tensors, rules, step, numel)
        assert torch.equal(as_mask(ranges, numel), expected), case
        assert bool((ranges[1:, 0] > ranges[:-1, 1]).all()), "ranges sorted, disjoint and merged"
        shard = numel // size
        for r, local in enumerate(shard_ranges(ranges, numel, size)):
            assert torch.equal(as_mask(local, shard), expected[r * shard:(r + 1) * shard]), (case, r)


def test_chunks_cut_each_stream_into_the_same_elements():
    """A rank's stream cut at the chunk bounds gives back every (bucket, element) of its ranges
    once, in stream order, each at its stream position; bounds cover the stream."""
    import numpy as np

    from magma_ext.megatron.packed_exchange import chunk_bounds, cut, stream_rows

    rng = random.Random(11)
    for case in range(40):
        ranges_per_bucket = []
        for _ in range(rng.randint(1, 4)):
            edges = sorted(rng.sample(range(200), 2 * rng.randint(0, 6)))
            ranges_per_bucket.append(torch.tensor(edges, dtype=torch.int64).reshape(-1, 2))
        expected = [(b, e) for b, r in enumerate(ranges_per_bucket) for a, z in r.tolist() for e in range(a, z)]
        rows = stream_rows(ranges_per_bucket)
        width = len(expected) + rng.randint(0, 5)  # a longer stream elsewhere: this one ends early
        bounds = chunk_bounds(width, rng.choice([2, 4]), rng.choice([1, 8, 64, 10**9]), rng.randint(1, 6))
        assert [lo for lo, _ in bounds[1:]] == [hi for _, hi in bounds[:-1]], case
        assert (bounds[0][0], bounds[-1][1]) == (0, width) if width else bounds == [], case
        found = []
        parts = cut(rows, bounds)
        assert len(parts) == len(bounds), case
        for (lo, hi), part in zip(bounds, parts):
            assert np.all(part[:, 3] > 0) and np.all(part[:, 2] + part[:, 3] <= hi - lo), case
            for bucket, start, stream, length in part.tolist():
                found += [(lo + stream + k, (bucket, start + k)) for k in range(length)]
        assert [position for position, _ in found] == list(range(len(expected))), case
        assert [element for _, element in found] == expected, case
    assert len(chunk_bounds(100, 4, 50, 8)) == 8  # 400 bytes / 50 per chunk
    assert len(chunk_bounds(100, 4, 50, 3)) == 3  # capped
    assert chunk_bounds(100, 4, 10**9, 8) == [(0, 100)] and chunk_bounds(0, 4, 50, 8) == []


@pytest.mark.multiprocess
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("size, seed", [(2, 1), (3, 2), (4, 3), (4, 4)])
def test_the_sparse_sync_leaves_every_rank_bit_identical_to_a_dense_gather(size, seed, route):
    check_traffic(run_ranks(size, sync_body, size, seed, 6, route), size, route)


@pytest.mark.multiprocess
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("size, seed", [(2, 5), (3, 6)])
def test_parts_in_flight_together_sync_like_one(size, seed, route):
    """Two parts (bucket groups) started before either is waited for, waited in the other order:
    every step bit-identical to a dense gather, as with one sync of every bucket."""
    check_traffic(run_ranks(size, sync_body, size, seed, 6, route, "cpu", True), size, route)


def check_traffic(results, size, route):
    """Per step, every rank's (sent, received, dense sent, dense received) as the route moves them."""
    for step in zip(*results):  # per step, every rank's (sent, received, dense sent, dense received)
        assert all(dense_sent == step[0][2] and dense_received == (size - 1) * dense_sent
                   for _, _, dense_sent, dense_received in step)
        if route in EXACT_ROUTES:  # exactly its own elements out, every other rank's in (no padding)
            assert all(sent + received == sum(s for s, _, _, _ in step) for sent, received, _, _ in step)
        else:  # the packed width, the same on every rank
            assert all(s == step[0] for s in step) and step[0][1] == (size - 1) * step[0][0]
        assert all(sent <= dense_sent for sent, _, dense_sent, _ in step)
    if route in EXACT_ROUTES:  # ranks send what they changed, so some step has unequal counts
        assert any(len({sent for sent, _, _, _ in step}) > 1 for step in zip(*results))


def test_the_route_follows_padding_and_transfers():
    """auto: in place where packing would pad past max_padding times the changed elements and no
    rank posts more than max_direct_ops transfers, else packed; the same choice on every rank,
    from the layout alone; a forced route is kept; an unknown one is refused."""
    from magma_ext.megatron.in_place_exchange import direct_ops

    ranges = [torch.zeros((k, 2), dtype=torch.int64) for k in (4, 1, 0)]
    layout = [ranges, ranges]
    # rank 0: 2 * 8 sends + 2 receives; rank 1: 2 * 2 sends + 8 receives; rank 2: 10 receives
    assert direct_ops(layout) == 18 and direct_ops([]) == 0
    for rank in range(3):
        gather = SparseGather([], None, rank, 3)
        assert gather.choose_route(layout, [100, 10, 0]) == "in place"  # 3 * 100 > 2 * 110
        assert gather.choose_route(layout, [50, 40, 30]) == "packed"  # 3 * 50 <= 2 * 120
        gather.max_direct_ops = 17
        assert gather.choose_route(layout, [100, 10, 0]) == "packed"  # 18 transfers > 17
        gather.route = "in place"
        assert gather.choose_route(layout, [50, 40, 30]) == "in place"
    for removed in ("sideways", "packed p2p", "packed broadcast"):
        gather.route = removed
        with pytest.raises(ValueError, match="route must be"):
            gather.choose_route(layout, [1, 1, 1])


def test_settings_out_of_range_are_refused_by_name():
    """A chunk size, chunk count, view limit or transfer limit out of range fails the plan (and so
    the sync) with the attribute's name, before any transfer."""
    rng = random.Random(7)
    tensors, numel = random_bucket_tensors(rng, 2)
    rules = random_rules(rng)
    for name, bad in (("chunk_bytes", 0), ("max_chunks", 0), ("max_chunks", 2.0), ("max_views", -1),
                      ("max_direct_ops", True)):
        gather = SparseGather([Bucket(torch.zeros(numel), tensors)], None, 0, 2)
        gather.route = "packed"  # planned without a process group (the in-place route's transfers need one)
        gather.plan(rules, 1)  # the defaults plan
        setattr(gather, name, bad)
        with pytest.raises(ValueError, match=f"SparseGather.{name} must be an int"):
            gather.plan(rules, 1)
        with pytest.raises(ValueError, match=f"SparseGather.{name} must be an int"):
            gather.sync(rules, 1)


def test_settings_the_sparse_gather_cannot_serve_are_refused_by_name():
    from types import SimpleNamespace

    from magma_ext.megatron.sparse_gather import refuse_unsupported_sparse_gather

    ddp = SimpleNamespace(overlap_param_gather=False, reuse_grad_buf_for_mxfp8_param_ag=False)
    refuse_unsupported_sparse_gather(True, True, ddp)
    refuse_unsupported_sparse_gather(False, False, SimpleNamespace(overlap_param_gather=True))  # off: no check
    with pytest.raises(TypeError, match="sparse_param_gather must be a bool"):
        refuse_unsupported_sparse_gather("yes", True, ddp)
    with pytest.raises(ValueError, match="use_distributed_optimizer"):
        refuse_unsupported_sparse_gather(True, False, ddp)
    refuse_unsupported_sparse_gather(True, True, SimpleNamespace(**{**vars(ddp), "overlap_param_gather": True}))
    with pytest.raises(ValueError, match="ddp_config.reuse_grad_buf_for_mxfp8_param_ag=True"):
        refuse_unsupported_sparse_gather(True, True, SimpleNamespace(**{**vars(ddp),
                                                                        "reuse_grad_buf_for_mxfp8_param_ag": True}))


def test_a_group_of_one_rank_gathers_nothing():
    """As Megatron's own gather at DP 1: no collective (no process group exists here), no bytes."""
    rng = random.Random(5)
    tensors, numel = random_bucket_tensors(rng, 1)
    data = torch.randn(numel)
    gather = SparseGather([Bucket(data.clone(), tensors)], group=None, rank=0, size=1)
    assert gather.sync(random_rules(rng), 3) == SyncBytes() and gather.dense_bytes() == SyncBytes()
    assert torch.equal(gather.buckets[0].param_data, data)


def test_rules_follow_the_group():
    group = dict(magma=True, mask="magma", keep_prob=0.5, seed=3)
    assert MaskRule.of_group(group) == MaskRule(3, 0.5, True)
    for change in (dict(magma=False), dict(mask="none"), dict(keep_prob=1.0)):
        assert not MaskRule.of_group({**group, **change}).masked, change
    assert MaskRule.of_group({**group, "mask": "skip"}).masked


def test_buckets_of_megatron_chunks_take_every_parameter_of_every_bucket():
    """Built from (stand-ins of) Megatron's DDP buckets: each parameter's range in its bucket and
    its blocks as Magma numbers them, also for parameters of which this rank holds no shard."""
    from types import SimpleNamespace

    from magma_ext.megatron.buckets import buckets_of_chunks
    from magma_ext.megatron.layout import TensorParallelSlice

    column = torch.nn.Parameter(torch.zeros(4, 6))   # column-parallel, TP rank 1 of 2
    row = torch.nn.Parameter(torch.zeros(6, 4))      # row-parallel, TP rank 1 of 2
    norm = torch.nn.Parameter(torch.zeros(6))        # replicated
    group = object()
    bucket = SimpleNamespace(param_data=torch.zeros(64), params_list=[norm, row, column],
                             param_to_index={norm: (0, 6), row: (8, 32), column: (32, 56)})
    chunk = SimpleNamespace(bucket_groups=[SimpleNamespace(intra_distributed_optimizer_instance_group=group,
                                                           buckets=[bucket])])
    indices = {column: 5, row: 3, norm: 2}
    slices = {column: TensorParallelSlice(0, 1, 2), row: TensorParallelSlice(1, 1, 2),
              norm: TensorParallelSlice(None, 1, 2)}
    group_of = {column: 0, row: 0, norm: 1}
    buckets, found = buckets_of_chunks([chunk], indices, slices, group_of, ["row", "tensor"])
    assert found is group and len(buckets) == 1 and buckets[0].param_data is bucket.param_data
    by_index = {t.index: t for t in buckets[0].tensors}
    assert by_index[2].start == 0 and by_index[2].layout.num_blocks == 1 and by_index[2].rule == 1
    assert by_index[3].start == 8 and by_index[3].layout.sliced and by_index[3].layout.block_size == 4
    assert by_index[3].layout.first_block == 0 and by_index[3].layout.num_blocks == 6  # the 6 logical rows
    assert by_index[5].start == 32 and by_index[5].layout.first_block == 4  # rows 4-7 of the (8, 6) tensor
    other = SimpleNamespace(intra_distributed_optimizer_instance_group=object(), buckets=[])
    with pytest.raises(ValueError, match="several process groups"):
        buckets_of_chunks([SimpleNamespace(bucket_groups=[chunk.bucket_groups[0], other])], indices, slices,
                          group_of, ["row", "tensor"])
    for buffer, found in ((torch.zeros(64, dtype=torch.uint8), "a torch.uint8 buffer"), (None, "no buffer")):
        quantized = SimpleNamespace(param_data=buffer, params_list=[norm], param_to_index={norm: (0, 6)})
        chunk = SimpleNamespace(bucket_groups=[SimpleNamespace(intra_distributed_optimizer_instance_group=group,
                                                               buckets=[quantized])])
        with pytest.raises(ValueError, match=f"a bucket with {found}"):
            buckets_of_chunks([chunk], indices, slices, group_of, ["row", "tensor"])
