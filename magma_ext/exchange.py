"""Adding up the block sums of blocks split between ranks (docs/ALGORITHM.md sections 1 and 3).

In sharded training a rank holds pieces of logical tensors (:class:`magma_ext.pieces.Piece`).
Per parameter group and device the optimizer computes ``block_sums``, a float32 tensor of shape
``(B, 3)``: the partial sums ``<m, g>``, ``||m||^2``, ``||g||^2`` of each block of each local
piece, in the step's list order (piece 0's blocks, then piece 1's, ...), where piece ``i``'s
blocks are ``pieces[i].blocks(block)``. A block that several pieces overlap needs the sum of
all their rows before its score is formed; this module adds them up::

    exchange = BlockSumExchange.build([PieceRecord(piece, block, name), ...], device)  # collective, once
    ...
    exchange.reduce_(block_sums)   # every step, between the sums pass and the score pass

Masks are never communicated: they depend only on the tensor index and the block index.

**Records.** A :class:`PieceRecord` is a piece with what the other ranks need beside it: the
``block`` option that cuts it, a name for error messages and its kind ("tensor" for a declared
piece, "dtensor" for a DTensor shard). Ranks exchange records without their process groups.

**The layout** (:func:`shared_block_layout`, pure, the same on every rank): given the records
of every rank of a group, the *shared blocks* are the blocks that two or more pieces overlap
(on two ranks, or two pieces on one rank), sorted by (tensor index, block index); each rank maps
its local rows to positions in a buffer of one row per shared block. Only a piece's first and
last block can be shared (pieces do not overlap), so the layout costs O(pieces log pieces),
whatever the tensors' sizes; pieces of column slices (``Piece.split``) share every block they
overlap with the other slices and cost O(their blocks).

**build** is collective over every process group that a piece names or that ``groups`` lists:
every member rank of such a group must call it (with ``groups`` naming the groups it holds no
piece of, e.g. a rank of a data-parallel group whose shard of this parameter group is empty).
Groups are visited in an order all ranks agree on (sorted by their ranks, then name) and each
does one ``all_gather_object`` of the records of its pieces. A problem found locally (blocks a
piece cannot have, overlapping local pieces, a piece of a group the rank is not in) is not
raised before the exchanges, which would leave the other ranks waiting: it is sent along, and
after the exchanges every member of a group raises the error of the lowest-numbered failing
rank of the first (in the agreed order) group that has one. Errors found in the gathered
records (pieces of different ranks overlapping, different logical shapes, block sizes or kinds
for one tensor index) are computed from identical data on every rank, so every rank raises the
same ``ValueError``. With an NCCL group, ``all_gather_object`` uses the current CUDA device: set
it first (``torch.cuda.set_device``).

**reduce_** does, per group with shared blocks held by two or more ranks, exactly one
``torch.distributed.all_reduce(SUM)`` of a ``(shared blocks, 3)`` buffer, with index tensors
built once: no host synchronization, gloo on CPU or NCCL on CUDA. The all-reduce gives every
rank the same bits, so every piece of a block forms the same score. Groups without such blocks
(a group of one rank, say) do no collective: the layout is the same on every rank, so they all
know. Two local pieces sharing a block are summed in a fixed order (deterministic on CUDA).

Not checked, because no one group sees it: pieces of one tensor index declared with different
process groups on different ranks, or with a group on one rank and without one on another.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .layout import BlockLayout
from .pieces import Piece, ProcessGroup

__all__ = ["PieceRecord", "SharedLayout", "shared_block_layout", "BlockSumExchange"]

SUMS = 3  # <m, g>, ||m||^2, ||g||^2
BYTES_PER_SHARED_BLOCK = SUMS * 4  # float32


class PieceRecord(NamedTuple):
    """A local piece as the exchange sees it: the piece, the ``block`` option cutting it into
    blocks, a name for errors (may differ between ranks) and its kind (one tensor index must
    have one kind on every rank)."""

    piece: Piece
    block: str | int
    name: str = ""
    kind: str = "tensor"

    @property
    def layout(self) -> BlockLayout:
        """The piece's blocks: its rows in ``block_sums``."""
        return self.piece.blocks(self.block)

    def label(self) -> str:
        return f"piece {self.name!r} (tensor index {self.piece.index})"

    def sent(self) -> PieceRecord:
        """The record as other ranks receive it: without the process group, which only names
        something in this process."""
        return self._replace(piece=dataclasses.replace(self.piece, group=None))


