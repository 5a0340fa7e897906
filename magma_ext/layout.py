"""Blocks (docs/ALGORITHM.md section 3): how a tensor, or a piece of one, is cut into masking blocks.

A block is a run of ``block_size`` contiguous elements of the flattened *logical* tensor (the
last one may be shorter).  An optimizer normally holds whole tensors (``offset = 0``), but a
sharded integration hands it a piece starting ``offset`` elements into its logical tensor; the
piece then sees the blocks overlapping ``[offset, offset + numel)``, numbered globally.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_BLOCK_INDEX = 2**32  # the block index fills the low 32 bits of the Philox subsequence
# the tensor index's low 32 bits fill its high 32 bits, the next 30 the high half of the offset's
# counter (docs/ALGORITHM.md section 4)
MAX_TENSOR_INDEX = 2**62


def check_block_option(block) -> None:
    """Validate the ``block`` hyperparameter: "tensor", "row" or an int >= 1."""
    if isinstance(block, str):
        if block not in ("tensor", "row"):
            raise ValueError(f"Invalid block: {block!r} (expected 'tensor', 'row' or an int >= 1)")
        return
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"block must be 'tensor', 'row' or an int >= 1, got {type(block).__name__}")
    if block < 1:
        raise ValueError(f"Invalid block: {block} (expected an int >= 1)")


def numel_of(shape: tuple[int, ...]) -> int:
    """Elements of a tensor of ``shape``."""
    numel = 1
    for size in shape:
        numel *= size
    return numel


def piece_blocks(offset: int, numel: int, block_size: int) -> tuple[int, int]:
    """(index of the first block, number of blocks) that elements [offset, offset + numel) of a
    logical tensor overlap, in blocks of ``block_size``; an empty piece overlaps none."""
    first = offset // block_size
    if numel == 0:
        return first, 0
    return first, (offset + numel - 1) // block_size - first + 1


def block_size_for(shape: tuple[int, ...], block) -> int:
    """Elements per block of a whole tensor of ``shape`` under the ``block`` option."""
    numel = numel_of(shape)
    if block == "tensor":
        return max(numel, 1)
    if block == "row":
        if len(shape) >= 2 and shape[0] > 0:
            return max(numel // shape[0], 1)
        return max(numel, 1)
    return int(block)


@dataclass(frozen=True)
class BlockLayout:
    """The blocks seen by a piece of ``numel`` elements at ``offset`` in its logical tensor.

    ``logical_numel`` is the logical tensor's size (the CUDA planner runs a piece of whole
    blocks, one starting on a block boundary and ending on one or at that size, in one pass).
    ``sliced``: the piece lies in a column slice of its logical tensor (``Piece.split``), so
    ``offset`` and ``logical_numel`` count elements of the slice and every block runs on through
    the other slices: no block is ever whole in this piece.
    """

    numel: int
    block_size: int
    offset: int = 0
    logical_numel: int | None = None
    sliced: bool = False

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.offset < 0 or self.numel < 0:
            raise ValueError(f"Invalid piece: offset {self.offset}, numel {self.numel}")
        if self.logical_numel is None:
            object.__setattr__(self, "logical_numel", self.offset + self.numel)
        if self.offset + self.numel > self.logical_numel:
            raise ValueError(
                f"piece [{self.offset}, {self.offset + self.numel}) exceeds its logical tensor "
                f"of {self.logical_numel} elements"
            )
        if self.numel and self.first_block + self.num_blocks > MAX_BLOCK_INDEX:
            raise ValueError(
                f"a tensor of {self.logical_numel} elements in blocks of {self.block_size} has "
                f"more than 2**32 blocks; use a larger block"
            )

    @property
    def first_block(self) -> int:
        """Global index (inside the logical tensor) of this piece's first block."""
        return piece_blocks(self.offset, self.numel, self.block_size)[0]

    @property
    def num_blocks(self) -> int:
        """Blocks overlapping this piece (0 for an empty piece)."""
        return piece_blocks(self.offset, self.numel, self.block_size)[1]

    @property
    def head(self) -> int:
        """Elements of the piece in its first block."""
        return min(self.numel, self.block_size - self.offset % self.block_size)

    def lengths(self) -> list[int]:
        """Elements of the piece in each of its blocks, in order."""
        if self.numel == 0:
            return []
        rest = self.numel - self.head
        full, tail = divmod(rest, self.block_size)
        return [self.head] + [self.block_size] * full + ([tail] if tail else [])


def layout_for(shape: tuple[int, ...], block) -> BlockLayout:
    """Layout of a whole tensor (offset 0)."""
    return BlockLayout(numel=numel_of(shape), block_size=block_size_for(shape, block))
