"""DTensor parameters (FSDP2's ``fully_shard``, HSDP): their local shards as pieces, their scores.

A ``DTensor``'s global shape is its logical shape and ``to_local()`` its piece: ``Shard(0)`` on
one mesh dimension (the other dimensions ``Replicate()``, as HSDP has them) says where the piece
starts and which ranks hold the others (docs/ALGORITHM.md section 7). Its score is a DTensor
too, so that ``torch.distributed.checkpoint`` reshards it.
"""

from __future__ import annotations

import math

import torch

from .layout import BlockLayout, layout_for
from .pieces import Piece, is_dtensor

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - a torch built without distributed support
    DTensor = Replicate = Shard = None


def local(tensor):
    """The tensor a kernel reads and writes: a DTensor's local shard, else the tensor itself.

    Read every step (never cached): a checkpoint load may give a DTensor a new local tensor.
    ``_local_tensor`` is what ``to_local()`` returns a view of, without its autograd node,
    which costs microseconds per parameter.
    """
    if not is_dtensor(tensor):
        return tensor
    shard = getattr(tensor, "_local_tensor", None)
    return shard if isinstance(shard, torch.Tensor) else tensor.to_local()


def locals_of(tensors) -> list:
    """:func:`local` of every tensor of a list, in one pass (the step's hot path)."""
    if DTensor is None:
        return list(tensors)
    return [t._local_tensor if type(t) is DTensor else local(t) for t in tensors]


def _shard_placement(p, block, name: str) -> tuple[int, int] | None:
    """(mesh dimension, tensor dimension) of a DTensor's one ``Shard`` placement, None if it has
    none; raises ValueError, naming the parameter, for placements the step cannot honour."""
    found = []
    for mesh_dim, placement in enumerate(p.placements):
        if type(placement) is Shard:
            found.append((mesh_dim, placement.dim))
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"parameter {name}: placement {placement!r} on mesh dimension {mesh_dim} is not "
                "supported: Magma takes DTensors sharded Shard(d) on one mesh dimension and "
                "Replicate() on the others (FSDP2's fully_shard and HSDP)"
            )
    if len(found) > 1:
        raise ValueError(f"parameter {name}: Shard on {len(found)} mesh dimensions; Magma takes one")
    if found and found[0][1] != 0 and not _one_block(p, block):
        raise ValueError(
            f"parameter {name}: placement Shard(dim={found[0][1]}) with block={block!r} is not supported: "
            "it would cut each block into pieces that are not contiguous; shard along dim 0 or use "
            "block='tensor'"
        )
    return found[0] if found else None


