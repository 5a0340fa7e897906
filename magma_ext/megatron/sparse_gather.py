"""A parameter all-gather that moves only the blocks Magma kept (sparse parameter sync).

Under a ZeRO-style distributed optimizer each data-parallel rank updates its shard of every
bucket, then the bucket's ``param_data`` is all-gathered so that every rank holds the whole
model again. A block Magma masked this step did not change, and every rank knows which blocks
those are without being told: a mask is a function of (seed, tensor index, block, step). So
every rank computes the same *compact layout*: for every rank's shard, the element ranges that
changed (the kept blocks of masked tensors, and all of every tensor that is not masked). Each
rank then moves its ranges by one of four routes, per dtype, chosen from the layout alone (so
every rank chooses the same; :meth:`SparseGather.choose_route`):

- *packed* (what the default rule mostly takes): each rank packs its own ranges into its slot of
  a gather buffer, in-place ``all_gather_into_tensor`` calls move the packed buffers, padded to
  the largest rank's count (the padding is counted as sent), and each rank copies the other
  ranks' ranges into place.
- *packed p2p*: the same packed buffers, moved unpadded by point-to-point transfers (one
  ``batch_isend_irecv`` per chunk, one send to and one receive from each other rank): a rank
  sends exactly its changed elements. Taken only when forced, until it is measured.
- *packed broadcast*: the same packed buffers, moved unpadded by collectives: a chunk every
  rank fills by ``all_gather_into_tensor``, the others by one grouped broadcast from each rank
  (an uneven all-gather). Taken only when forced, until it is measured.
- *in place*: each rank sends each of its ranges, straight from its bucket, to every other
  rank, which receives it straight into its own bucket; all of these point-to-point transfers
  are one ``torch.distributed.batch_isend_irecv`` (one NCCL group). Nothing is packed, copied or
  padded. Taken when the packed route's padding would move more than
  :attr:`SparseGather.max_padding` times the changed elements (as with tensor blocks at large
  data-parallel sizes, where some rank's whole shard lies in a kept tensor) and no rank posts
  more than :attr:`SparseGather.max_direct_ops` transfers.

The packed routes move their buffers in chunks, unpacking each chunk while the next one is on
the wire (:mod:`magma_ext.megatron.packed_exchange`). The masked ranges already hold the same
values on every rank, so the parameters end bit-identical to those of a dense gather.

The layout and every view and transfer of a step are worked out on the host (numpy, from the
host's step count), during the previous step's transfers: no host synchronisation.

No megatron-core import: the layout functions and :class:`SparseGather` take plain buckets
(``magma_ext.megatron.optimizer`` builds them from Megatron's), so CPU tests check them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from ..layout import BlockLayout
from ..philox import PHILOX_M0, PHILOX_M1, _round_keys, check_seed, keep_threshold
from ..pieces import Piece
from .layout import piece_arguments
from .packed_exchange import PackedPlan, chunk_bounds, plan_packed

__all__ = ["BucketTensor", "Bucket", "BlockTable", "MaskRule", "changed_ranges", "shard_ranges", "SparseGather", "SyncBytes",
           "PendingSync", "bucket_group_parts",
           "buckets_of_chunks", "layout_record", "buckets_of_record", "refuse_unsupported_sparse_gather", "ROUTES"]

ROUTES = ("packed", "packed p2p", "packed broadcast", "in place")  # what SparseGather.route may force
TRANSPORTS = {"packed": "all_gather", "packed p2p": "p2p", "packed broadcast": "broadcast"}  # of the packed routes


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

    Raises ValueError for a bucket whose buffer is not floating point (FP8 and other quantized
    parameters: Megatron post-processes those after its own gather, which this one replaces).
    """
    buckets, groups = [], []
    for chunk in model_chunks:
        for bucket_group in chunk.bucket_groups:
            groups.append(bucket_group.intra_distributed_optimizer_instance_group)
            for bucket in bucket_group.buckets:
                if bucket.param_data is None or not bucket.param_data.is_floating_point():
                    found = "no buffer" if bucket.param_data is None else f"a {bucket.param_data.dtype} buffer"
                    raise ValueError(f"sparse_param_gather: a bucket with {found} (FP8 or other quantized "
                                     "parameters) is not supported: Megatron post-processes those after its "
                                     "own gather")
                tensors = []
                for param in bucket.params_list:
                    whole = piece_arguments(indices[param], tuple(param.shape), 0, param.numel(), slices[param],
                                            split_group=None, replica_group=None)
                    block = blocks[group_of[param]]
                    tensors.append(BucketTensor(start=bucket.param_to_index[param][0], index=indices[param],
                                                layout=Piece(**whole, numel=param.numel()).blocks(block),
                                                rule=group_of[param]))
                buckets.append(Bucket(bucket.param_data, tensors))
    if any(g is not groups[0] for g in groups):
        raise ValueError("sparse_param_gather: the buckets are gathered over several process groups")
    return buckets, (groups[0] if groups else None)


