"""Adding up the block sums of blocks split between ranks (docs/ALGORITHM.md sections 1 and 3).

In sharded training a rank holds pieces of logical tensors (``magma_ext.pieces``). Per parameter
group and device the optimizer computes ``block_sums``, a float32 tensor of shape ``(B, 3)``:
the partial sums ``<m, g>``, ``||m||^2``, ``||g||^2`` of each block of each local piece, in the
step's list order (piece 0's blocks, then piece 1's, ...), where piece ``i``'s blocks are those of
``BlockLayout(numel, block_size, offset, logical_numel)``. A block that several pieces overlap
needs the sum of all their rows before its score is formed; this module adds them up::

    exchange = BlockSumExchange.build([(descriptor, group), ...], device)   # collective, once
    ...
    exchange.reduce_(block_sums)   # every step, between the sums pass and the score pass

Masks are never communicated: they depend only on the tensor index and the block index.

**Descriptors.** A :class:`PieceDescriptor` is plain, picklable data: ``(index, offset, numel,
shape, block_size, name, kind)`` (see the class); :meth:`PieceDescriptor.of` makes one from a
:class:`~magma_ext.pieces.Piece`. Descriptors are checked by :meth:`PieceDescriptor.problem` and
:func:`shared_block_layout`, never when constructed, so that a bad one on one rank can be
reported on every rank (below).

**The layout** (:func:`shared_block_layout`, pure, the same on every rank): given the
descriptors of every rank of a group, the *shared blocks* are the blocks that two or more
pieces overlap (on two ranks, or two pieces on one rank), sorted by (tensor index, block
index); each rank maps its local rows to positions in a buffer of one row per shared block.
Only a piece's first and last block can be shared (pieces do not overlap), so the layout costs
O(pieces log pieces), whatever the tensors' sizes; pieces of column slices (``Piece.split``)
share every block they overlap with the other slices and cost O(their blocks).

**build** is collective over every process group that a piece names or that ``groups`` lists:
every member rank of such a group must call it (with ``groups`` naming the groups it holds no
piece of, e.g. a rank of a data-parallel group whose shard of this parameter group is empty).
Groups are visited in an order all ranks agree on (sorted by their ranks, then name) and each
does one ``all_gather_object`` of the descriptors of its pieces. A problem found locally (a bad
descriptor, overlapping local pieces, a piece of a group the rank is not in) is not raised
before the exchanges, which would leave the other ranks waiting: it is sent along, and after
the exchanges every member of a group raises the error of the lowest-numbered failing rank of
the first (in the agreed order) group that has one. Errors found in the gathered descriptors
(pieces of different ranks overlapping, different logical shapes, block sizes or kinds for one
tensor index, a range outside the logical tensor, more than 2**32 blocks) are computed from
identical data on every rank, so every rank raises the same ``ValueError``. With an NCCL group,
``all_gather_object`` uses the current CUDA device: set it first (``torch.cuda.set_device``).

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
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .layout import MAX_BLOCK_INDEX, MAX_TENSOR_INDEX, block_size_for, numel_of, piece_blocks
from .pieces import Piece, ProcessGroup

__all__ = ["PieceDescriptor", "SharedLayout", "shared_block_layout", "BlockSumExchange"]

SUMS = 3  # <m, g>, ||m||^2, ||g||^2
BYTES_PER_SHARED_BLOCK = SUMS * 4  # float32


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class PieceDescriptor:
    """What the other ranks need to know about one local piece (picklable plain data).

    Attributes:
        index: tensor index of the logical tensor, in [0, 2**32).
        offset: first element of the piece in the flattened logical tensor.
        numel: elements of the piece (0: an empty piece, no blocks).
        shape: the logical tensor's shape.
        block_size: elements per block (``layout.block_size_for(shape, block)``).
        name: how errors name the piece (a parameter name, say); may differ between ranks.
        kind: how the piece was described ("tensor" for a declared piece, "dtensor" for a
            DTensor shard, ...): one tensor index must have one kind on every rank.
        part, parts: the piece lies in column slice ``part`` of ``parts`` of its logical tensor
            (see :class:`~magma_ext.pieces.Piece`); ``offset`` counts elements of that slice, and
            blocks are numbered as in the logical tensor, so pieces of different slices share
            blocks (their sums add up) but never overlap.
    """

    index: int
    offset: int
    numel: int
    shape: tuple[int, ...]
    block_size: int
    name: str = ""
    kind: str = "tensor"
    part: int = 0
    parts: int = 1

    @classmethod
    def of(cls, piece: Piece, numel: int, block, *, name: str = "", kind: str = "tensor") -> PieceDescriptor:
        """The descriptor of a piece of ``numel`` elements under the ``block`` option."""
        return cls(piece.index, piece.offset, numel, piece.shape, block_size_for(piece.slice_shape, block),
                   name, kind, *piece.split)

    @property
    def logical_numel(self) -> int:
        return numel_of(self.shape)

    @property
    def slice_numel(self) -> int:
        """Elements of the column slice the piece lies in (the logical tensor when not cut)."""
        if not _is_int(self.parts) or self.parts <= 1 or len(self.shape) < 2:
            return self.logical_numel
        return self.logical_numel // self.parts

    @property
    def first_block(self) -> int:
        return piece_blocks(self.offset, self.numel, self.block_size)[0]

    @property
    def num_blocks(self) -> int:
        """Blocks overlapping the piece: its rows in ``block_sums``."""
        return piece_blocks(self.offset, self.numel, self.block_size)[1]

    def label(self) -> str:
        return f"piece {self.name!r} (tensor index {self.index!r})"

    def problem(self) -> str | None:
        """What is wrong with this descriptor on its own, or None."""
        try:
            return self._problem()
        except Exception as error:  # a field of a type nobody expected
            return f"{self.label()}: invalid descriptor ({type(error).__name__}: {error})"

    def _problem(self) -> str | None:
        label = self.label()
        if not isinstance(self.name, str) or not isinstance(self.kind, str):
            return f"{label}: name and kind must be strings"
        if not _is_int(self.index) or not 0 <= self.index < MAX_TENSOR_INDEX:
            return f"{label}: the tensor index must be an int in [0, 2**32)"
        if not (isinstance(self.shape, tuple) and all(_is_int(s) and s >= 0 for s in self.shape)):
            return f"{label}: the logical shape must be a tuple of ints >= 0, got {self.shape!r}"
        if not _is_int(self.block_size) or self.block_size < 1:
            return f"{label}: block_size must be an int >= 1, got {self.block_size!r}"
        if not (_is_int(self.offset) and _is_int(self.numel)) or self.offset < 0 or self.numel < 0:
            return f"{label}: offset and numel must be ints >= 0, got {self.offset!r} and {self.numel!r}"
        if not (_is_int(self.part) and _is_int(self.parts)) or not 0 <= self.part < self.parts or (
                self.parts > 1 and (len(self.shape) < 2 or self.shape[1] % self.parts)):
            return (f"{label}: column slice {self.part!r} of {self.parts!r} does not cut a logical tensor "
                    f"of shape {self.shape} along dimension 1")
        logical = self.slice_numel
        if self.offset + self.numel > logical:
            where = "its logical tensor" if self.parts == 1 else f"column slice {self.part} of {self.parts}"
            return (f"{label}: holds [{self.offset}, {self.offset + self.numel}), outside {where} "
                    f"of shape {self.shape} ({logical} elements)")
        if -(-logical // self.block_size) > MAX_BLOCK_INDEX:
            return (f"{label}: a tensor of {logical} elements in blocks of {self.block_size} has "
                    "more than 2**32 blocks; use a larger block")
        return None


@dataclass(frozen=True)
class SharedLayout:
    """The shared blocks of a group and where each rank's rows of them go.

    Attributes:
        blocks: ``(tensor index, block index)`` of each shared block, sorted: the buffer's rows.
        holders: how many distinct ranks hold part of each shared block.
        rows: per rank (position in the group), its rows (into its ``block_sums``, whose rows
            are its descriptors' blocks in list order) that belong to a shared block, ascending.
        positions: per rank, the buffer row of each of those rows (two local pieces of one block
            give two rows with the same position).
        num_rows: per rank, the rows of its ``block_sums`` (blocks of all its descriptors).
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


def shared_block_layout(descriptors_by_rank: Sequence[Sequence[PieceDescriptor]],
                        ranks: Sequence[int] | None = None) -> SharedLayout:
    """Validate the descriptors of every rank of a group and lay out their shared blocks.

    ``descriptors_by_rank[r]`` lists rank ``r``'s pieces in its step order; ``ranks`` gives the
    ranks' numbers for error messages (default 0, 1, ...). Pure and deterministic: every rank
    computes the same layout, or raises the same ``ValueError``.

    Raises:
        ValueError: a descriptor's own problem (see :meth:`PieceDescriptor.problem`), pieces of
            one tensor index that overlap (on one rank or on two), or that disagree on the
            logical shape, the block size or the kind.
    """
    ranks = list(range(len(descriptors_by_rank))) if ranks is None else list(ranks)
    if len(ranks) != len(descriptors_by_rank):
        raise ValueError(f"{len(descriptors_by_rank)} ranks' descriptors but {len(ranks)} rank numbers")
    by_index: dict[int, list[tuple[int, PieceDescriptor, int]]] = defaultdict(list)
    num_rows = []
    for r, descriptors in enumerate(descriptors_by_rank):
        row = 0
        for d in descriptors:
            if not isinstance(d, PieceDescriptor):
                raise ValueError(f"rank {ranks[r]} sent a {type(d).__name__}, not a PieceDescriptor")
            problem = d.problem()
            if problem is not None:
                raise ValueError(f"{problem} (on rank {ranks[r]})")
            by_index[d.index].append((r, d, row))
            row += d.num_blocks
        num_rows.append(row)
    touched: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for index in sorted(by_index):
        entries = by_index[index]
        _check_agreement(entries, ranks)
        held = sorted((e for e in entries if e[1].numel), key=lambda e: (e[1].part, e[1].offset, e[0]))
        for (ra, a, _), (rb, b, _) in zip(held, held[1:]):
            if a.part == b.part and a.offset + a.numel > b.offset:
                raise ValueError(
                    f"pieces of tensor index {index} overlap: {a.name!r} holds [{a.offset}, "
                    f"{a.offset + a.numel}) on rank {ranks[ra]} and {b.name!r} holds [{b.offset}, "
                    f"{b.offset + b.numel}) on rank {ranks[rb]}"
                )
        for r, d, row in held:
            first, last = d.first_block, d.first_block + d.num_blocks - 1
            # pieces of one slice overlap each other's blocks only at their ends; pieces of
            # different column slices can share every block (every row runs through each slice)
            inner = range(first + 1, last) if d.parts > 1 else ()
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
    """Pieces of one tensor index agree on kind, logical shape and block size."""
    r0, d0, _ = entries[0]
    for field, what in (("kind", "kind"), ("shape", "logical shape"), ("block_size", "block size"),
                        ("parts", "column slice count")):
        for r, d, _ in entries[1:]:
            if getattr(d, field) != getattr(d0, field):
                hint = "; give one logical tensor one way" if field == "kind" else ""
                raise ValueError(
                    f"tensor index {d0.index} has {what} {getattr(d0, field)!r} in {d0.name!r} on rank "
                    f"{ranks[r0]} but {getattr(d, field)!r} in {d.name!r} on rank {ranks[r]}{hint}"
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
    def build(cls, pieces: Iterable[tuple[PieceDescriptor, ProcessGroup | None]], device, *,
              groups: Iterable[ProcessGroup] = ()) -> BlockSumExchange:
        """COLLECTIVE: exchange the local pieces' descriptors and lay out the shared blocks.

        Args:
            pieces: ``(descriptor, group)`` for every local piece, in the step's list order
                (the order of ``block_sums``' rows); ``group`` is the process group holding
                the piece's logical tensor's other pieces, or None (a whole tensor).
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
        pieces = list(pieces)
        initialized = dist.is_available() and dist.is_initialized()
        me = dist.get_rank() if initialized else 0
        error = None  # (exception type name, message) of the first local problem
        descriptors, piece_groups = [], []
        for i, item in enumerate(pieces):
            descriptor, group = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
            if error is None and not isinstance(descriptor, PieceDescriptor):
                error = ("TypeError", f"pieces[{i}] must be a (PieceDescriptor, ProcessGroup or None) "
                                      f"pair, got a {type(descriptor).__name__} for the descriptor")
            if error is None and group is not None and not _is_group(group):
                error = ("TypeError", f"pieces[{i}] ({getattr(descriptor, 'name', '')!r}): group must be "
                                      f"a ProcessGroup or None, got {type(group).__name__}")
            descriptors.append(descriptor)
            piece_groups.append(group if _is_group(group) else None)
        extra = []
        for group in groups:
            if not _is_group(group):
                error = error or ("TypeError", f"groups must hold ProcessGroups, got {type(group).__name__}")
            else:
                extra.append(group)
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
            error = _local_problem(descriptors, keys, me)

        gathered = []
        for key in ordered:
            mine = [d for d, k in zip(descriptors, keys) if k == key] if error is None else []
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

        row_starts, row = [], 0
        for d in descriptors:
            row_starts.append(row)
            row += d.num_blocks
        plans, layouts = [], []
        for key, received in zip(ordered, gathered):
            ranks = key[0]
            layout = shared_block_layout([mine for mine, _ in received], ranks)
            layouts.append((ranks, layout))
            local = [start for start, k in zip(row_starts, keys) if k == key]
            sizes = [d.num_blocks for d, k in zip(descriptors, keys) if k == key]
            plan = _plan(by_key[key], ranks, layout, ranks.index(me), local, sizes, device, row)
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


def _local_problem(descriptors, keys, me) -> tuple[str, str] | None:
    """The first problem one rank can see in its own pieces, as (exception type, message)."""
    try:
        shared_block_layout([descriptors], [me])
    except ValueError as error:
        return ("ValueError", str(error))
    first_group = {}
    for d, group in zip(descriptors, keys):
        if group is None and (d.offset != 0 or d.numel != d.logical_numel or d.parts != 1):
            return ("ValueError", f"{d.label()} on rank {me} holds [{d.offset}, {d.offset + d.numel}) "
                                  f"of {d.logical_numel} elements without a process group: a piece "
                                  "without one must be the whole tensor")
        if group is not None and me not in group[0]:
            return ("ValueError", f"{d.label()}: rank {me} is not a member of its process group "
                                  f"(ranks {list(group[0])})")
        earlier = first_group.setdefault(d.index, (d, group))
        if earlier[1] != group:
            def show(key):
                if key is None:
                    return "no process group"
                return f"process group {key[1]!r} (ranks {list(key[0])})"
            return ("ValueError", f"tensor index {d.index} on rank {me}: {earlier[0].name!r} names "
                                  f"{show(earlier[1])} but {d.name!r} names {show(group)}; all pieces of "
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