@dataclass(frozen=True)
class SharedLayout:
    """The shared blocks of a group and where each rank's rows of them go.

    Attributes:
        blocks: ``(tensor index, block index)`` of each shared block, sorted: the buffer's rows.
        holders: how many distinct ranks hold part of each shared block.
        rows: per rank (position in the group), its rows (into its ``block_sums``, whose rows
            are its records' blocks in list order) that belong to a shared block, ascending.
        positions: per rank, the buffer row of each of those rows (two local pieces of one block
            give two rows with the same position).
        num_rows: per rank, the rows of its ``block_sums`` (blocks of all its records).
    """

    blocks: tuple[tuple[int, int], ...]
    holders: tuple[int, ...]
    rows: tuple[tuple[int, ...], ...]
    positions: tuple[tuple[int, ...], ...]
    num_rows: tuple[int, ...]

    @property
    def cross_rank(self) -> bool:
        """Whether some block is held by two or more ranks: an all-reduce is needed."""
        return any(count >= 2 for count in self.holders)


def shared_block_layout(records_by_rank: Sequence[Sequence[PieceRecord]],
                        ranks: Sequence[int] | None = None) -> SharedLayout:
    """Check the records of every rank of a group together and lay out their shared blocks.

    ``records_by_rank[r]`` lists rank ``r``'s pieces in its step order; ``ranks`` gives the
    ranks' numbers for error messages (default 0, 1, ...). Pure and deterministic: every rank
    computes the same layout, or raises the same ``ValueError``.

    Raises:
        ValueError: pieces of one tensor index that overlap (on one rank or on two), or that
            disagree on the logical shape, the block size, the column slices or the kind.
    """
    ranks = list(range(len(records_by_rank))) if ranks is None else list(ranks)
    if len(ranks) != len(records_by_rank):
        raise ValueError(f"{len(records_by_rank)} ranks' records but {len(ranks)} rank numbers")
    by_index: dict[int, list[tuple[int, PieceRecord, BlockLayout, int]]] = defaultdict(list)
    num_rows = []
    for r, records in enumerate(records_by_rank):
        row = 0
        for record in records:
            layout = record.layout
            by_index[record.piece.index].append((r, record, layout, row))
            row += layout.num_blocks
        num_rows.append(row)
    touched: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for index in sorted(by_index):
        entries = by_index[index]
        _check_agreement(entries, ranks)
        held = sorted((e for e in entries if e[1].piece.numel),
                      key=lambda e: (e[1].piece.split[0], e[1].piece.offset, e[0]))
        for (ra, a, _, _), (rb, b, _, _) in zip(held, held[1:]):
            pa, pb = a.piece, b.piece
            if pa.split == pb.split and pa.offset + pa.numel > pb.offset:
                raise ValueError(
                    f"pieces of tensor index {index} overlap: {a.name!r} holds [{pa.offset}, "
                    f"{pa.offset + pa.numel}) on rank {ranks[ra]} and {b.name!r} holds [{pb.offset}, "
                    f"{pb.offset + pb.numel}) on rank {ranks[rb]}"
                )
        for r, record, layout, row in held:
            first, last = layout.first_block, layout.first_block + layout.num_blocks - 1
            # pieces of one slice overlap each other's blocks only at their ends; pieces of
            # different column slices can share every block (every row runs through each slice)
            inner = range(first + 1, last) if record.piece.parts > 1 else ()
            for block in (first, *inner, *((last,) if last != first else ())):
                touched[(index, block)].append((r, row + block - first))
    blocks = sorted(key for key, holders in touched.items() if len(holders) >= 2)
    rows = [[] for _ in ranks]
    for position, key in enumerate(blocks):
        for r, row in touched[key]:
            rows[r].append((row, position))
    for pairs in rows:
        pairs.sort()
    return SharedLayout(
        blocks=tuple(blocks),
        holders=tuple(len({r for r, _ in touched[key]}) for key in blocks),
        rows=tuple(tuple(row for row, _ in pairs) for pairs in rows),
        positions=tuple(tuple(position for _, position in pairs) for pairs in rows),
        num_rows=tuple(num_rows),
    )


