"""A parameter all-gather that moves only the blocks Magma kept (sparse parameter sync).

Under a ZeRO-style distributed optimizer each data-parallel rank updates its shard of every
bucket, then the bucket's ``param_data`` is all-gathered so that every rank holds the whole
model again. A block Magma masked this step did not change, and every rank knows which blocks
those are without being told: a mask is a function of (seed, tensor index, block, step). So
every rank computes the same *compact layout*: for every rank's shard, the element ranges that
changed (the kept blocks of masked tensors, and all of every tensor that is not masked). Each
rank packs its own ranges into one buffer, one ``all_gather_into_tensor`` (per dtype) moves the
packed buffers, padded to the largest rank's count (the padding is counted as sent), and each
rank copies the other ranks' ranges into place. The masked ranges already hold the same values
on every rank, so the parameters end bit-identical to those of a dense gather.

The layout is computed on the host from the host's step count: no host synchronisation. Pack is
one ``torch.cat`` of views, unpack one ``torch._foreach_copy_``.

No megatron-core import: the layout functions and :class:`SparseGather` take plain buckets
(``magma_ext.megatron.optimizer`` builds them from Megatron's), so CPU tests check them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ..layout import BlockLayout
from ..philox import keep_mask
from ..pieces import Piece
from ..shards import ParamView
from .layout import piece_arguments

__all__ = ["BucketTensor", "Bucket", "MaskRule", "changed_ranges", "shard_ranges", "SparseGather", "SyncBytes",
           "buckets_of_chunks", "layout_record", "buckets_of_record"]


@dataclass(frozen=True)
class MaskRule:
    """How a tensor's blocks are drawn this step (from its Magma parameter group)."""

    seed: int
    keep_prob: float
    masked: bool  # False: the whole tensor changes every step

    @classmethod
    def of_group(cls, group: dict) -> MaskRule:
        masked = group["magma"] and group["mask"] in ("magma", "skip") and group["keep_prob"] < 1
        return cls(int(group["seed"]), float(group["keep_prob"]), bool(masked))


@dataclass(frozen=True)
class BucketTensor:
    """A parameter in a bucket: elements ``[start, start + layout.numel)`` of its ``param_data``.

    ``layout`` gives the blocks of the (TP-local) tensor, numbered as Magma numbers them;
    ``rule`` is the key of its mask rule (its parameter group) in the rules passed per step.
    """

    start: int
    index: int
    layout: BlockLayout
    rule: int


@dataclass
class Bucket:
    """One bucket of a data-parallel group: its flat parameter buffer (``numel`` divisible by the
    group's size, rank r holding elements ``[r * numel / size, (r + 1) * numel / size)``)."""

    param_data: torch.Tensor
    tensors: list[BucketTensor]


def buckets_of_chunks(model_chunks, indices: dict, slices: dict, group_of: dict, blocks: list):
    """The :class:`Bucket` of every bucket of Megatron's DDP ``model_chunks`` (their dense
    ``bucket_groups``), and the process group that gathers them (None without buckets).

    ``indices``, ``slices`` and ``group_of`` map each model parameter to its tensor index, its
    :class:`~magma_ext.megatron.layout.TensorParallelSlice` and its parameter group's position;
    ``blocks`` gives each group's ``block`` option. Reads ``bucket_groups``, their
    ``intra_distributed_optimizer_instance_group`` and ``buckets``, and each bucket's
    ``param_data``, ``params_list`` and ``param_to_index`` (megatron-core 0.19).
    """
    buckets, groups = [], []
    for chunk in model_chunks:
        for bucket_group in chunk.bucket_groups:
            groups.append(bucket_group.intra_distributed_optimizer_instance_group)
            for bucket in bucket_group.buckets:
                tensors = []
                for param in bucket.params_list:
                    whole = piece_arguments(indices[param], tuple(param.shape), 0, param.numel(), slices[param],
                                            split_group=None, replica_group=None)
                    block = blocks[group_of[param]]
                    tensors.append(BucketTensor(start=bucket.param_to_index[param][0], index=indices[param],
                                                layout=ParamView(param, Piece(**whole), "tensor").layout(block),
                                                rule=group_of[param]))
                buckets.append(Bucket(bucket.param_data, tensors))
    if any(g is not groups[0] for g in groups):
        raise ValueError("sparse_param_gather: the buckets are gathered over several process groups")
    return buckets, (groups[0] if groups else None)