def bucket_group_parts(model_chunks) -> tuple[list, list[list[int]]]:
    """Megatron's dense bucket groups of ``model_chunks`` and, per group, the positions of its
    buckets in what :func:`buckets_of_chunks` returns (the :class:`SparseGather` parts)."""
    groups, parts, count = [], [], 0
    for chunk in model_chunks:
        for bucket_group in chunk.bucket_groups:
            groups.append(bucket_group)
            parts.append(list(range(count, count + len(bucket_group.buckets))))
            count += len(bucket_group.buckets)
    return groups, parts


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


def keep_words(seed: int, tensor_index: np.ndarray, block_index: np.ndarray, step: int) -> np.ndarray:
    """:func:`magma_ext.philox.philox_first_word` in numpy's uint64 arithmetic, for the host's
    per-step layouts (tens of times faster than the torch integer ops on a CPU); the same words
    (tests/test_sparse_gather.py checks it)."""
    low = np.uint64(0xFFFFFFFF)
    shift = np.uint64(32)
    c0 = np.full(tensor_index.shape, step & 0xFFFFFFFF, dtype=np.uint64)
    c1 = np.full(tensor_index.shape, (step >> 32) & 0xFFFFFFFF, dtype=np.uint64)
    c2 = block_index.astype(np.uint64) & low
    c3 = tensor_index.astype(np.uint64) & low
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    for k0, k1 in _round_keys(check_seed(seed)):
        p0, p1 = c0 * m0, c2 * m1  # exact: both factors are below 2**32
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ np.uint64(k0), p1 & low, (p0 >> shift) ^ c3 ^ np.uint64(k1), p0 & low
    return c0


@dataclass(frozen=True)
class BlockTable:
    """Every block of a bucket's tensors as flat numpy arrays, built once: a step's changed ranges
    then take one Philox draw per mask rule for the whole bucket.

    Rows are in bucket order (tensors by start, blocks in order); ``whole`` marks the one row a
    tensor gets when its rule is not masked (its blocks' rows then do not count).
    """

    starts: np.ndarray
    lengths: np.ndarray
    tensor_index: np.ndarray
    block_index: np.ndarray
    rule: np.ndarray
    whole: np.ndarray  # bool
    rule_keys: frozenset

    @classmethod
    def of(cls, tensors: list[BucketTensor]) -> BlockTable:
        columns = [[], [], [], [], [], []]
        for t in sorted(tensors, key=lambda t: t.start):
            if t.layout.numel == 0:
                continue
            lengths = t.layout.lengths()
            starts = [t.start]
            for length in lengths[:-1]:
                starts.append(starts[-1] + length)
            rows = len(lengths) + 1
            columns[0] += [t.start] + starts
            columns[1] += [t.layout.numel] + lengths
            columns[2] += [t.index] * rows
            columns[3] += [0] + list(range(t.layout.first_block, t.layout.first_block + len(lengths)))
            columns[4] += [t.rule] * rows
            columns[5] += [True] + [False] * len(lengths)
        as_int = [np.array(column, dtype=np.int64) for column in columns[:5]]
        return cls(*as_int, np.array(columns[5], dtype=bool), frozenset(columns[4]))

    def changed(self, rules: dict, step: int) -> torch.Tensor:
        """``(k, 2)`` changed element ranges at ``step``, sorted and merged."""
        if not self.rule_keys <= rules.keys():
            raise KeyError(f"no mask rule for the tensors of rules {sorted(self.rule_keys - rules.keys())}")
        take = np.zeros(len(self.starts), dtype=bool)
        for key, rule in rules.items():
            rows = self.rule == key
            if not rule.masked:
                take |= rows & self.whole
                continue
            rows &= ~self.whole
            if rows.any():
                words = keep_words(rule.seed, self.tensor_index[rows], self.block_index[rows], step)
                take[rows] = words < np.uint64(keep_threshold(rule.keep_prob))
        starts = self.starts[take]
        return _merge(torch.from_numpy(np.stack([starts, starts + self.lengths[take]], axis=1)))


