"""The packed route of the sparse parameter sync, worked out ahead and moved in chunks.

Each rank's changed ranges of one dtype (over every bucket of that dtype, in bucket order) form
its *stream*: the elements it contributes, packed end to end. The streams move through a gather
buffer of ``size`` slots of ``width`` elements (``width``: the longest stream), cut into chunks
of stream positions ``[lo, hi)``; chunk ``c`` occupies ``size * (hi - lo)`` contiguous elements
of the buffer, rank ``r``'s part of it being ``slot r``. Per chunk a rank packs its stream's
elements into its own slot, one in-place ``all_gather_into_tensor`` moves the slots (every slot
padded to ``hi - lo``; the padding is sent, its contents never read), and it copies the other
ranks' elements out into their shards of its buckets. Chunk ``c + 1``'s transfer is launched
before chunk ``c`` is unpacked, so the copies run while the next chunk is on the wire.

Everything a step needs (its copies as views of the shards and of the buffer, its transfers) is
built by :func:`plan_packed` on the host, where the previous step's sync works it out while the
device moves that step's data. Few ranges copy as views with one ``torch._foreach_copy_``; a
shard's run of more than ``max_views`` ranges copies by element positions built on the device
when the chunk runs (``index_select`` / ``index_copy_``, 8 bytes of positions per element).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["stream_rows", "cut", "chunk_bounds", "PackedPlan", "plan_packed"]

BUCKET, START, STREAM, LENGTH = range(4)  # the columns of stream rows


def stream_rows(ranges_per_bucket: list[torch.Tensor]) -> np.ndarray:
    """A rank's stream: ``(n, 4)`` int64 rows ``(bucket, start in its shard, start in the stream,
    length)``, one per range, in bucket order; ``ranges_per_bucket``: its ``(k, 2)`` shard ranges
    in each bucket."""
    parts, position = [np.zeros((0, 4), dtype=np.int64)], 0
    for bucket, ranges in enumerate(ranges_per_bucket):
        r = ranges.numpy()
        lengths = r[:, 1] - r[:, 0]
        ends = position + np.cumsum(lengths)
        parts.append(np.stack([np.full(len(r), bucket), r[:, 0], ends - lengths, lengths], axis=1))
        position = int(ends[-1]) if len(r) else position
    return np.concatenate(parts).astype(np.int64, copy=False)


def cut(rows: np.ndarray, bounds: list[tuple[int, int]]) -> list[np.ndarray]:
    """A stream's ``rows`` cut into the chunks of stream positions ``bounds`` (end to end from 0):
    per chunk, its rows, cut at the chunk's edges, stream starts counted from the chunk's start."""
    if not bounds:
        return []
    edges = np.array([lo for lo, _ in bounds] + [bounds[-1][1]], dtype=np.int64)
    starts, ends = rows[:, STREAM], rows[:, STREAM] + rows[:, LENGTH]
    first = np.searchsorted(edges, starts, side="right") - 1  # the chunk of a row's first element
    spans = np.searchsorted(edges, ends - 1, side="right") - first  # chunks a row touches
    row = np.repeat(np.arange(len(rows)), spans)
    chunk = np.arange(len(row)) - np.repeat(np.cumsum(spans) - spans, spans) + first[row]
    lo, hi = np.maximum(starts[row], edges[chunk]), np.minimum(ends[row], edges[chunk + 1])
    out = rows[row]
    out[:, START] += lo - starts[row]
    out[:, STREAM] = lo - edges[chunk]
    out[:, LENGTH] = hi - lo
    return np.split(out, np.searchsorted(chunk, np.arange(1, len(bounds))))


def chunk_bounds(width: int, item: int, chunk_bytes: int, max_chunks: int) -> list[tuple[int, int]]:
    """Stream positions ``[lo, hi)`` of each chunk: about ``chunk_bytes`` per slot, at most
    ``max_chunks`` chunks, none for an empty stream."""
    if width <= 0:
        return []
    chunks = max(1, min(max_chunks, round(width * item / max(chunk_bytes, 1))))
    step = -(-width // chunks)
    return [(lo, min(lo + step, width)) for lo in range(0, width, step)]


@dataclass
class _Copies:
    """Range copies between shards and a chunk's slots: views for one ``torch._foreach_copy_``,
    and runs by element positions (``(shard, starts, lengths, slot part)``, taken into or put
    from the slot part)."""

    destinations: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    take: list = field(default_factory=list)
    put: list = field(default_factory=list)

    def run(self) -> None:
        if self.destinations:
            torch._foreach_copy_(self.destinations, self.sources)
        for shard, starts, lengths, part in self.take:
            torch.index_select(shard, 0, _positions(starts, lengths, shard.device), out=part)
        for shard, starts, lengths, part in self.put:
            shard.index_copy_(0, _positions(starts, lengths, shard.device), part)


def _positions(starts: np.ndarray, lengths: np.ndarray, device) -> torch.Tensor:
    """The element positions of ranges (``starts``, ``lengths``), built on ``device`` from the
    ranges alone (their total is known on the host, so nothing waits for the device)."""
    total = int(lengths.sum())
    table = torch.from_numpy(starts - (np.cumsum(lengths) - lengths))  # first position minus packed offset
    counts = torch.from_numpy(lengths)
    if device.type == "cuda":
        table, counts = table.pin_memory(), counts.pin_memory()
    table, counts = table.to(device, non_blocking=True), counts.to(device, non_blocking=True)
    return torch.repeat_interleave(table, counts, output_size=total) + torch.arange(total, device=device)


@dataclass
class _Chunk:
    whole: torch.Tensor        # every rank's slot of this chunk, end to end
    slots: list[torch.Tensor]  # per rank
    pack: _Copies
    unpack: _Copies


@dataclass
class PackedPlan:
    """One dtype's packed exchange at one step, ready to run (:meth:`start`, :meth:`finish`)."""

    chunks: list[_Chunk]

    def start(self, group, rank: int) -> list:
        """COLLECTIVE: pack every chunk and launch its all-gather; :meth:`finish` completes them.
        Chunk ``c + 1`` is packed while chunk ``c`` is on the wire (each transfer waits only for
        its own packing, queued before it)."""
        import torch.distributed as dist

        pending = []
        for chunk in self.chunks:
            chunk.pack.run()
            pending.append(dist.all_gather_into_tensor(chunk.whole, chunk.slots[rank], group=group, async_op=True))
        return pending

    def finish(self, pending: list) -> None:
        """Wait for each chunk's transfer in turn and unpack it (while the later ones move)."""
        for work, chunk in zip(pending, self.chunks):
            work.wait()
            chunk.unpack.run()


