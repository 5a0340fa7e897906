"""Pieces: telling Magma that a tensor is part of a larger, logical one (docs/ALGORITHM.md section 3).

Magma's masks and scores belong to blocks of *logical* tensors: a block's Bernoulli draw is
keyed by the logical tensor's index and the block's index inside it (section 4), and its score
is formed from the sums of <m, g>, ||m||^2 and ||g||^2 over the *whole* block. An engine that
hands the optimizer slices of parameters instead of the parameters themselves (Megatron's
distributed optimizer, ZeRO-style sharding done by hand) declares what each slice is::

    from magma_ext.pieces import declare_piece

    # this rank owns elements [start, start + shard.numel()) of parameter number 7 (shape
    # (4096, 1024)); the other slices of it live on the ranks of the data-parallel group
    declare_piece(shard, index=7, offset=start, shape=(4096, 1024), group=dp_group)
    optimizer = Magma([shard, ...])

* ``index`` is the logical tensor's *tensor index*: the same number on every rank and under
  every sharding, so that every rank draws the same mask for a block and a resumed run with
  another layout draws the same masks as well. Use each parameter's position in the
  unsharded model's parameter list (what a single-process ``Magma(model.parameters())``
  would use).
* ``offset`` is where the piece starts in the flattened (row-major) logical tensor; the piece
  holds its ``numel()`` elements from there, in order. Its own shape does not matter.
* ``shape`` is the logical tensor's shape: ``block="row"`` and ``block="tensor"`` are taken from
  it, not from the piece.
* ``group`` is the process group whose ranks hold the other pieces of the logical tensor; the
  block sums of blocks split between ranks are all-reduced over it (one collective per group
  and step, see ``magma_ext.exchange``). ``None`` means that there are no other pieces:
  the piece must then be the whole tensor. Several pieces of one logical tensor may also live
  on one rank, as long as they do not overlap.
* ``split=(part, parts)`` describes a tensor cut along dimension 1 into ``parts`` equal column
  slices, as tensor parallelism cuts a row-parallel weight (Megatron's ``partition_dim=1``): the
  piece lies in slice ``part``, and ``offset`` counts elements of that slice, flattened as a
  tensor of shape ``(shape[0], shape[1] // parts, *shape[2:])``. Every slice holds part of every
  row, so ``block="row"`` and ``block="tensor"`` blocks are those of the logical tensor, their
  sums added over the slices; ``block=N`` is refused (its chunks would cut across slices).

The declaration is stored on the tensor object (``tensor._magma_piece``), so it travels with
the tensor into any optimizer built later from it, including one built from a subset of the
parameters by a wrapper. :func:`number_parameters` uses that for
``torch.distributed.optim.ZeroRedundancyOptimizer``, whose per-rank inner optimizer sees only
its rank's parameters: numbering the whole parameters first keeps their single-process
tensor indices, hence the single-process masks::

    number_parameters(model.parameters())
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Magma, ...)

Declarations are checked here, locally, as far as one process can (types, ranges); whether the
pieces of all ranks fit together is checked collectively when the optimizer first steps.

A ``torch.distributed.tensor.DTensor`` describes its own sharding: the only declaration it
accepts is its tensor index (``offset=0``, ``shape`` its global shape, ``group=None``), which
is what :func:`number_parameters` gives it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .layout import MAX_TENSOR_INDEX, BlockLayout, block_size_for, numel_of
from .names import name_index

try:  # torch.distributed may be missing from a build (it is present in every official wheel)
    from torch.distributed import ProcessGroup
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - a torch built without distributed support
    ProcessGroup = DTensor = None

PIECE_ATTRIBUTE = "_magma_piece"

__all__ = ["Piece", "declare_piece", "piece_of", "number_parameters", "PIECE_ATTRIBUTE"]


def _as_int(value, name: str) -> int:
    """``value`` as an int; bool and non-integral types are a TypeError naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _as_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
        raise TypeError(f"shape must be a tuple of ints, got {type(shape).__name__}")
    sizes = tuple(_as_int(size, "shape") for size in shape)
    if any(size < 0 for size in sizes):
        raise ValueError(f"shape must have non-negative sizes, got {sizes}")
    return sizes


def _as_split(split, shape: tuple[int, ...]) -> tuple[int, int]:
    values = tuple(split) if isinstance(split, Iterable) and not isinstance(split, (str, bytes)) else None
    if values is None or len(values) != 2:
        raise TypeError(f"split must be a (part, parts) pair of ints, got {split!r}")
    part, parts = (_as_int(value, "split") for value in values)
    if parts < 1 or not 0 <= part < parts:
        raise ValueError(f"split must be (part, parts) with 0 <= part < parts, got {(part, parts)}")
    if parts > 1 and (len(shape) < 2 or shape[1] % parts):
        raise ValueError(
            f"split: {parts} column slices need a logical shape of 2 or more dimensions whose "
            f"dimension 1 they divide, got shape {shape}"
        )
    return part, parts


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(tensor, DTensor)


