"""Which elements of its global tensor a DTensor's local shard holds (docs/ALGORITHM.md section 7).

A DTensor's placements say, per mesh dimension, whether that dimension cuts a tensor dimension
(``Shard(d)``, FSDP2's ``_StridedShard(d, sf)``) or copies the tensor (``Replicate()``). Every cut
follows ``torch.chunk``: ``n`` ranks take chunks of ``ceil(size / n)``, the last ones possibly
short or empty. Several mesh dimensions may cut one tensor dimension; they cut in mesh order
(left to right), except that FSDP2 over tensor parallelism shards each tensor-parallel shard
further, which DTensor writes as ``_StridedShard(d, sf)`` on the data-parallel dimension, ``sf``
being the number of shards the later mesh dimensions cut dimension ``d`` into: those cut first.

So a local shard is always a *box*: one range of indices per tensor dimension. This module
computes it with integer arithmetic, from public DTensor attributes only, and refuses, with a
``ValueError`` naming it, any placement it cannot read that way (``Partial``, a
``_StridedShard`` that is not FSDP2's).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

try:  # torch.distributed may be missing from a build (it is present in every official wheel)
    from torch.distributed.tensor import Replicate, Shard
except ImportError:  # pragma: no cover - a torch built without distributed support
    Replicate = Shard = None
try:  # FSDP2 x TP's placement; private, and the same class in torch 2.5 to 2.13 at least
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover
    _StridedShard = None


def describe(placements) -> str:
    """The placements as DTensor prints them, e.g. ``(_StridedShard(dim=0, sf=2), Shard(dim=0))``."""
    return "(" + ", ".join(map(repr, placements)) + ")"


@dataclass(frozen=True)
class Cuts:
    """How a DTensor's placements cut its tensor.

    Attributes:
        order: per cut tensor dimension, the mesh dimensions cutting it, in the order they cut
            (each takes ``torch.chunk`` of what the earlier ones left).
        mesh_shape: the mesh's size per dimension.
    """

    order: tuple[tuple[int, tuple[int, ...]], ...]
    mesh_shape: tuple[int, ...]

    @property
    def mesh_dims(self) -> tuple[int, ...]:
        """Mesh dimensions of more than one rank that cut the tensor: the ranks along them hold
        different pieces; those along the others hold copies."""
        return tuple(sorted(m for _, dims in self.order for m in dims if self.mesh_shape[m] > 1))

    def parts(self, dim: int) -> int:
        """Into how many chunks tensor dimension ``dim`` is cut (1: not cut)."""
        return math.prod(self.mesh_shape[m] for d, dims in self.order if d == dim for m in dims)

    @property
    def cut_dims(self) -> tuple[int, ...]:
        """Tensor dimensions cut into two or more chunks."""
        return tuple(d for d, _ in self.order if self.parts(d) > 1)

    def box(self, shape: tuple[int, ...], coordinate) -> tuple[tuple[int, int], ...]:
        """``[start, stop)`` per tensor dimension of the shard at mesh ``coordinate``."""
        box = [(0, size) for size in shape]
        for dim, mesh_dims in self.order:
            box[dim] = _range_of(shape[dim], tuple(self.mesh_shape[m] for m in mesh_dims),
                                 tuple(coordinate[m] for m in mesh_dims))
        return tuple(box)

    def has_empty_shard(self, shape: tuple[int, ...]) -> bool:
        """Whether some rank's shard of a non-empty tensor of ``shape`` is empty."""
        if math.prod(shape) == 0:
            return False
        return any(_has_empty_chunk(shape[dim], tuple(self.mesh_shape[m] for m in dims))
                   for dim, dims in self.order)


def cuts_of(placements, mesh_shape, where: str) -> Cuts:
    """The :class:`Cuts` of ``placements`` on a mesh of ``mesh_shape``.

    Raises ValueError, starting with ``where`` (which names the parameter), for a placement
    that is neither ``Replicate()``, ``Shard(d)`` nor FSDP2's ``_StridedShard(d, sf)`` (one per
    tensor dimension, before the ``Shard(d)`` placements it interleaves with, ``sf`` their
    number of shards).
    """
    order: dict[int, list[int]] = {}
    strided: dict[int, tuple[int, int]] = {}
    for mesh_dim, placement in enumerate(placements):
        if _StridedShard is not None and isinstance(placement, _StridedShard):
            dim = placement.dim
            if dim in strided or order.get(dim):
                raise ValueError(_unreadable(where, placements, mesh_dim, placement,
                                             f"dimension {dim} is cut before it"))
            strided[dim] = (mesh_dim, int(placement.split_factor))
        elif Shard is not None and isinstance(placement, Shard):
            order.setdefault(placement.dim, []).append(mesh_dim)
        elif not (Replicate is not None and isinstance(placement, Replicate)):
            raise ValueError(_unreadable(where, placements, mesh_dim, placement,
                                         "Magma takes Shard, FSDP2's _StridedShard and Replicate"))
    for dim, (mesh_dim, split_factor) in strided.items():
        later = order.get(dim, [])
        shards = math.prod(mesh_shape[m] for m in later)
        if split_factor != shards:
            raise ValueError(_unreadable(
                where, placements, mesh_dim, placements[mesh_dim],
                f"its split factor {split_factor} is not the {shards} shard(s) the later mesh "
                f"dimensions cut dimension {dim} into (FSDP2 over tensor parallelism writes that)"))
        order[dim] = later + [mesh_dim]  # the later mesh dimensions cut first
    return Cuts(tuple(sorted((d, tuple(dims)) for d, dims in order.items())), tuple(mesh_shape))


def _unreadable(where, placements, mesh_dim, placement, reason) -> str:
    return (f"{where}placement {placement!r} on mesh dimension {mesh_dim} of "
            f"{describe(placements)} is not supported: {reason}")


def _chunk(start: int, stop: int, parts: int, i: int) -> tuple[int, int]:
    """Chunk ``i`` of ``torch.chunk`` cutting ``[start, stop)`` into ``parts``."""
    each = -(-(stop - start) // parts)
    lo = min(start + i * each, stop)
    return lo, min(lo + each, stop)


@functools.lru_cache(maxsize=4096)
def _range_of(size: int, parts: tuple[int, ...], indices: tuple[int, ...]) -> tuple[int, int]:
    lo, hi = 0, size
    for n, i in zip(parts, indices):
        lo, hi = _chunk(lo, hi, n, i)
    return lo, hi


@functools.lru_cache(maxsize=1024)
def _has_empty_chunk(size: int, parts: tuple[int, ...]) -> bool:
    ranges = [(0, size)]
    for n in parts:
        ranges = [_chunk(lo, hi, n, i) for lo, hi in ranges for i in range(n)]
    return any(lo == hi for lo, hi in ranges)
