"""Random bucket layouts and a multi-rank sync scenario for the sparse parameter sync tests."""

from __future__ import annotations

import random

import torch

from magma_ext.layout import BlockLayout
from magma_ext.megatron.sparse_gather import Bucket, BucketTensor, MaskRule, SparseGather, SyncBytes, changed_ranges
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


ROUTES = ("in place", "packed views", "packed positions", "packed chunks", "packed p2p chunks",
          "packed broadcast chunks")
EXACT_ROUTES = ("in place", "packed p2p chunks", "packed broadcast chunks")  # nothing padded: each rank sends its changed elements


def configure(gather: SparseGather, route: str) -> None:
    """Set ``gather`` up for one of :data:`ROUTES`: the route forced, and on the packed ones views
    or element positions, one chunk or several (chunk edges then cut ranges)."""
    gather.route = next(name for name in ("in place", "packed p2p", "packed broadcast", "packed") if route.startswith(name))
    if route == "packed positions":
        gather.max_views = 0
    if "chunks" in route:
        gather.chunk_bytes, gather.max_chunks = 8, 5
    if route in ("packed p2p chunks", "packed broadcast chunks"):
        gather.max_views = 1  # runs of one range as views, longer ones by positions


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


# The broadcast transport on a hand-made layout: rank 0 changes shard elements [0, 10), rank 1
# [2, 6), rank 2 (if any) nothing; chunks of stream positions [0, 4), [4, 8), [8, 10).
BROADCAST_SHARD, BROADCAST_RANGES, BROADCAST_BOUNDS = 12, ([[0, 10]], [[2, 6]], []), [(0, 4), (4, 8), (8, 10)]


def broadcast_transport_body(rank: int, size: int) -> tuple[list[str], list[float]]:
    """Run one packed exchange by the ``"broadcast"`` transport, recording which collective moved
    each chunk; returns (those collectives, this rank's parameter buffer after the exchange).
    Every rank starts from the same buffer and writes ``100 * (r + 1) + element`` into rank
    ``r``'s changed elements of its own shard."""
    import torch.distributed as dist

    from magma_ext.megatron.packed_exchange import plan_packed

    calls = []
    for name in ("all_gather_into_tensor", "broadcast"):
        real = getattr(dist, name)
        setattr(dist, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    data = torch.arange(size * BROADCAST_SHARD, dtype=torch.float32)
    shards = [[data[r * BROADCAST_SHARD:(r + 1) * BROADCAST_SHARD] for r in range(size)]]
    layout = [[torch.tensor(BROADCAST_RANGES[r], dtype=torch.int64).reshape(-1, 2) for r in range(size)]]
    for a, b in BROADCAST_RANGES[rank]:
        shards[0][rank][a:b] += 100 * (rank + 1)
    width = max(sum(b - a for a, b in BROADCAST_RANGES[r]) for r in range(size))
    plan = plan_packed(shards, layout, rank, torch.empty(size * width), "broadcast", BROADCAST_BOUNDS, 256)
    plan.finish(plan.start(None, rank))
    return calls, data.tolist()
