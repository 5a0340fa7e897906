"""The sparse sync under Megatron's overlap_param_gather (magma_ext.megatron.overlapped_sync) on
CPU: a bucket group's start_param_sync contract kept, sparse exactly when one optimizer step ran
since the group's last gather, Megatron's dense gather otherwise; and, on 2 and 3 gloo ranks,
bucket groups gathered one at a time as the forward pre-hooks do, bit-identical to a dense
gather at every step."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from distributed_helpers import run_ranks
from magma_ext.megatron.overlapped_sync import BucketGroupSync
from magma_ext.megatron.buckets import Bucket
from magma_ext.megatron.changed_ranges import MaskRule, changed_ranges
from magma_ext.megatron.sparse_gather import SparseGather
from magma_ext.megatron.sync_bytes import SyncBytes
from sparse_gather_cases import as_mask, configure, dense_gathered, random_bucket_tensors, random_rules


class StandInBucketGroup:
    """What BucketGroupSync reads of a Megatron bucket group, with megatron-core 0.19's handle
    rules: a forced start completes a gather in flight; finish_param_sync starts one if none was
    dispatched, then waits. ``gather(force_sync)`` is its dense all-gather."""

    def __init__(self, overlap: bool, gather=None):
        self.ddp_config = SimpleNamespace(overlap_param_gather=overlap)
        self.param_gather_handle = None
        self.param_gather_dispatched = False
        self.posts = 0
        self.dense = []  # force_sync of each dense start
        self.gather = gather

    def start_param_sync(self, force_sync=False):
        if force_sync and self.param_gather_handle is not None:
            self.param_gather_handle.wait()
            self.param_gather_handle = None
            self.posts += 1
            return
        assert force_sync or self.param_gather_handle is None
        self.dense.append(force_sync)
        if self.gather is not None:
            self.gather()
        if force_sync and self.ddp_config.overlap_param_gather:
            self.posts += 1
        self.param_gather_dispatched = True

    def finish_param_sync(self):
        if not self.param_gather_dispatched:
            self.start_param_sync()
        if self.param_gather_handle is not None:
            self.param_gather_handle.wait()
            self.param_gather_handle = None
            self.posts += 1

    def _post_param_sync(self):
        self.posts += 1


class RecordingGather:
    """A SparseGather stand-in: records each start, hands out handles that count their waits."""

    def __init__(self):
        self.starts = []

    def start(self, rules, step, part):
        handle = SimpleNamespace(waits=0, moved=SyncBytes(1, 2, 10, 20))
        handle.wait = lambda: setattr(handle, "waits", handle.waits + 1)
        self.starts.append((step, part, handle))
        return handle

    def dense_bytes(self, part):
        return SyncBytes(0, 0, 10, 20)


MASKED = {0: MaskRule(seed=3, keep_prob=0.5, masked=True), 1: MaskRule(seed=0, keep_prob=1.0, masked=False)}
UNMASKED = {0: MaskRule(seed=3, keep_prob=1.0, masked=False)}


def test_sparse_exactly_when_one_step_ran_since_the_last_gather():
    group, gather = StandInBucketGroup(overlap=True), RecordingGather()
    state = SimpleNamespace(step=5, rules=MASKED)
    sync = BucketGroupSync(group, gather, 1, lambda: state.rules, lambda: state.step)
    sync.install()
    assert group.start_param_sync == sync.start_param_sync

    group.finish_param_sync()  # the first forward: no gather yet to count from, so dense
    assert group.dense == [False] and not gather.starts and sync.last == SyncBytes(10, 20, 10, 20)

    state.step = 6  # one step: the next forward's gather is sparse, in flight until waited for
    group.param_gather_dispatched = False
    group.start_param_sync()
    (step, part, handle), = gather.starts
    assert (step, part) == (6, 1) and group.param_gather_handle is handle and group.param_gather_dispatched
    assert handle.waits == 0 and sync.last == SyncBytes(1, 2, 10, 20)
    group.finish_param_sync()
    assert handle.waits == 1 and group.param_gather_handle is None and group.posts == 1

    group.start_param_sync(force_sync=True)  # no step since: a forced sync is dense
    assert group.dense == [False, True] and len(gather.starts) == 1

    state.step = 7
    group.param_gather_dispatched = False
    group.start_param_sync()
    handle = gather.starts[-1][2]
    group.start_param_sync(force_sync=True)  # a gather in flight: a forced sync completes it
    assert handle.waits == 1 and group.param_gather_handle is None and len(gather.starts) == 2

    state.step = 8  # forced right after a step: sparse, completed before it returns
    posts = group.posts
    group.start_param_sync(force_sync=True)
    handle = gather.starts[-1][2]
    assert handle.waits == 1 and group.param_gather_handle is None and group.posts == posts + 1

    state.step = 10  # two steps since the last gather: dense
    group.start_param_sync(force_sync=True)
    assert group.dense[-1] is True and len(gather.starts) == 3

    state.step, state.rules = 11, UNMASKED  # nothing masked: dense
    group.start_param_sync(force_sync=True)
    assert group.dense[-1] is True and len(gather.starts) == 3

    state.rules = MASKED
    sync.synced_step = None  # as after loading a checkpoint
    state.step = 12
    group.start_param_sync(force_sync=True)
    assert len(gather.starts) == 3 and len(group.dense) == 5


def test_without_overlap_a_sparse_start_completes_before_it_returns():
    group, gather = StandInBucketGroup(overlap=False), RecordingGather()
    state = SimpleNamespace(step=0)
    BucketGroupSync(group, gather, 0, lambda: MASKED, lambda: state.step).install()
    group.start_param_sync()
    state.step = 1
    group.start_param_sync()
    handle = gather.starts[-1][2]
    assert handle.waits == 1 and group.param_gather_handle is None and group.posts == 0


def overlapped_body(rank, size, seed, steps, route):
    """Each rank changes the changed elements of its shards; the bucket groups then gather one at
    a time as Megatron's forward pre-hooks have them (group k's wait launches group k + 1's),
    with a skipped step and a forced sync on the way; a dense all-gather is the oracle after
    every step."""
    import torch.distributed as dist

    rng = random.Random(seed)
    layouts = [random_bucket_tensors(rng, size) for _ in range(4)]
    rules = random_rules(rng)
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32]
    buckets = [Bucket(torch.randn(numel, generator=gen).to(dtype), tensors)
               for (tensors, numel), dtype in zip(layouts, dtypes)]
    parts = [[0], [1, 2], [3]]
    gather = SparseGather(buckets, dist.group.WORLD, rank, size, parts)
    configure(gather, route)

    def dense_gather(members):
        def run():
            for bucket in members:
                bucket.param_data.copy_(dense_gathered(bucket.param_data, rank, size))
        return run

    state = SimpleNamespace(step=0)
    groups, syncs = [], []
    for k, part in enumerate(parts):
        group = StandInBucketGroup(overlap=True, gather=dense_gather([buckets[i] for i in part]))
        sync = BucketGroupSync(group, gather, k, lambda: rules, lambda: state.step)
        sync.install()
        groups.append(group)
        syncs.append(sync)

    def forward():
        for k, group in enumerate(groups):  # the pre-hooks: wait for this group, launch the next
            group.finish_param_sync()
            if k + 1 < len(groups) and not groups[k + 1].param_gather_dispatched:
                groups[k + 1].start_param_sync()
        for group in groups:
            group.param_gather_dispatched = False  # finish_grad_sync's reset

    forward()
    sparse_steps = 0
    for step in range(1, steps + 1):
        skipped = step == 3
        if not skipped:
            state.step += 1
            for bucket in buckets:
                numel = bucket.param_data.numel()
                shard = numel // size
                noise = torch.randn(numel, generator=gen).to(bucket.param_data.dtype)
                mask = as_mask(changed_ranges(bucket.tensors, rules, state.step), numel)
                mine = torch.zeros(numel, dtype=torch.bool)
                mine[rank * shard:(rank + 1) * shard] = True
                bucket.param_data += torch.where(mask & mine, noise, torch.zeros_like(noise))
        expected = [dense_gathered(bucket.param_data, rank, size) for bucket in buckets]
        dense_before = sum(len(g.dense) for g in groups)
        if step == 5:  # evaluation: the pre-hooks disabled, every group forced; then the next
            for group in groups:  # training forward finds them dispatched, and its backward resets them
                group.start_param_sync(force_sync=True)
            forward()
        else:
            forward()
        sparse_steps += sum(len(g.dense) for g in groups) == dense_before
        for bucket, whole in zip(buckets, expected):
            assert torch.equal(bucket.param_data, whole), step
    return sparse_steps


@pytest.mark.multiprocess
@pytest.mark.parametrize("route", ["in place", "packed chunks"])
@pytest.mark.parametrize("size, seed", [(2, 11), (3, 12)])
def test_bucket_groups_gathered_as_the_forward_pre_hooks_do_equal_a_dense_gather(size, seed, route):
    sparse_steps = run_ranks(size, overlapped_body, size, seed, 7, route)
    # step 3 is skipped: no step since the last gather, so its gathers are dense; every other
    # step's (the forced ones of step 5 too) are sparse
    assert sparse_steps == [6] * size
