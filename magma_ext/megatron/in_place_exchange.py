"""The in-place route of the sparse parameter sync: point-to-point transfers between buckets.

Each rank sends each of its changed ranges, straight from its shard of a bucket, to every other
rank, which receives it straight into its own copy of that shard; all of a step's transfers are
one ``torch.distributed.batch_isend_irecv`` (one NCCL group). Nothing is packed, copied or padded,
but every range is a transfer of its own.
"""

from __future__ import annotations

import torch

__all__ = ["direct_ops", "in_place_ops"]


def direct_ops(layout: list[list[torch.Tensor]]) -> int:
    """The most point-to-point transfers any rank posts to move the changed ranges
    ``layout[bucket][rank]`` in place: each of its ranges to every other rank, and every other
    rank's ranges from them. The same on every rank (it reads the whole layout)."""
    if not layout:
        return 0
    size = len(layout[0])
    ranges = [sum(len(ranks[r]) for ranks in layout) for r in range(size)]
    total = sum(ranges)
    return max((size - 1) * mine + total - mine for mine in ranges)


def in_place_ops(shards: list[list[torch.Tensor]], layout: list[list[torch.Tensor]], rank: int, group) -> list:
    """This rank's transfers of the buckets whose shards are ``shards[bucket][rank]`` and whose
    changed ranges are ``layout[bucket][rank]`` (shard coordinates): its own ranges from its
    shards to every other rank, and theirs into their shards of this rank's buckets."""
    import torch.distributed as dist

    ops = []
    size = len(shards[0]) if shards else 0
    for peer in range(size):
        if peer == rank:
            continue
        for bucket_shards, ranks in zip(shards, layout):
            mine, theirs = bucket_shards[rank], bucket_shards[peer]
            # a peer posts its receives from this rank in the order this rank posts its sends
            ops += [dist.P2POp(dist.isend, mine[a:b], group=group, group_peer=peer) for a, b in ranks[rank].tolist()]
            ops += [dist.P2POp(dist.irecv, theirs[a:b], group=group, group_peer=peer) for a, b in ranks[peer].tolist()]
    return ops