def changed_ranges(tensors: list[BucketTensor], rules: dict, step: int) -> torch.Tensor:
    """``(k, 2)`` int64 ``[start, stop)`` element ranges of a bucket that change at ``step``
    (sorted, adjacent ranges merged): every element of a tensor whose rule is not masked, the
    kept blocks' elements of the others. Elements outside every tensor (padding) never change."""
    pieces = []
    for t in tensors:
        rule = rules[t.rule]
        n = t.layout.numel
        if n == 0:
            continue
        if not rule.masked:
            pieces.append(torch.tensor([[t.start, t.start + n]], dtype=torch.int64))
            continue
        lengths = torch.tensor(t.layout.lengths(), dtype=torch.int64)
        blocks = t.layout.first_block + torch.arange(len(lengths), dtype=torch.int64)
        kept = keep_mask(rule.seed, torch.full_like(blocks, t.index), blocks,
                         torch.full_like(blocks, step), rule.keep_prob)
        ends = t.start + torch.cumsum(lengths, 0)
        starts = ends - lengths
        pieces.append(torch.stack([starts[kept], ends[kept]], dim=1))
    if not pieces:
        return torch.zeros((0, 2), dtype=torch.int64)
    ranges = torch.cat(pieces)
    ranges = ranges[torch.argsort(ranges[:, 0], stable=True)]
    return _merge(ranges)


def _merge(ranges: torch.Tensor) -> torch.Tensor:
    """Merge sorted ranges that touch or overlap."""
    if len(ranges) <= 1:
        return ranges
    running_end = torch.cummax(ranges[:, 1], 0).values
    new = torch.ones(len(ranges), dtype=torch.bool)
    new[1:] = ranges[1:, 0] > running_end[:-1]
    group = torch.cumsum(new.to(torch.int64), 0) - 1
    starts = ranges[new, 0]
    ends = torch.zeros(len(starts), dtype=torch.int64).scatter_reduce_(0, group, ranges[:, 1], "amax")
    return torch.stack([starts, ends], dim=1)


def shard_ranges(ranges: torch.Tensor, numel: int, size: int) -> list[torch.Tensor]:
    """``ranges`` of a bucket of ``numel`` elements cut at the shard boundaries of ``size`` ranks:
    per rank, ``(k_r, 2)`` ranges in that rank's shard coordinates."""
    shard = numel // size
    out = []
    for r in range(size):
        lo, hi = r * shard, (r + 1) * shard
        clipped = torch.stack([ranges[:, 0].clamp(lo, hi), ranges[:, 1].clamp(lo, hi)], dim=1) - lo
        out.append(clipped[clipped[:, 1] > clipped[:, 0]])
    return out


@dataclass
class SyncBytes:
    """Bytes one rank sent and received in one parameter sync, and what a dense gather moves."""

    sent: int = 0
    received: int = 0
    dense_sent: int = 0
    dense_received: int = 0

    def __iadd__(self, other: SyncBytes) -> SyncBytes:
        self.sent += other.sent
        self.received += other.received
        self.dense_sent += other.dense_sent
        self.dense_received += other.dense_received
        return self

    @property
    def fraction(self) -> float:
        """Sparse bytes over dense bytes (sent + received)."""
        dense = self.dense_sent + self.dense_received
        return (self.sent + self.received) / dense if dense else 0.0