def _check_agreement(entries, ranks) -> None:
    """Pieces of one tensor index agree on kind, logical shape, block size and column slices."""
    facts = (("kind", "kind", lambda record, layout: record.kind),
             ("logical shape", "shape", lambda record, layout: record.piece.shape),
             ("block size", "block_size", lambda record, layout: layout.block_size),
             ("column slice count", "parts", lambda record, layout: record.piece.parts))
    r0, first, layout0, _ = entries[0]
    for what, field, fact in facts:
        for r, record, layout, _ in entries[1:]:
            if fact(record, layout) != fact(first, layout0):
                hint = "; give one logical tensor one way" if field == "kind" else ""
                raise ValueError(
                    f"tensor index {first.piece.index} has {what} {fact(first, layout0)!r} in {first.name!r} "
                    f"on rank {ranks[r0]} but {fact(record, layout)!r} in {record.name!r} on rank {ranks[r]}{hint}"
                )


@dataclass
class _GroupPlan:
    """One group's part of ``reduce_``: index tensors on the step's device."""

    group: object
    ranks: tuple[int, ...]
    layout: SharedLayout
    collective: bool
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # (local rows, positions), positions unique per layer
    rows: torch.Tensor  # every local row of a shared block ...
    positions: torch.Tensor  # ... and its buffer row
    direct: bool = False  # every row of block_sums is shared, in buffer order: all-reduce it in place