def dtensor_piece(p, index: int, block, name: str) -> Piece:
    """The piece of its global tensor that a DTensor's local shard is.

    ``Shard(0)``: the local rows are one contiguous range of the flattened tensor.  ``Shard(d)``,
    d > 0, is taken only with one block per tensor, whose sums do not depend on element order:
    the piece is then the local range in the flattening with dimension d first.
    """
    placement = _shard_placement(p, block, name)
    shape = tuple(p.shape)
    numel = local(p).numel()
    if placement is None:
        return Piece(index=index, offset=0, numel=numel, shape=shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh_dim, dim = placement
    _, global_offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    per_slice = math.prod(shape) // shape[dim] if shape[dim] else 0
    return Piece(index=index, offset=global_offset[dim] * per_slice, numel=numel, shape=shape,
                 group=p.device_mesh.get_group(mesh_dim))


def in_logical_order(p) -> bool:
    """Whether a DTensor's local elements are, in order, one range of its global tensor's
    row-major flattening: true unless it is sharded along a dimension other than 0."""
    return all(type(placement) is not Shard or placement.dim == 0 for placement in p.placements)


def new_score(p: torch.Tensor, layout: BlockLayout, block) -> torch.Tensor:
    """A fresh score (0.5 per block) shaped so that checkpoint tools can reshard it.

    A DTensor's score is a DTensor too, over the logical tensor's blocks: ``Replicate()`` when
    every piece sees the one block of the tensor, the parameter's own placements when blocks
    are rows (its ``Shard(0)`` then cuts the rows' scores as it cuts the rows).  Under
    ``block=N`` a sharded DTensor keeps a plain tensor of the blocks its shard overlaps; its
    checkpoints hold all the blocks' scores (:func:`full_block_scores`).
    """
    device = local(p).device
    if not is_dtensor(p):
        return torch.full((layout.num_blocks,), 0.5, dtype=torch.float32, device=device)
    logical_blocks = layout_for(tuple(p.shape), block).num_blocks
    if _one_block(p, block):
        placements = [Replicate()] * p.device_mesh.ndim
        values = torch.full((logical_blocks,), 0.5, dtype=torch.float32, device=device)
        return DTensor.from_local(values, p.device_mesh, placements, run_check=False)
    if block == "row":
        values = torch.full((layout.num_blocks,), 0.5, dtype=torch.float32, device=device)
        return DTensor.from_local(values, p.device_mesh, p.placements, shape=torch.Size([logical_blocks]),
                                  stride=(1,), run_check=False)
    return torch.full((layout.num_blocks,), 0.5, dtype=torch.float32, device=device)


def _one_block(p, block) -> bool:
    return block == "tensor" or (block == "row" and p.dim() < 2)


def local_score(score: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """The entries of a score that the local piece's blocks use, as a plain tensor."""
    values = local(score)
    return values if values.numel() == layout.num_blocks else values[:layout.num_blocks]


def has_local_block_scores(p: torch.Tensor, block) -> bool:
    """Whether ``p``'s score is a plain per-rank tensor of the blocks its shard overlaps: a DTensor
    sharded under ``block=N``, whose blocks straddle the shards' edges (see
    :func:`full_block_scores`)."""
    if not is_dtensor(p) or _one_block(p, block) or block == "row":
        return False
    return any(isinstance(placement, Shard) for placement in p.placements)


def _owned(layout: BlockLayout) -> tuple[int, int]:
    """The blocks whose first element this piece holds, as a range of logical block indices:
    every block has exactly one such piece."""
    size = layout.block_size
    return -(-layout.offset // size), -(-(layout.offset + layout.numel) // size)


def full_block_scores(p, piece: Piece, block, score: torch.Tensor):
    """COLLECTIVE over the shard group: the scores of all the logical tensor's blocks, as a
    ``Replicate()`` DTensor that checkpoint tools save once and reshard (each block's score is
    taken from the piece holding the block's first element)."""
    import torch.distributed as dist

    layout = piece.blocks(block)
    logical_blocks = layout_for(tuple(p.shape), block).num_blocks
    full = torch.zeros(logical_blocks, dtype=torch.float32, device=score.device)
    lo, hi = _owned(layout)
    if hi > lo:
        full[lo:hi] = score[lo - layout.first_block:hi - layout.first_block]
    dist.all_reduce(full, group=piece.group)
    return DTensor.from_local(full, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)


def local_block_scores(full: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """The entries of the blocks a piece overlaps, from the scores of all the logical tensor's blocks."""
    return local(full)[layout.first_block:layout.first_block + layout.num_blocks].clone()


def empty_shard_score_source(p, piece: Piece, block) -> tuple[object, int] | None:
    """(process group, global source rank) when ``p``'s score is one replicated entry and some
    rank of its shard group holds an empty shard, else None.

    Such a rank has no row for the block, so it cannot form the score; every rank knows which
    parameters these are (shards follow ``torch.chunk``), so all join one broadcast from the
    group's first rank, whose shard starts the tensor and is never empty.
    """
    if not is_dtensor(p) or piece.group is None or not _one_block(p, block):
        return None
    import torch.distributed as dist

    group = piece.group
    size, ranks = p.shape[_shard_placement(p, block, "")[1]], dist.get_world_size(group)
    if size == 0:
        return None
    chunk = -(-size // ranks)
    if -(-size // chunk) == ranks:
        return None
    return group, dist.get_global_rank(group, 0)


def broadcast_score(score: torch.Tensor, group, source: int) -> None:
    """Give every rank of ``group`` the replicated score that rank ``source`` formed."""
    import torch.distributed as dist

    dist.broadcast(local(score), src=source, group=group)
