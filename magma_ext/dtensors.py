"""DTensor parameters (FSDP2's ``fully_shard``, HSDP, tensor parallelism and FSDP2 over it):
their local shards as pieces, their gradients, their scores.

A ``DTensor``'s global shape is its logical shape and ``to_local()`` its piece: its placements
say which box of the global tensor the piece is (:mod:`magma_ext.placements`) and which ranks
hold the others, those of the mesh dimensions that cut it (docs/ALGORITHM.md section 7). Its
score is a DTensor too, so that ``torch.distributed.checkpoint`` reshards it.
"""

from __future__ import annotations

import math

import torch

from .layout import BlockLayout, layout_for
from .mesh_groups import group_over
from .pieces import Piece, is_dtensor
from .placements import Cuts, cuts_of, describe

try:
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - a torch built without distributed support
    DTensor = Replicate = None


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


def like(p, shard: torch.Tensor):
    """``shard``, a tensor shaped like ``p``'s local shard, in ``p``'s form: a DTensor over
    ``p``'s mesh and placements where ``p`` is one, else ``shard`` itself."""
    if not is_dtensor(p):
        return shard
    return DTensor.from_local(shard, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)


def locals_of(tensors) -> list:
    """:func:`local` of every tensor of a list, in one pass (the step's hot path)."""
    if DTensor is None:
        return list(tensors)
    return [t._local_tensor if type(t) is DTensor else local(t) for t in tensors]


def _cuts(p, name: str) -> Cuts:
    return cuts_of(p.placements, tuple(p.device_mesh.shape), f"parameter {name}: ")


def _cut_dim(placement) -> int | None:
    """The tensor dimension a placement cuts, None for ``Replicate()``."""
    return getattr(placement, "dim", None)


def dtensor_piece(p, index: int, block, name: str) -> Piece:
    """The piece of its global tensor that a DTensor's local shard is, held with the ranks of
    the mesh dimensions that cut it (:func:`magma_ext.mesh_groups.group_over`; those along the
    others hold copies and do the same exchange among themselves).

    The shard is a box of the global tensor (:mod:`magma_ext.placements`). Dimension 0 alone
    cut: a contiguous range of the flattening. Dimension 1 cut (and maybe 0): a range of a
    column slice (``Piece.split``), for ``block="row"`` when the slices are equal. One block per
    tensor (``block="tensor"``, or ``"row"`` for a 0-d or 1-d tensor), whose sums do not depend
    on the order of its elements: any box, numbered in the order of boxes by their starts.

    Raises ValueError, naming the parameter, its placements and ``block``, for a layout whose
    blocks the pieces cannot express (or a local shard of another shape than its placements
    give).
    """
    cuts = _cuts(p, name)
    shape, numel = tuple(p.shape), local(p).numel()
    if not cuts.cut_dims or math.prod(shape) == 0:
        return Piece(index=index, offset=0, numel=numel, shape=shape)
    mesh = p.device_mesh
    box = cuts.box(shape, mesh.get_coordinate())
    if tuple(hi - lo for lo, hi in box) != tuple(local(p).shape):
        raise ValueError(
            f"parameter {name}: its local shard has shape {tuple(local(p).shape)}, but placements "
            f"{describe(p.placements)} on a mesh of shape {tuple(mesh.shape)} give "
            f"{tuple(hi - lo for lo, hi in box)} (torch.chunk); torch {torch.__version__} lays "
            "DTensors out in a way Magma does not read"
        )
    offset, split = _place_in_blocks(p, cuts, box, block, name)  # raises before any group is made
    return Piece(index=index, offset=offset, numel=numel, shape=shape, split=split,
                 group=group_over(mesh, cuts.mesh_dims))