class BlockSumExchange:
    """Adds up, in place, the rows of ``block_sums`` that belong to blocks split between pieces.

    Make one with :meth:`build` (collective) and call :meth:`reduce_` every step.

    Attributes:
        num_rows: rows ``block_sums`` must have (blocks of all local pieces).
        device: where ``block_sums`` must live.
        collectives_per_step: all-reduces one ``reduce_`` issues (groups with blocks held by two
            or more ranks).
        bytes_per_step: bytes those all-reduces carry per rank (float32, 3 sums per shared block).
        layouts: ``(ranks of the group, SharedLayout)`` of each group, in the agreed order.
    """

    def __init__(self, num_rows: int, device: torch.device, plans: list[_GroupPlan],
                 layouts: list[tuple[tuple[int, ...], SharedLayout]]):
        self.num_rows = num_rows
        self.device = device
        self._plans = plans
        self.layouts = layouts
        self.collectives_per_step = sum(plan.collective for plan in plans)
        self.bytes_per_step = sum(len(plan.layout.blocks) * BYTES_PER_SHARED_BLOCK
                                  for plan in plans if plan.collective)

    @classmethod
    def build(cls, records: Iterable[PieceRecord], device, *,
              groups: Iterable[ProcessGroup] = ()) -> BlockSumExchange:
        """COLLECTIVE: exchange the local pieces' records and lay out the shared blocks.

        Args:
            records: a :class:`PieceRecord` of every local piece, in the step's list order (the
                order of ``block_sums``' rows); its piece's ``group`` holds the logical tensor's
                other pieces (None: a whole tensor).
            device: the device of ``block_sums``; the index tensors are built there.
            groups: process groups to join although no local piece names them (this rank
                holds nothing of them this time); every member of a group must call ``build``.

        Raises:
            ValueError, TypeError: on every member rank of a group, the same error (see the
                module docstring), after the exchanges.
            RuntimeError: a group is given but torch.distributed is not initialized.
        """
        import torch.distributed as dist

        device = _normalize_device(device)
        records = list(records)
        initialized = dist.is_available() and dist.is_initialized()
        me = dist.get_rank() if initialized else 0
        error = None  # (exception type name, message) of the first local problem
        for i, record in enumerate(records):
            if not isinstance(record, PieceRecord):
                error = ("TypeError", f"records[{i}] must be a PieceRecord, got {type(record).__name__}")
                records = []
                break
        extra = []
        for group in groups:
            if not _is_group(group):
                error = error or ("TypeError", f"groups must hold ProcessGroups, got {type(group).__name__}")
            else:
                extra.append(group)
        piece_groups = [record.piece.group for record in records]
        named = [g for g in piece_groups if g is not None] + extra
        if named and not initialized:
            raise RuntimeError("BlockSumExchange.build: pieces name process groups but "
                               "torch.distributed is not initialized")
        # A group is known by (its ranks, its name): the same on every rank, and the same for two
        # Python objects of one process group. Groups are visited in that order.
        keys = [_group_key(g) for g in piece_groups]
        by_key = {}
        for g in named:
            by_key.setdefault(_group_key(g), g)
        # a group this rank is not in (a caller's mistake, reported below) is not joined
        ordered = sorted(key for key in by_key if me in key[0])
        if error is None:
            error = _local_problem(records, keys, me)

        gathered = []
        for key in ordered:
            mine = [r.sent() for r, k in zip(records, keys) if k == key] if error is None else []
            received = [None] * len(key[0])
            dist.all_gather_object(received, (mine, error), group=by_key[key])
            gathered.append(received)

        for received in gathered:
            for _, remote_error in received:
                if remote_error is not None:
                    kind, message = remote_error
                    raise (TypeError if kind == "TypeError" else ValueError)(message)
        if error is not None:
            raise (TypeError if error[0] == "TypeError" else ValueError)(error[1])

        sizes = [record.layout.num_blocks for record in records]
        row_starts, row = [], 0
        for size in sizes:
            row_starts.append(row)
            row += size
        plans, layouts = [], []
        for key, received in zip(ordered, gathered):
            ranks = key[0]
            layout = shared_block_layout([mine for mine, _ in received], ranks)
            layouts.append((ranks, layout))
            local = [start for start, k in zip(row_starts, keys) if k == key]
            group_sizes = [size for size, k in zip(sizes, keys) if k == key]
            plan = _plan(by_key[key], ranks, layout, ranks.index(me), local, group_sizes, device, row)
            if plan is not None:
                plans.append(plan)
        return cls(row, device, plans, layouts)

    def reduce_(self, block_sums: torch.Tensor) -> torch.Tensor:
        """Replace, in place, each row of a shared block by the block's sum over all its pieces.

        ``block_sums``: ``(num_rows, 3)`` (float32) on ``device``. Issues
        ``collectives_per_step`` all-reduces and no host synchronization. Returns ``block_sums``.
        """
        import torch.distributed as dist

        if not isinstance(block_sums, torch.Tensor):
            raise TypeError(f"block_sums must be a tensor, got {type(block_sums).__name__}")
        if block_sums.dim() != 2 or block_sums.shape[0] != self.num_rows:
            raise ValueError(f"block_sums must have shape ({self.num_rows}, {SUMS}), got "
                             f"{tuple(block_sums.shape)}")
        if block_sums.device != self.device:
            raise ValueError(f"block_sums is on {block_sums.device}, the exchange was built for {self.device}")
        width = block_sums.shape[1]
        for plan in self._plans:
            if plan.direct and plan.collective and block_sums.is_contiguous():
                # FSDP2's tensor blocks: every block is shared, in order; no copies needed
                dist.all_reduce(block_sums, op=dist.ReduceOp.SUM, group=plan.group)
                continue
            size = len(plan.layout.blocks)
            if len(plan.layers) == 1:
                rows, positions = plan.layers[0]
                buffer = block_sums.new_zeros((size, width))
                buffer.index_copy_(0, positions, block_sums.index_select(0, rows))
            elif plan.layers:
                stacked = block_sums.new_zeros((len(plan.layers), size, width))
                for layer, (rows, positions) in zip(stacked, plan.layers):
                    layer.index_copy_(0, positions, block_sums.index_select(0, rows))
                buffer = stacked.sum(dim=0)  # a fixed order: deterministic
            else:  # this rank holds none of the group's shared blocks, but joins the all-reduce
                buffer = block_sums.new_zeros((size, width))
            if plan.collective:
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=plan.group)
            if plan.rows.numel():
                block_sums.index_copy_(0, plan.rows, buffer.index_select(0, plan.positions))
        return block_sums