def changed_ranges(tensors: list[BucketTensor], rules: dict, step: int) -> torch.Tensor:
    """``(k, 2)`` int64 ``[start, stop)`` element ranges of a bucket that change at ``step``
    (sorted, adjacent ranges merged): every element of a tensor whose rule is not masked, the
    kept blocks' elements of the others. Elements outside every tensor (padding) never change."""
    return BlockTable.of(tensors).changed(rules, step)


def _merge(ranges: torch.Tensor) -> torch.Tensor:
    """Merge sorted ranges that touch or overlap."""
    if len(ranges) <= 1:
        return ranges
    r = ranges.numpy()
    running_end = np.maximum.accumulate(r[:, 1])
    new = np.ones(len(r), dtype=bool)
    new[1:] = r[1:, 0] > running_end[:-1]
    firsts = np.flatnonzero(new)
    ends = np.maximum.reduceat(r[:, 1], firsts)
    return torch.from_numpy(np.stack([r[firsts, 0], ends], axis=1))


def shard_ranges(ranges: torch.Tensor, numel: int, size: int) -> list[torch.Tensor]:
    """``ranges`` (sorted and disjoint, as :func:`changed_ranges` gives them) of a bucket of
    ``numel`` elements cut at the shard boundaries of ``size`` ranks: per rank, ``(k_r, 2)``
    ranges in that rank's shard coordinates."""
    shard = numel // size
    r = ranges.numpy()
    out = []
    for rank in range(size):
        lo, hi = rank * shard, (rank + 1) * shard
        # ranges are sorted and disjoint: the ones that overlap [lo, hi) are one run of them
        first, last = np.searchsorted(r[:, 1], lo, side="right"), np.searchsorted(r[:, 0], hi, side="left")
        clipped = np.clip(r[first:last], lo, hi) - lo
        out.append(torch.from_numpy(np.ascontiguousarray(clipped[clipped[:, 1] > clipped[:, 0]])))
    return out


@dataclass
class SyncBytes:
    """Bytes one rank sent and received in one parameter sync, and what a dense gather moves,
    counted as an all-gather counts them: ``sent`` is this rank's own contribution (once, padding
    included), ``received`` the other ranks' contributions that arrive."""

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

    def moved_densely(self) -> SyncBytes:
        """What a dense gather moves, as the bytes of a sync that ran one (``sent``, ``received``
        set to the dense figures)."""
        return SyncBytes(self.dense_sent, self.dense_received, self.dense_sent, self.dense_received)

    @property
    def fraction(self) -> float:
        """Sparse bytes over dense bytes (sent + received)."""
        dense = self.dense_sent + self.dense_received
        return (self.sent + self.received) / dense if dense else 0.0