class SparseGather:
    """The sparse parameter sync of a data-parallel group's buckets."""

    def __init__(self, buckets: list[Bucket], group, rank: int, size: int):
        for bucket in buckets:
            if bucket.param_data.numel() % size:
                raise ValueError(f"a bucket of {bucket.param_data.numel()} elements does not split into {size} shards")
        self.buckets = buckets
        self.group = group
        self.rank = rank
        self.size = size

    def layout(self, rules: dict, step: int) -> list[list[torch.Tensor]]:
        """Per bucket, per rank, its changed ranges (shard coordinates) at ``step``."""
        return [shard_ranges(changed_ranges(b.tensors, rules, step), b.param_data.numel(), self.size)
                for b in self.buckets]

    def sync(self, rules: dict, step: int) -> SyncBytes:
        """COLLECTIVE: gather the changed ranges of every rank's shard into every rank's buckets."""
        import torch.distributed as dist

        layout = self.layout(rules, step)
        total = SyncBytes()
        by_dtype = defaultdict(list)
        for bucket, ranks in zip(self.buckets, layout):
            by_dtype[bucket.param_data.dtype].append((bucket, ranks))
        for dtype, members in by_dtype.items():
            counts = [sum(int((ranks[r][:, 1] - ranks[r][:, 0]).sum()) for _, ranks in members)
                      for r in range(self.size)]
            width = max(counts)
            item = torch.empty((), dtype=dtype).element_size()
            dense = sum(bucket.param_data.numel() // self.size for bucket, _ in members)
            total += SyncBytes(width * item, (self.size - 1) * width * item,
                               dense * item, (self.size - 1) * dense * item)
            if width == 0:
                continue
            mine = [shard[a:b] for bucket, ranks in members
                    for shard in (self._shard(bucket, self.rank),) for a, b in ranks[self.rank].tolist()]
            device = members[0][0].param_data.device
            padding = width - counts[self.rank]
            if padding:
                mine.append(torch.zeros(padding, dtype=dtype, device=device))
            packed = torch.cat(mine) if mine else torch.zeros(width, dtype=dtype, device=device)
            gathered = torch.empty(self.size * width, dtype=dtype, device=device)
            dist.all_gather_into_tensor(gathered, packed, group=self.group)
            destinations, sources = [], []
            for r in range(self.size):
                if r == self.rank:
                    continue
                position = r * width
                for bucket, ranks in members:
                    shard = self._shard(bucket, r)
                    for a, b in ranks[r].tolist():
                        destinations.append(shard[a:b])
                        sources.append(gathered[position:position + b - a])
                        position += b - a
            if destinations:
                torch._foreach_copy_(destinations, sources)
        return total

    def dense_bytes(self) -> SyncBytes:
        """What a dense all-gather of these buckets moves per rank."""
        total = SyncBytes()
        for bucket in self.buckets:
            shard = bucket.param_data.numel() // self.size * bucket.param_data.element_size()
            total += SyncBytes(0, 0, shard, (self.size - 1) * shard)
        return total

    def _shard(self, bucket: Bucket, r: int) -> torch.Tensor:
        shard = bucket.param_data.numel() // self.size
        return bucket.param_data.view(-1)[r * shard:(r + 1) * shard]


def layout_record(buckets: list[Bucket], rules: dict) -> dict:
    """The buckets' layouts and mask rules as plain JSON-able data (for projections to other
    data-parallel sizes: ``benchmarks/sparse_gather_projection.py``)."""
    return {
        "rules": {str(key): vars(rule).copy() for key, rule in rules.items()},
        "buckets": [
            {
                "numel": bucket.param_data.numel(),
                "element_size": bucket.param_data.element_size(),
                "tensors": [dict(start=t.start, index=t.index, rule=t.rule, numel=t.layout.numel,
                                 block_size=t.layout.block_size, offset=t.layout.offset,
                                 logical_numel=t.layout.logical_numel, sliced=t.layout.sliced)
                            for t in bucket.tensors],
            }
            for bucket in buckets
        ],
    }


def buckets_of_record(record: dict) -> tuple[list[tuple[int, int, list[BucketTensor]]], dict]:
    """``([(numel, element size, tensors) per bucket], rules)`` from :func:`layout_record`."""
    rules = {int(key): MaskRule(**value) for key, value in record["rules"].items()}
    buckets = []
    for bucket in record["buckets"]:
        tensors = [BucketTensor(start=t["start"], index=t["index"], rule=t["rule"],
                                layout=BlockLayout(t["numel"], t["block_size"], t["offset"], t["logical_numel"],
                                                   t["sliced"]))
                   for t in bucket["tensors"]]
        buckets.append((bucket["numel"], bucket["element_size"], tensors))
    return buckets, rules