def _place_in_blocks(p, cuts: Cuts, box, block, name: str) -> tuple[int, tuple[int, int]]:
    """(offset, split) of a box under ``block``, as :func:`dtensor_piece` describes them."""
    shape = tuple(p.shape)
    if _one_block(p, block):
        return _box_order_offset(shape, box), (0, 1)
    cut = cuts.cut_dims
    if cut == (0,):
        return box[0][0] * math.prod(shape[1:]), (0, 1)
    refused = f"parameter {name}: placements {describe(p.placements)} with block={block!r} are not supported: "
    if cut not in ((1,), (0, 1)):
        raise ValueError(f"{refused}they cut dimension {max(cut)}, so each block would be a set of "
                         "elements that are not contiguous; use block='tensor'")
    parts = cuts.parts(1)
    if not isinstance(block, str):
        raise ValueError(f"{refused}dimension 1 is cut into {parts} column slices and {block}-element "
                         "blocks of the flattened tensor would cut across them; use block='row' or block='tensor'")
    if shape[1] % parts:
        raise ValueError(f"{refused}dimension 1 (size {shape[1]}) is cut into {parts} column slices of "
                         "unequal widths (torch.chunk), and Magma's row blocks run through equal slices; "
                         f"make it divisible by {parts} or use block='tensor'")
    width = shape[1] // parts
    return box[0][0] * width * math.prod(shape[2:]), (box[1][0] // width, parts)


def _box_order_offset(shape: tuple[int, ...], box) -> int:
    """Where ``box`` starts when the boxes of a grid (one range per dimension) are laid one after
    another, sorted by their starts (dimension 0 first): every box a contiguous, disjoint range."""
    offset = 0
    for dim, (lo, _) in enumerate(box):
        before = math.prod(hi - lo for lo, hi in box[:dim])
        offset += lo * before * math.prod(shape[dim + 1:])
    return offset


def in_logical_order(p) -> bool:
    """Whether a DTensor's local elements are, in order, one range of its global tensor's
    row-major flattening: true unless it is sharded along a dimension other than 0."""
    return all(dim == 0 for dim in cuts_of(p.placements, tuple(p.device_mesh.shape), "").cut_dims)


def new_score(p: torch.Tensor, layout: BlockLayout, block) -> torch.Tensor:
    """A fresh score (0.5 per block) shaped so that checkpoint tools can reshard it.

    A DTensor's score is a DTensor too, over the logical tensor's blocks: ``Replicate()`` when
    every piece sees the one block of the tensor; when blocks are rows, the parameter's
    placements that cut dimension 0 (they cut the rows' scores as they cut the rows) and
    ``Replicate()`` for the others (every column slice of a row holds its score).  Under
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
        placements = [placement if _cut_dim(placement) == 0 else Replicate() for placement in p.placements]
        values = torch.full((layout.num_blocks,), 0.5, dtype=torch.float32, device=device)
        return DTensor.from_local(values, p.device_mesh, placements, shape=torch.Size([logical_blocks]),
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
    return bool(_cuts(p, "").cut_dims)


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
    group's rank at coordinate 0 of every cutting mesh dimension, whose shard starts each cut
    dimension and is never empty.
    """
    if not is_dtensor(p) or piece.group is None or not _one_block(p, block):
        return None
    cuts = _cuts(p, "")
    if not cuts.has_empty_shard(tuple(p.shape)):
        return None
    coordinate = list(p.device_mesh.get_coordinate())
    for mesh_dim in cuts.mesh_dims:
        coordinate[mesh_dim] = 0
    return piece.group, int(p.device_mesh.mesh[tuple(coordinate)])


def local_grads(params) -> list:
    """The local gradients of a step. A DTensor's gradient laid out unlike its parameter
    (tensor parallelism leaves a replicated norm weight's gradient ``Partial(sum)`` under
    sequence parallelism) is first redistributed to the parameter's placements, as DTensor's own
    ops do for ``torch.optim``: COLLECTIVE over the mesh for such a gradient."""
    grads = []
    for p in params:
        grad = p.grad
        if type(grad) is DTensor and grad.placements != p.placements:
            grad = grad.redistribute(p.device_mesh, p.placements)
        grads.append(local(grad))
    return grads


def broadcast_score(score: torch.Tensor, group, source: int) -> None:
    """Give every rank of ``group`` the replicated score that rank ``source`` formed."""
    import torch.distributed as dist

    dist.broadcast(local(score), src=source, group=group)
