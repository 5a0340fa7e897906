"""How the step sees each parameter: the local tensor it updates and the piece of a logical
tensor that tensor is (docs/ALGORITHM.md section 7, "Where pieces come from").

Three kinds of parameter reach :class:`magma_ext.Magma`:

- a plain tensor: a whole logical tensor, numbered by its position (docs/ALGORITHM.md section 3);
- a tensor declared with :func:`magma_ext.declare_piece` (or numbered by
  :func:`magma_ext.number_parameters`): the piece it declares;
- a ``DTensor`` (FSDP2's ``fully_shard``, HSDP, tensor parallelism, FSDP2 over it): its local
  shard, a piece of its global tensor (:mod:`magma_ext.dtensors`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dtensors import dtensor_piece, in_logical_order, local
from .layout import BlockLayout
from .pieces import Piece, is_dtensor, piece_of


@dataclass(frozen=True)
class ParamView:
    """A parameter as the step sees it."""

    local: torch.Tensor  # the local tensor when planned (its size, device, dtype); steps read local(p)
    piece: Piece
    kind: str  # "tensor" (plain or declared) or "dtensor"
    # local element k is element piece.offset + k of the flattened logical tensor (not so for a
    # column slice's piece, nor for a DTensor sharded along a dimension other than 0)
    in_logical_order: bool = True

    def layout(self, block) -> BlockLayout:
        """Its blocks under the ``block`` option: those of its logical tensor it overlaps."""
        return self.piece.blocks(block)

    @property
    def sharded(self) -> bool:
        """Whether other ranks hold pieces of its logical tensor."""
        return self.piece.group is not None


def view_of(p: torch.Tensor, position_index: int, block, name: str) -> ParamView:
    """The :class:`ParamView` of parameter ``p``, whose tensor index is ``position_index`` unless
    it declares a piece.

    Raises ValueError, naming the parameter, for a DTensor placement the step cannot honour, or
    a declared piece whose size is no longer the tensor's.
    """
    declared = piece_of(p)
    if is_dtensor(p):
        index = declared.index if declared is not None else position_index
        return ParamView(local(p), dtensor_piece(p, index, block, name), "dtensor", in_logical_order(p))
    if declared is None:
        return ParamView(p, Piece(index=position_index, offset=0, numel=p.numel(), shape=tuple(p.shape)), "tensor")
    if declared.numel != p.numel():
        raise ValueError(f"parameter {name} was declared a piece of {declared.numel} elements but now has "
                         f"{p.numel()}; declare it again (magma_ext.declare_piece)")
    return ParamView(p, declared, "tensor", declared.parts == 1)