def _plan(group, ranks, layout: SharedLayout, me: int, local_starts: list[int], sizes: list[int],
          device, num_rows: int) -> _GroupPlan | None:
    """Index tensors for this rank, its group-local rows translated to rows of ``block_sums``."""
    starts, group_starts, row = [], [], 0
    for start, size in zip(local_starts, sizes):
        if size:
            starts.append(start)
            group_starts.append(row)
        row += size
    by_position: dict[int, list[int]] = defaultdict(list)
    for group_row, position in zip(layout.rows[me], layout.positions[me]):
        j = bisect.bisect_right(group_starts, group_row) - 1
        by_position[position].append(starts[j] + group_row - group_starts[j])
    depth = max((len(rows) for rows in by_position.values()), default=0)
    if not layout.cross_rank and depth < 2:
        return None  # nothing to add up here, and no rank of the group all-reduces
    as_index = dict(dtype=torch.int64, device=device)
    layers = []
    for k in range(depth):
        pairs = sorted((rows[k], p) for p, rows in by_position.items() if len(rows) > k)
        layers.append((torch.tensor([r for r, _ in pairs], **as_index),
                       torch.tensor([p for _, p in pairs], **as_index)))
    pairs = sorted((r, p) for p, rows in by_position.items() for r in rows)
    identity = list(range(num_rows))
    direct = (depth == 1 and len(layout.blocks) == num_rows and [r for r, _ in pairs] == identity
              and [p for _, p in pairs] == identity)
    return _GroupPlan(
        group=group, ranks=ranks, layout=layout, collective=layout.cross_rank, layers=layers,
        rows=torch.tensor([r for r, _ in pairs], **as_index),
        positions=torch.tensor([p for _, p in pairs], **as_index), direct=direct,
    )


def _local_problem(records, keys, me) -> tuple[str, str] | None:
    """The first problem one rank can see in its own pieces, as (exception type, message)."""
    try:
        shared_block_layout([records], [me])
    except ValueError as error:
        return ("ValueError", str(error))
    first_group = {}
    for record, group in zip(records, keys):
        piece = record.piece
        if group is None and not piece.is_whole:
            return ("ValueError", f"{record.label()} on rank {me} holds [{piece.offset}, "
                                  f"{piece.offset + piece.numel}) of {piece.logical_numel} elements"
                                  f"{'' if piece.parts == 1 else f' of column slice {piece.split[0]}'} without "
                                  "a process group: a piece without one must be the whole tensor")
        if group is not None and me not in group[0]:
            return ("ValueError", f"{record.label()}: rank {me} is not a member of its process group "
                                  f"(ranks {list(group[0])})")
        earlier = first_group.setdefault(piece.index, (record, group))
        if earlier[1] != group:
            def show(key):
                if key is None:
                    return "no process group"
                return f"process group {key[1]!r} (ranks {list(key[0])})"
            return ("ValueError", f"tensor index {piece.index} on rank {me}: {earlier[0].name!r} names "
                                  f"{show(earlier[1])} but {record.name!r} names {show(group)}; all pieces of "
                                  "a logical tensor must name one group")
    return None


def _is_group(group) -> bool:
    return ProcessGroup is not None and isinstance(group, ProcessGroup)


def _group_key(group) -> tuple[tuple[int, ...], str] | None:
    """(ranks, name) of a process group; None for None."""
    if group is None:
        return None
    import torch.distributed as dist

    try:
        name = str(group.group_name)
    except Exception:  # a group without a registered name: known by its object alone
        name = f"<unnamed {id(group):x}>"
    return tuple(dist.get_process_group_ranks(group)), name


def _normalize_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