@dataclass
class _DtypePlan:
    """One dtype's share of a step's sync: its route, what it moves, and the work to run it."""

    route: str
    moved: SyncBytes
    packed: PackedPlan | None = None  # the packed routes
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
    description); set :attr:`route` to one of :data:`ROUTES` to force it. The packed routes move
    each rank's packed ranges in chunks of about :attr:`chunk_bytes` per rank (at most
    :attr:`max_chunks`), unpacking one chunk while the next is on the wire
    (:mod:`magma_ext.megatron.packed_exchange`); a shard's ranges in a chunk are copied as views
    when they are at most :attr:`max_views`, else by element positions built on the device.
    Each sync works out the next step's plan (views, transfers) while its own transfers run.

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
    # to 2.3x (keep 0.1) of padding. Larger data-parallel sizes are not measured yet, nor is
    # "packed p2p" or "packed broadcast" (the packed streams moved unpadded), which auto does not
    # take yet.
    max_padding = 2.0
    max_direct_ops = 1024  # sends + receives one rank may post on the in-place route
    max_views = 256  # on the packed routes, a shard's run of more ranges than this goes by positions
    chunk_bytes = 64 * 2**20  # per rank and chunk on the packed routes
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
        self._buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # the packed routes' gather buffers
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
        return [self._plan_dtype(part, dtype, members) for dtype, members in by_dtype.items()]

    def _plan_dtype(self, part: int, dtype: torch.dtype, members: list) -> _DtypePlan:
        counts = [sum(int((ranks[r][:, 1] - ranks[r][:, 0]).sum()) for _, ranks in members) for r in range(self.size)]
        item = torch.empty((), dtype=dtype).element_size()
        dense = sum(bucket.param_data.numel() // self.size for bucket, _ in members) * item
        route, width = self.choose_route(members, counts), max(counts)
        if route == "packed":
            moved = SyncBytes(width * item, (self.size - 1) * width * item, dense, (self.size - 1) * dense)
        else:  # each rank's changed elements, nothing padded
            moved = SyncBytes(counts[self.rank] * item, (sum(counts) - counts[self.rank]) * item, dense,
                              (self.size - 1) * dense)
        if route == "in place":
            return _DtypePlan(route, moved, ops=self._in_place_ops(members))
        bounds = chunk_bounds(width, item, self.chunk_bytes, self.max_chunks)
        shards = [[self._shard(bucket, r) for r in range(self.size)] for bucket, _ in members]
        packed = plan_packed(shards, [ranks for _, ranks in members], self.rank, self._buffer(part, members, width),
                             TRANSPORTS[route], bounds, self.max_views)
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

    def choose_route(self, members: list, counts: list[int]) -> str:
        """One of :data:`ROUTES` for ``members`` (``[(bucket, its ranges per rank)]``) whose
        ranks change ``counts`` elements: :attr:`route` unless it is ``"auto"``; then in place
        where the packed route would move more than :attr:`max_padding` times the changed
        elements and no rank posts more than :attr:`max_direct_ops` transfers, else packed. The
        same on every rank (it reads the whole layout)."""
        if self.route != "auto":
            if self.route not in ROUTES:
                raise ValueError(f"SparseGather.route must be 'auto' or one of {ROUTES}, got {self.route!r}")
            return self.route
        padded = self.size * max(counts, default=0)
        if padded > self.max_padding * sum(counts) and self.direct_ops(members) <= self.max_direct_ops:
            return "in place"
        return "packed"

    def direct_ops(self, members: list) -> int:
        """The most point-to-point transfers any rank posts to move ``members`` (``[(bucket, its
        ranges per rank)]``) in place: each of its ranges to every other rank, and every other
        rank's ranges from them. The same on every rank (it reads the whole layout)."""
        ranges = [sum(len(ranks[r]) for _, ranks in members) for r in range(self.size)]
        total = sum(ranges)
        return max((self.size - 1) * mine + total - mine for mine in ranges)

    def _in_place_ops(self, members: list) -> list:
        """The in-place route's transfers: this rank's ranges from its shards to every other
        rank, and theirs into their shards of this rank's buckets."""
        import torch.distributed as dist

        ops = []
        for peer in range(self.size):
            if peer == self.rank:
                continue
            for bucket, ranks in members:
                mine, theirs = self._shard(bucket, self.rank), self._shard(bucket, peer)
                # a peer posts its receives from this rank in the order this rank posts its sends
                ops += [dist.P2POp(dist.isend, mine[a:b], group=self.group, group_peer=peer)
                        for a, b in ranks[self.rank].tolist()]
                ops += [dist.P2POp(dist.irecv, theirs[a:b], group=self.group, group_peer=peer)
                        for a, b in ranks[peer].tolist()]
        return ops

    def dense_bytes(self, part: int | None = None) -> SyncBytes:
        """What a dense all-gather of ``part``'s buckets (default every bucket) moves per rank
        (nothing in a group of one)."""
        total = SyncBytes()
        if self.size == 1:
            return total
        for position in range(len(self.buckets)) if part is None else self.parts[part]:
            bucket = self.buckets[position]
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
