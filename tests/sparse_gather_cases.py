"""Random bucket layouts and a multi-rank sync scenario for the sparse parameter sync tests."""

from __future__ import annotations

import random

import torch

from magma_ext.layout import BlockLayout
from magma_ext.megatron.buckets import Bucket, BucketTensor
from magma_ext.megatron.changed_ranges import MaskRule, changed_ranges
from magma_ext.megatron.sparse_gather import SparseGather
from magma_ext.megatron.sync_bytes import SyncBytes
from magma_ext.philox import keep_mask


def random_bucket_tensors(rng: random.Random, size: int):
    """Tensors laid out in a bucket with gaps (Megatron aligns them), random block layouts (some
    are pieces of larger tensors: offsets not on block boundaries), and the bucket's size padded
    to a multiple of ``size``."""
    tensors, position = [], rng.randint(0, 3)
    for index in range(rng.randint(1, 6)):
        numel = rng.choice([0, 1, 5, 17, 40, 96])
        block = rng.choice([1, 3, 8, 16, 64, 500])
        offset = rng.randint(0, 20)
        layout = BlockLayout(numel=numel, block_size=block, offset=offset, logical_numel=offset + numel + rng.randint(0, 9))
        tensors.append(BucketTensor(start=position, index=rng.randint(0, 2**32 - 1), layout=layout, rule=rng.randint(0, 2)))
        position += numel + rng.choice([0, 0, 3])
    numel = position + rng.randint(0, 7)
    return tensors, -(-numel // size) * size


def random_rules(rng: random.Random):
    return {0: MaskRule(seed=rng.randint(0, 2**64 - 1), keep_prob=rng.choice([0.0, 0.1, 0.5, 0.9]), masked=True),
            1: MaskRule(seed=rng.randint(0, 2**64 - 1), keep_prob=0.5, masked=True),
            2: MaskRule(seed=0, keep_prob=1.0, masked=False)}


def brute_force_changed(tensors, rules, step, numel) -> torch.Tensor:
    """Element by element: does it change at ``step``?"""
    changed = torch.zeros(numel, dtype=torch.bool)
    for t in tensors:
        rule = rules[t.rule]
        for k in range(t.layout.numel):
            block = (t.layout.offset + k) // t.layout.block_size
            kept = not rule.masked or bool(keep_mask(rule.seed, torch.tensor([t.index]), torch.tensor([block]),
                                                     torch.tensor([step]), rule.keep_prob)[0])
            changed[t.start + k] = kept
    return changed


def as_mask(ranges: torch.Tensor, numel: int) -> torch.Tensor:
    mask = torch.zeros(numel, dtype=torch.bool)
    for a, b in ranges.tolist():
        assert 0 <= a < b <= numel
        mask[a:b] = True
    return mask


ROUTES = ("in place", "packed views", "packed positions", "packed chunks")
EXACT_ROUTES = ("in place",)  # nothing padded: each rank sends its changed elements


def configure(gather: SparseGather, route: str) -> None:
    """Set ``gather`` up for one of :data:`ROUTES`: the route forced, and on the packed one views,
    element positions, or chunks (whose edges then cut ranges) with runs of one range as views
    and longer ones by positions."""
    gather.route = "in place" if route == "in place" else "packed"
    if route == "packed positions":
        gather.max_views = 0
    if route == "packed chunks":
        gather.chunk_bytes, gather.max_chunks, gather.max_views = 8, 5, 1


def dense_gathered(data: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """COLLECTIVE: a flat buffer as a dense all-gather of every rank's shard of it leaves it."""
    import torch.distributed as dist

    shard = data.numel() // size
    whole = torch.empty_like(data)
    dist.all_gather_into_tensor(whole, data[rank * shard:(rank + 1) * shard].clone())
    return whole


PARTS = [[0, 2], [1]]  # the buckets as two parts (bucket groups), one of two dtypes


def sync_body(rank, size, seed, steps, route="in place", device="cpu", parts=False):
    """Every rank starts from the same buckets; each step every rank changes the changed elements
    of its own shard, then syncs sparsely by ``route`` (one of :data:`ROUTES`); a dense
    all-gather of the same shards is the oracle. ``device="cuda"``: buckets on GPU ``rank``
    (NCCL). ``parts``: the buckets as the two parts :data:`PARTS`; at odd steps both are started
    before either is waited for (as Megatron's overlapped bucket groups can be), the later one
    first; at even steps one ``sync`` runs them all."""
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(rank)
    rng = random.Random(seed)
    layouts = [random_bucket_tensors(rng, size) for _ in range(3)]
    rules = random_rules(rng)
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.bfloat16, torch.float32, torch.bfloat16]
    buckets = [Bucket(torch.randn(numel, generator=gen).to(device, dtype), tensors)
               for (tensors, numel), dtype in zip(layouts, dtypes)]
    dense = [b.param_data.clone() for b in buckets]
    gather = SparseGather(buckets, dist.group.WORLD, rank, size, PARTS if parts else None)
    configure(gather, route)
    moved = []
    for step in range(1, steps + 1):
        if step == 4:  # the rules change between steps: the layout worked out ahead must not be used
            rules = {**rules, 0: MaskRule(rules[0].seed, 0.3, True)}
        for bucket, reference in zip(buckets, dense):
            numel = bucket.param_data.numel()
            shard = numel // size
            noise = torch.randn(numel, generator=gen).to(bucket.param_data.dtype)
            mask = as_mask(changed_ranges(bucket.tensors, rules, step), numel)
            mine = torch.zeros(numel, dtype=torch.bool)
            mine[rank * shard:(rank + 1) * shard] = True
            update = torch.where(mask & mine, noise, torch.zeros_like(noise)).to(device)
            bucket.param_data += update
            reference += update
            reference.copy_(dense_gathered(reference, rank, size))
        if parts and step % 2:
            pending = [gather.start(rules, step, part) for part in range(len(PARTS))]
            traffic = SyncBytes()
            for handle in reversed(pending):
                traffic += handle.wait()
        else:
            traffic = gather.sync(rules, step)
        moved.append(traffic)
        for bucket, reference in zip(buckets, dense):
            assert torch.equal(bucket.param_data, reference), step
    return [(t.sent, t.received, t.dense_sent, t.dense_received) for t in moved]