@dataclass(frozen=True)
class Piece:
    """Elements ``[offset, offset + numel)`` of flattened logical tensor ``index``: what one
    tensor handed to the optimizer is.

    Args:
        index: the logical tensor's tensor index, ``0 <= index < 2**62``; the same on every
            rank and under every sharding (it keys the mask generator).
        offset: the piece's first element in the flattened (row-major) logical tensor, or in
            its column slice (``split``), >= 0.
        numel: the piece's elements, >= 0.
        shape: the logical tensor's shape (a tuple of sizes >= 0; a list or torch.Size is
            converted).
        group: the ``torch.distributed.ProcessGroup`` whose ranks hold the logical tensor's
            other pieces, or ``None``: no other pieces (a piece declared without a group must
            then be the whole tensor, see :func:`declare_piece`; the optimizer's exchange also
            describes pieces of other ranks without their group).
        split: ``(part, parts)``: the piece lies in column slice ``part`` of ``parts`` (dimension
            1 cut into equal slices) and ``offset`` counts elements of that slice; ``(0, 1)``,
            the default, is no cut.

    Raises:
        TypeError, ValueError: a field of the wrong type or out of range, or a piece reaching
            past the end of its logical tensor (or column slice).
    """

    index: int
    offset: int
    numel: int
    shape: tuple[int, ...]
    group: ProcessGroup | None = None
    split: tuple[int, int] = (0, 1)

    def __post_init__(self):
        index = _as_int(self.index, "index")
        if not 0 <= index < MAX_TENSOR_INDEX:
            raise ValueError(f"index must be in [0, 2**62), got {index}")
        offset = _as_int(self.offset, "offset")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        numel = _as_int(self.numel, "numel")
        if numel < 0:
            raise ValueError(f"numel must be >= 0, got {numel}")
        if self.group is not None and (ProcessGroup is None or not isinstance(self.group, ProcessGroup)):
            raise TypeError(
                "group must be a torch.distributed.ProcessGroup or None, got "
                f"{type(self.group).__name__} (a rank outside a group gets no ProcessGroup for it)"
            )
        shape = _as_shape(self.shape)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "numel", numel)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "split", _as_split(self.split, shape))
        if offset + numel > self.slice_numel:
            where = "its logical tensor" if self.parts == 1 else f"column slice {self.split[0]} of {self.parts}"
            raise ValueError(
                f"offset: a piece of {numel} elements at offset {offset} reaches element "
                f"{offset + numel}, past the end of {where} of shape {self.slice_shape} "
                f"({self.slice_numel} elements)"
            )

    @property
    def logical_numel(self) -> int:
        """Elements of the logical tensor."""
        return numel_of(self.shape)

    @property
    def parts(self) -> int:
        """Column slices the logical tensor is cut into (1: not cut)."""
        return self.split[1]

    @property
    def slice_shape(self) -> tuple[int, ...]:
        """Shape of the column slice the piece lies in (the logical shape when not cut)."""
        if self.parts == 1:
            return self.shape
        return (self.shape[0], self.shape[1] // self.parts, *self.shape[2:])

    @property
    def slice_numel(self) -> int:
        """Elements of the column slice the piece lies in: where ``offset`` counts."""
        return numel_of(self.slice_shape)

    @property
    def is_whole(self) -> bool:
        """Whether the piece is its whole logical tensor."""
        return self.parts == 1 and self.offset == 0 and self.numel == self.logical_numel

    def blocks(self, block) -> BlockLayout:
        """The blocks of the logical tensor this piece overlaps, under the ``block`` option.

        Raises ValueError for ``block=N`` on a piece of a column slice, whose N-element chunks
        of the flattened logical tensor would cut across the slices.
        """
        if self.parts > 1 and not isinstance(block, str):
            raise ValueError(
                f"block={block!r}: tensor index {self.index} is declared a piece of column slice "
                f"{self.split[0]} of {self.parts} (a row-parallel weight), whose N-element blocks "
                "would cut across the slices; use block='row' or block='tensor' for it"
            )
        return BlockLayout(numel=self.numel, block_size=block_size_for(self.slice_shape, block),
                           offset=self.offset, logical_numel=self.slice_numel, sliced=self.parts > 1)

    def __copy__(self) -> Piece:
        return self

    def __deepcopy__(self, memo) -> Piece:
        # Immutable, and a process group is a handle of this process that cannot be copied:
        # a deep copy of a declared tensor shares its Piece. (Pickling one with a group fails,
        # as pickling the group does.)
        return self


def declare_piece(tensor: torch.Tensor, *, index: int, offset: int, shape, group=None,
                  split=(0, 1)) -> torch.Tensor:
    """Declare ``tensor`` to be elements ``[offset, offset + tensor.numel())`` of logical tensor ``index``
    (of its column slice ``split[0]`` of ``split[1]``, see :class:`Piece`).

    ``index`` is the logical tensor's tensor index, or its name in the unsplit model (a str:
    the index is then :func:`magma_ext.name_index` of it, what ``Magma(model.named_parameters())``
    gives the whole tensor in one process).

    Attaches a :class:`Piece` to the tensor object (replacing an earlier declaration) and
    returns the tensor. Declare before the optimizer's first step: a parameter's tensor index
    and blocks are frozen in its state then.

    Raises:
        TypeError: ``tensor`` is not a tensor, an argument has the wrong type, or ``group`` is
            not a ProcessGroup (or None), or a DTensor is given an offset or group.
        ValueError: ``index`` outside [0, 2**62), a negative ``offset`` or size in ``shape``,
            a piece reaching past the end of its logical tensor (or column slice), ``group=None``
            with a piece that is not the whole tensor, or a ``split`` whose part is out of range
            or whose slice count does not divide ``shape[1]``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if isinstance(index, str):
        index = name_index(index)
    piece = Piece(index=index, offset=offset, numel=tensor.numel(), shape=shape, group=group, split=split)
    if is_dtensor(tensor) and not (piece.is_whole and piece.group is None):
        raise TypeError(
            "a DTensor describes its own sharding: declare only its tensor index "
            "(offset=0, shape=its global shape, group=None, no split)"
        )
    if piece.group is None and piece.parts != 1:
        raise ValueError("split: a piece of a column slice needs the process group holding the other slices")
    if piece.group is None and not piece.is_whole:
        raise ValueError(
            f"group=None declares the whole tensor, but this piece holds [{piece.offset}, "
            f"{piece.offset + piece.numel}) of {piece.logical_numel} elements; pass the process group "
            "that holds the other pieces"
        )
    setattr(tensor, PIECE_ATTRIBUTE, piece)
    return tensor


def piece_of(tensor: torch.Tensor) -> Piece | None:
    """The :class:`Piece` declared for ``tensor``, or ``None`` (a whole tensor, numbered by position)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    piece = getattr(tensor, PIECE_ATTRIBUTE, None)
    return piece if isinstance(piece, Piece) else None


def number_parameters(params) -> None:
    """Declare each parameter a whole piece of itself, with the tensor index one process gives
    it: its name's (:func:`magma_ext.name_index`) for ``(name, tensor)`` pairs such as
    ``model.named_parameters()``, else its position.

    ``params`` is what an optimizer takes: an iterable of tensors or of ``(name, tensor)``
    pairs, or of parameter-group dicts (positions then count over the groups in order, as the
    optimizer counts them). Afterwards an optimizer built from any subset of these parameters
    (``ZeroRedundancyOptimizer``'s per-rank optimizer) gives each one the tensor index it has in
    the full list, so every rank draws the single-process masks.

    Raises:
        TypeError: ``params`` is a set (no order), or holds something that is neither a tensor
            nor a ``(str, tensor)`` pair.
        ValueError: a parameter appears twice, two names give one index (see
            :func:`magma_ext.names.canonical_name`), or a parameter was already declared a piece
            of a larger tensor (a ``group`` is set): numbering it as whole would lose that.
    """
    tensors = []
    for entry in _ordered(params, "params"):
        if isinstance(entry, dict):
            if "params" not in entry:
                raise ValueError("a parameter group must have a 'params' entry")
            members = entry["params"]
            tensors += [members] if isinstance(members, torch.Tensor) else list(_ordered(members, "a group's params"))
        else:
            tensors.append(entry)
    names = [None] * len(tensors)
    for position, entry in enumerate(tensors):
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
            names[position], tensors[position] = entry
    named = {}
    for name in filter(None, names):
        if named.setdefault(name_index(name), name) != name:
            raise ValueError(f"the names {named[name_index(name)]!r} and {name!r} give one tensor index; "
                             "each parameter needs a name of its own")
    seen = set()
    for position, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"params must contain tensors, got {type(tensor).__name__} at position {position}")
        if id(tensor) in seen:
            raise ValueError(f"the parameter at position {position} appears more than once in params")
        seen.add(id(tensor))
        earlier = piece_of(tensor)
        if earlier is not None and earlier.group is not None:
            raise ValueError(
                f"the parameter at position {position} is declared a piece of tensor index "
                f"{earlier.index} (offset {earlier.offset}, shape {earlier.shape}) held with a "
                "process group; number_parameters is for whole parameters"
            )
    for position, (name, tensor) in enumerate(zip(names, tensors)):
        # a DTensor's shape is its global shape, so this declares its index only
        declare_piece(tensor, index=position if name is None else name, offset=0, shape=tuple(tensor.shape))


def _ordered(params, what: str):
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, (set, frozenset)):
        raise TypeError(f"{what} must be an ordered iterable of tensors, not a set")
    if isinstance(params, dict):
        return [params]
    if not isinstance(params, Iterable):
        raise TypeError(f"{what} must be an iterable of tensors, got {type(params).__name__}")
    return params