def plan_packed(shards: list[list[torch.Tensor]], layout: list[list[torch.Tensor]], rank: int, buffer: torch.Tensor,
                bounds: list[tuple[int, int]], max_views: int) -> PackedPlan:
    """The packed exchange of the buckets whose shards are ``shards[bucket][rank]`` and whose
    changed ranges are ``layout[bucket][rank]`` (shard coordinates), through ``buffer`` (at least
    ``size * width`` elements), in chunks of stream positions ``bounds``."""
    size = len(shards[0])
    pieces = [cut(stream_rows([ranks[r] for ranks in layout]), bounds) for r in range(size)]  # [rank][chunk]
    chunks, offset = [], 0
    for c, (lo, hi) in enumerate(bounds):
        width = hi - lo
        whole = buffer[offset:offset + size * width]
        offset += size * width
        slots = [whole[r * width:(r + 1) * width] for r in range(size)]
        rows = [pieces[r][c] for r in range(size)]
        pack, unpack = _Copies(), _Copies()
        for r in range(size):
            # a rank's rows are in bucket order: one run per bucket
            for run in np.split(rows[r], np.flatnonzero(np.diff(rows[r][:, BUCKET])) + 1):
                if len(run):
                    _add_run(pack if r == rank else unpack, shards[run[0, BUCKET]][r], run, slots[r], r == rank,
                             max_views)
        chunks.append(_Chunk(whole, slots, pack, unpack))
    return PackedPlan(chunks)


def _add_run(copies: _Copies, shard: torch.Tensor, run: np.ndarray, slot: torch.Tensor, into_slot: bool,
             max_views: int) -> None:
    """Add one shard's run of rows (contiguous in its slot) to ``copies``: into the slot
    (``into_slot``, packing) or out of it."""
    if len(run) > max_views:
        first, last = int(run[0, STREAM]), int(run[-1, STREAM] + run[-1, LENGTH])
        entry = (shard, run[:, START].copy(), run[:, LENGTH].copy(), slot[first:last])
        (copies.take if into_slot else copies.put).append(entry)
        return
    # one split per side makes all the views (the rows are in order in the shard and end to end
    # in the slot); the shard's split also cuts out the gaps between rows, every other piece
    starts, lengths = run[:, START], run[:, LENGTH]
    first = int(run[0, STREAM])
    inside = slot[first:first + int(lengths.sum())].split(lengths.tolist())
    sizes = np.empty(2 * len(run) - 1, dtype=np.int64)
    sizes[0::2] = lengths
    sizes[1::2] = starts[1:] - starts[:-1] - lengths[:-1]
    outside = shard[int(starts[0]):int(starts[-1] + lengths[-1])].split(sizes.tolist())[0::2]
    copies.destinations += inside if into_slot else outside
    copies.sources += outside if into_slot else inside
