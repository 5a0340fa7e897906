"""A parameter all-gather that moves only the blocks Magma kept (sparse parameter sync).

Under a ZeRO-style distributed optimizer each data-parallel rank updates its shard of every
bucket, then the bucket's ``param_data`` is all-gathered so that every rank holds the whole
model again. A block Magma masked this step did not change, and every rank knows which blocks
those are (:mod:`magma_ext.megatron.changed_ranges`). So every rank computes the same
*compact layout*: for every rank's shard, the element ranges that changed. Each rank then moves
its ranges by one of two routes, per dtype, chosen from the layout alone (so every rank chooses
the same; :meth:`SparseGather.choose_route`):

- *packed* (what the default rule mostly takes): each rank packs its own ranges into its slot of
  a gather buffer, in-place ``all_gather_into_tensor`` calls move the packed buffers, padded to
  the largest rank's count (the padding is counted as sent), and each rank copies the other
  ranks' ranges into place; in chunks, each unpacked while the next is on the wire
  (:mod:`magma_ext.megatron.packed_exchange`).
- *in place*: each rank sends each of its ranges, straight from its bucket, to every other
  rank, which receives it straight into its own bucket, in one ``batch_isend_irecv``
  (:mod:`magma_ext.megatron.in_place_exchange`). Taken when the packed route's padding would move
  more than :attr:`SparseGather.max_padding` times the changed elements (as with tensor blocks at
  large data-parallel sizes, where some rank's whole shard lies in a kept tensor) and no rank
  posts more than :attr:`SparseGather.max_direct_ops` transfers.

The masked ranges already hold the same values on every rank, so the parameters end
bit-identical to those of a dense gather. The layout and every view and transfer of a step are
worked out on the host, during the previous step's transfers: no host synchronisation.

No megatron-core import: :class:`SparseGather` takes plain buckets
(:mod:`magma_ext.megatron.buckets` reads them from Megatron's), so CPU tests check it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .buckets import Bucket
from .changed_ranges import BlockTable, shard_ranges
from .in_place_exchange import direct_ops, in_place_ops
from .packed_exchange import PackedPlan, chunk_bounds, plan_packed
from .sync_bytes import SyncBytes

__all__ = ["ROUTES", "SparseGather", "PendingSync", "refuse_unsupported_sparse_gather"]

ROUTES = ("packed", "in place")  # what SparseGather.route may force


def refuse_unsupported_sparse_gather(sparse_param_gather, use_distributed_optimizer: bool, ddp_config) -> None:
    """Raise (naming the setting) where ``sparse_param_gather`` cannot work: it is not a bool,
    there is no distributed optimizer (so no parameter all-gather), or Megatron zeroes the
    gathered buffer (``reuse_grad_buf_for_mxfp8_param_ag``). ``ddp_config``: the model chunks'
    DDP config."""
    if not isinstance(sparse_param_gather, bool):
        raise TypeError(f"sparse_param_gather must be a bool, got {type(sparse_param_gather).__name__}")
    if not sparse_param_gather:
        return
    if not use_distributed_optimizer:
        raise ValueError("sparse_param_gather=True needs config.use_distributed_optimizer=True (without it "
                         "there is no parameter all-gather)")
    if getattr(ddp_config, "reuse_grad_buf_for_mxfp8_param_ag", False):
        raise ValueError("sparse_param_gather=True is not supported with "
                         "ddp_config.reuse_grad_buf_for_mxfp8_param_ag=True (Megatron zeroes the gathered "
                         "buffer, while the sparse gather needs the unchanged elements kept there)")


@dataclass
class _DtypePlan:
    """One dtype's share of a step's sync: its route, what it moves, and the work to run it."""

    route: str
    moved: SyncBytes
    packed: PackedPlan | None = None  # the packed route
    ops: list = field(default_factory=list)  # the in-place route's point-to-point transfers


class PendingSync:
    """A sync in flight (:meth:`SparseGather.start`): ``wait()`` completes it, once (later calls
    do nothing) and returns :attr:`moved`, the bytes it moves. Megatron's bucket groups hold it
    as their ``param_gather_handle``."""

    def __init__(self, moved: SyncBytes, launched: list):
        self.moved = moved
        self._launched = launched  # [(plan, what its launch returned)]

    def wait(self) -> SyncBytes:
        launched, self._launched = self._launched, []
        for plan, pending in launched:
            if plan.packed is not None:
                plan.packed.finish(pending)
            else:
                for work in pending:
                    work.wait()
        return self.moved


class SparseGather:
    """The sparse parameter sync of a data-parallel group's buckets.

    Per dtype, the changed ranges move by the route :meth:`choose_route` picks (see the module's
    description); set :attr:`route` to one of :data:`ROUTES` to force it. The packed route moves
    each rank's packed ranges in chunks of about :attr:`chunk_bytes` per rank (at most
    :attr:`max_chunks`), unpacking one chunk while the next is on the wire; a shard's ranges in a
    chunk are copied as views when they are at most :attr:`max_views`, else by element positions
    built on the device. Each sync works out the next step's plan (views, transfers) while its
    own transfers run.

    ``parts`` (lists of bucket positions, default one part of every bucket) are the units that
    sync on their own (:meth:`start` ``part=``): Megatron's bucket groups, whose gathers
    ``overlap_param_gather`` launches one at a time from the forward pre-hooks. Each part keeps
    its own plans and gather buffers, so the syncs of several parts may be in flight at once.
    """

    route = "auto"  # "auto" or one of ROUTES
    # auto takes the in-place route only where packing would pad past max_padding times the
    # changed elements. On 2 x H200 (NVLink, DP 2; benchmarks/results/sparse_gather_routes_*.md)
    # the packed route was the faster one at keep_prob 0.5 and 0.1 (padding 1.10x and 1.31x); by
    # the bytes per millisecond of each route there, in place would pay from about 1.3x (keep 0.5)
    # to 2.3x (keep 0.1) of padding. Larger data-parallel sizes are not measured yet.
    max_padding = 2.0
    max_direct_ops = 1024  # sends + receives one rank may post on the in-place route
    max_views = 256  # on the packed route, a shard's run of more ranges than this goes by positions
    chunk_bytes = 64 * 2**20  # per rank and chunk on the packed route
    max_chunks = 8

    def __init__(self, buckets: list[Bucket], group, rank: int, size: int, parts: list[list[int]] | None = None):
        for bucket in buckets:
            if bucket.param_data.numel() % size:
                raise ValueError(f"a bucket of {bucket.param_data.numel()} elements does not split into {size} shards")
        parts = [list(range(len(buckets)))] if parts is None else [list(part) for part in parts]
        if sorted(i for part in parts for i in part) != list(range(len(buckets))):
            raise ValueError(f"parts must hold every bucket position 0..{len(buckets) - 1} once, got {parts}")
        self.buckets = buckets
        self.parts = parts
        self.tables = [BlockTable.of(bucket.tensors) for bucket in buckets]
        self.group = group
        self.rank = rank
        self.size = size
        self._buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # the packed route's gather buffers
        self._prefetched: dict[int, tuple] = {}  # per part: (key, plans) worked out during its previous sync

    def layout(self, rules: dict, step: int, part: int | None = None) -> list[list[torch.Tensor]]:
        """Per bucket (of ``part``, default every bucket), per rank, its changed ranges (shard
        coordinates) at ``step``."""
        positions = range(len(self.buckets)) if part is None else self.parts[part]
        return [shard_ranges(self.tables[i].changed(rules, step), self.buckets[i].param_data.numel(), self.size)
                for i in positions]

    def sync(self, rules: dict, step: int, part: int | None = None) -> SyncBytes:
        """COLLECTIVE: gather the changed ranges of every rank's shard of ``part``'s buckets
        (default: of every part) into every rank's buckets; :meth:`start` of each part, then
        :meth:`PendingSync.wait` of each."""
        pending = [self.start(rules, step, k) for k in (range(len(self.parts)) if part is None else [part])]
        total = SyncBytes()
        for handle in pending:
            total += handle.wait()
        return total

    def start(self, rules: dict, step: int, part: int = 0) -> PendingSync:
        """COLLECTIVE: launch the sync of ``part`` (its position in :attr:`parts`) at ``step``;
        the returned handle's ``wait()`` completes it (until then the buckets of ``part`` are
        not to be read, nor this part started again).

        Once the transfers are queued, the plan of ``step + 1`` under the same rules and settings
        is worked out on the host while the device moves this step's data; the next start of the
        part takes it. A group of one rank has nothing to gather (as Megatron's own gather): no
        work, zero bytes."""
        if not isinstance(part, int) or not 0 <= part < len(self.parts):
            raise ValueError(f"part must be a position in SparseGather.parts (0..{len(self.parts) - 1}), got {part!r}")
        if self.size == 1:
            return PendingSync(SyncBytes(), [])
        prefetched = self._prefetched.pop(part, None)
        if prefetched is not None and prefetched[0] == self._plan_key(rules, step):
            plans = prefetched[1]
        else:
            plans = self.plan(rules, step, part)
        total, launched = SyncBytes(), []
        for plan in plans:
            total += plan.moved
            launched.append((plan, self._launch(plan)))
        self._prefetched[part] = (self._plan_key(rules, step + 1), self.plan(rules, step + 1, part))
        return PendingSync(total, launched)

    def _plan_key(self, rules: dict, step: int) -> tuple:
        settings = (self.route, self.max_padding, self.max_direct_ops, self.max_views, self.chunk_bytes,
                    self.max_chunks)
        return step, tuple(sorted(rules.items())), settings

    def plan(self, rules: dict, step: int, part: int = 0) -> list[_DtypePlan]:
        """Per dtype, the route and the work of ``part``'s sync at ``step`` (no communication).
        Raises ValueError, naming the attribute, for a setting out of range."""
        for name, least in (("chunk_bytes", 1), ("max_chunks", 1), ("max_views", 0), ("max_direct_ops", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"SparseGather.{name} must be an int >= {least}, got {value!r}")
        by_dtype = defaultdict(list)
        for position, ranks in zip(self.parts[part], self.layout(rules, step, part)):
            bucket = self.buckets[position]
            by_dtype[bucket.param_data.dtype].append((bucket, ranks))
        return [self._plan_dtype(part, members) for members in by_dtype.values()]

    def _plan_dtype(self, part: int, members: list) -> _DtypePlan:
        layout = [ranks for _, ranks in members]
        shards = [[self._shard(bucket, r) for r in range(self.size)] for bucket, _ in members]
        counts = [sum(int((ranks[r][:, 1] - ranks[r][:, 0]).sum()) for ranks in layout) for r in range(self.size)]
        item = members[0][0].param_data.element_size()
        dense_slot = sum(bucket.param_data.numel() // self.size for bucket, _ in members) * item
        route, width = self.choose_route(layout, counts), max(counts)
        if route == "in place":  # each rank's changed elements, nothing padded
            mine = counts[self.rank] * item
            moved = SyncBytes.of_gather(mine, sum(counts) * item - mine, dense_slot, self.size)
            return _DtypePlan(route, moved, ops=in_place_ops(shards, layout, self.rank, self.group))
        moved = SyncBytes.of_gather(width * item, (self.size - 1) * width * item, dense_slot, self.size)
        bounds = chunk_bounds(width, item, self.chunk_bytes, self.max_chunks)
        packed = plan_packed(shards, layout, self.rank, self._buffer(part, members, width), bounds, self.max_views)
        return _DtypePlan(route, moved, packed=packed)

    def _buffer(self, part: int, members: list, width: int) -> torch.Tensor:
        """``part``'s gather buffer of ``members``' dtype, grown (by an eighth more) to hold
        ``size`` slots of ``width``; kept between steps."""
        data = members[0][0].param_data
        buffer = self._buffers.get((part, data.dtype))
        needed = self.size * width
        if buffer is None or buffer.numel() < needed:
            buffer = torch.empty(needed + needed // 8, dtype=data.dtype, device=data.device)
            self._buffers[(part, data.dtype)] = buffer
        return buffer

    def _launch(self, plan: _DtypePlan) -> list:
        import torch.distributed as dist

        if plan.packed is not None:
            return plan.packed.start(self.group, self.rank)
        return dist.batch_isend_irecv(plan.ops) if plan.ops else []

    def choose_route(self, layout: list[list[torch.Tensor]], counts: list[int]) -> str:
        """One of :data:`ROUTES` for the changed ranges ``layout[bucket][rank]`` of one dtype,
        whose ranks change ``counts`` elements: :attr:`route` unless it is ``"auto"``; then in
        place where the packed route would move more than :attr:`max_padding` times the changed
        elements and no rank posts more than :attr:`max_direct_ops` transfers
        (:func:`~magma_ext.megatron.in_place_exchange.direct_ops`), else packed. The same on
        every rank (it reads the whole layout)."""
        if self.route != "auto":
            if self.route not in ROUTES:
                raise ValueError(f"SparseGather.route must be 'auto' or one of {ROUTES}, got {self.route!r}")
            return self.route
        padded = self.size * max(counts, default=0)
        if padded > self.max_padding * sum(counts) and direct_ops(layout) <= self.max_direct_ops:
            return "in place"
        return "packed"

    def dense_bytes(self, part: int | None = None) -> SyncBytes:
        """What a dense all-gather of ``part``'s buckets (default every bucket) moves per rank
        (nothing in a group of one)."""
        total = SyncBytes()
        if self.size == 1:
            return total
        for position in range(len(self.buckets)) if part is None else self.parts[part]:
            bucket = self.buckets[position]
            slot = bucket.param_data.numel() // self.size * bucket.param_data.element_size()
            total += SyncBytes.of_gather(0, 0, slot, self.size)
        return total

    def _shard(self, bucket: Bucket, r: int) -> torch.Tensor:
        shard = bucket.param_data.numel() // self.size
        return bucket.param_data.view(-1)[r * shard:(r + 1) * shard]
