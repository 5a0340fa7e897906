"""Pieces of logical tensors, in one process: declarations and the shared-block layout.

The collective parts (BlockSumExchange, pieces with process groups, DTensors) are tested on
several ranks in test_distributed_exchange.py; ``random_cuts`` and ``brute_force_layout`` here
are shared with it.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

from magma_ext.exchange import PieceRecord, shared_block_layout
from magma_ext.layout import BlockLayout
from magma_ext.pieces import PIECE_ATTRIBUTE, Piece, declare_piece, number_parameters, piece_of

# ---------------------------------------------------------------- random cuts and the brute force

BLOCK_CHOICES = (1, 7, 300, "tensor")


def random_shape(rng: random.Random) -> tuple[int, ...]:
    return rng.choice([
        (0,), (1,), (rng.randint(2, 40),), (rng.randint(1, 700),), (3, 0),
        (rng.randint(1, 30), rng.randint(1, 30)), (2, rng.randint(1, 5), rng.randint(1, 9)),
    ])


def random_cuts(rng: random.Random, holders: list[list[int]], *, first_index: int = 0,
                gaps: bool = True) -> list[tuple[int, list[tuple[int, PieceRecord]]]]:
    """For each entry of ``holders`` (the ranks that may hold pieces of one logical tensor), a
    random logical tensor cut at random offsets into pieces (empty, one-element and several per
    rank included), some pieces left out when ``gaps``: ``[(index, [(rank, record), ...])]``."""
    out = []
    for k, ranks in enumerate(holders):
        index = first_index + k
        shape = random_shape(rng)
        numel = 1
        for size in shape:
            numel *= size
        block = rng.choice(BLOCK_CHOICES)
        cuts = sorted(rng.randint(0, numel) for _ in range(rng.randint(0, 2 * len(ranks) + 2)))
        if numel and rng.random() < 0.3:  # a one-element piece
            start = rng.randrange(numel)
            cuts = sorted(cuts + [start, start + 1])
        bounds = [0] + cuts + [numel]
        pieces = []
        for start, end in zip(bounds, bounds[1:]):
            if gaps and end > start and rng.random() < 0.1:
                continue
            record = PieceRecord(Piece(index, start, end - start, shape), block, f"t{index}")
            pieces.append((rng.choice(ranks), record))
        out.append((index, pieces))
    return out


def by_rank(cuts, world_size: int, rng: random.Random) -> list[list[PieceRecord]]:
    """Each rank's records, in a random order of its own."""
    lists = [[] for _ in range(world_size)]
    for _, pieces in cuts:
        for rank, record in pieces:
            lists[rank].append(record)
    for records in lists:
        rng.shuffle(records)
    return lists


def brute_force_layout(records_by_rank):
    """Element by element: which (rank, row) touches each block; shared = two or more."""
    touched = {}
    num_rows = []
    for rank, records in enumerate(records_by_rank):
        row = 0
        for record in records:
            d, layout = record.piece, record.layout
            for element in range(d.offset, d.offset + d.numel):
                block = element // layout.block_size
                touched.setdefault((d.index, block), set()).add((rank, row + block - layout.first_block))
            row += layout.num_blocks
        num_rows.append(row)
    blocks = sorted(key for key, holders in touched.items() if len(holders) >= 2)
    pairs = [sorted((row, p) for p, key in enumerate(blocks) for r, row in touched[key] if r == rank)
             for rank in range(len(records_by_rank))]
    return dict(
        blocks=tuple(blocks),
        holders=tuple(len({r for r, _ in touched[key]}) for key in blocks),
        rows=tuple(tuple(row for row, _ in p) for p in pairs),
        positions=tuple(tuple(pos for _, pos in p) for p in pairs),
        num_rows=tuple(num_rows),
    )


# ---------------------------------------------------------------- Piece and declare_piece

def test_piece_normalizes_and_is_frozen():
    piece = Piece(index=3, offset=5, numel=2, shape=torch.Size([4, 5]))
    assert piece.shape == (4, 5) and type(piece.shape) is tuple
    assert piece.logical_numel == 20 and piece.group is None and not piece.is_whole
    assert Piece(3, 5, 2, [4, 5]) == piece and hash(Piece(3, 5, 2, [4, 5])) == hash(piece)
    assert Piece(3, 0, 20, (4, 5)).is_whole
    with pytest.raises(dataclasses.FrozenInstanceError):
        piece.offset = 0
    tensor = declare_piece(torch.zeros(20), index=3, offset=0, shape=(4, 5))
    assert piece_of(copy.deepcopy(tensor)) is piece_of(tensor)  # immutable: shared by copies


PIECE_ERRORS = [
    (dict(index=-1, offset=0, shape=(2,)), ValueError, r"index must be in \[0, 2\*\*62\), got -1"),
    (dict(index=2**62, offset=0, shape=(2,)), ValueError, r"index must be in \[0, 2\*\*62\)"),
    (dict(index=True, offset=0, shape=(2,)), TypeError, r"index must be an int, got bool"),
    (dict(index=1.0, offset=0, shape=(2,)), TypeError, r"index must be an int, got float"),
    (dict(index=0, offset=-1, shape=(2,)), ValueError, r"offset must be >= 0, got -1"),
    (dict(index=0, offset="0", shape=(2,)), TypeError, r"offset must be an int, got str"),
    (dict(index=0, offset=0, shape=(2, -1)), ValueError, r"shape must have non-negative sizes"),
    (dict(index=0, offset=0, shape=2), TypeError, r"shape must be a tuple of ints, got int"),
    (dict(index=0, offset=0, shape="22"), TypeError, r"shape must be a tuple of ints, got str"),
    (dict(index=0, offset=0, shape=(2.0,)), TypeError, r"shape must be an int, got float"),
    (dict(index=0, offset=0, shape=(2,), group=-100), TypeError,
     r"group must be a torch.distributed.ProcessGroup or None, got int"),
    (dict(index=0, offset=0, shape=(2,), group="world"), TypeError, r"group must be .*got str"),
    (dict(index=0, offset=0, shape=(2, 4), split=(2, 2)), ValueError, r"split must be \(part, parts\) with 0 <= part < parts"),
    (dict(index=0, offset=0, shape=(2, 4), split=(0, 0)), ValueError, r"0 <= part < parts, got \(0, 0\)"),
    (dict(index=0, offset=0, shape=(2, 5), split=(0, 2)), ValueError, r"2 column slices need .* dimension 1 they divide"),
    (dict(index=0, offset=0, shape=(8,), split=(0, 2)), ValueError, r"2 or more dimensions"),
    (dict(index=0, offset=0, shape=(2, 4), split=3), TypeError, r"split must be a \(part, parts\) pair"),
    (dict(index=0, offset=0, shape=(2, 4), split=(0.0, 2)), TypeError, r"split must be an int, got float"),
]


@pytest.mark.parametrize("kwargs, error, pattern", PIECE_ERRORS)
def test_piece_and_declare_piece_reject(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        Piece(numel=2, **kwargs)
    tensor = torch.zeros(2)
    with pytest.raises(error, match=pattern):
        declare_piece(tensor, **kwargs)
    assert piece_of(tensor) is None  # nothing attached by a failed declaration


DECLARE_ERRORS = [
    (torch.zeros(5), dict(index=0, offset=16, shape=(4, 5)), ValueError,
     r"offset: a piece of 5 elements at offset 16 reaches element 21, past the end of its logical "
     r"tensor of shape \(4, 5\) \(20 elements\)"),
    (torch.zeros(5), dict(index=0, offset=0, shape=(4, 5)), ValueError,
     r"group=None declares the whole tensor, but this piece holds \[0, 5\) of 20 elements"),
    (torch.zeros(2, 10), dict(index=0, offset=1, shape=(20,)), ValueError,
     r"reaches element 21, past the end"),
    (torch.zeros(0), dict(index=0, offset=21, shape=(20,)), ValueError, r"reaches element 21"),
    ([0.0] * 4, dict(index=0, offset=0, shape=(4,)), TypeError, r"tensor must be a torch.Tensor, got list"),
    (torch.zeros(5), dict(index=0, offset=5, shape=(3, 6), split=(1, 2)), ValueError,
     r"reaches element 10, past the end of column slice 1 of 2 of shape \(3, 3\) \(9 elements\)"),
    (torch.zeros(9), dict(index=0, offset=0, shape=(3, 6), split=(1, 2)), ValueError,
     r"split: a piece of a column slice needs the process group"),
]


@pytest.mark.parametrize("tensor, kwargs, error, pattern", DECLARE_ERRORS)
def test_declare_piece_rejects_pieces_that_do_not_fit(tensor, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        declare_piece(tensor, **kwargs)


def test_a_column_slice_counts_offsets_in_its_slice():
    piece = Piece(index=1, offset=3, numel=9, shape=[6, 8], split=[1, 4])
    assert piece.split == (1, 4) and piece.parts == 4 and not piece.is_whole
    assert piece.slice_shape == (6, 2) and piece.slice_numel == 12 and piece.logical_numel == 48
    assert Piece(index=1, offset=0, numel=48, shape=(6, 8)).slice_shape == (6, 8)  # not cut
    with pytest.raises(ValueError, match=r"reaches element 13, past the end of column slice 1 of 4"):
        Piece(index=1, offset=3, numel=10, shape=[6, 8], split=[1, 4])
    with pytest.raises(ValueError, match=r"numel must be >= 0, got -1"):
        Piece(index=1, offset=0, numel=-1, shape=(6, 8))


def test_declare_piece_attaches_and_replaces():
    param = torch.nn.Parameter(torch.zeros(4, 5))
    assert piece_of(param) is None
    assert declare_piece(param, index=7, offset=0, shape=[20]) is param
    assert piece_of(param) == Piece(7, 0, 20, (20,)) == getattr(param, PIECE_ATTRIBUTE)
    declare_piece(param, index=8, offset=0, shape=(4, 5))
    assert piece_of(param) == Piece(8, 0, 20, (4, 5))
    # an empty piece anywhere inside its logical tensor (its end included) is valid only with a
    # group; as a whole tensor an empty piece is the empty tensor
    declare_piece(torch.zeros(0), index=1, offset=0, shape=(0, 3))
    with pytest.raises(TypeError, match="tensor must be a torch.Tensor"):
        piece_of("x")
    # a view is another tensor object: the declaration does not travel to it
    assert piece_of(param.view(-1)) is None


def test_number_parameters_uses_positions_over_groups():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 0, 1, 4, 2)]
    number_parameters([{"params": params[:2]}, {"params": params[2], "lr": 1.0}, {"params": params[3:]}])
    assert [piece_of(p) for p in params] == [Piece(i, 0, p.numel(), tuple(p.shape)) for i, p in enumerate(params)]
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1, bias=False))
    number_parameters(model.parameters())  # a generator
    assert [piece_of(p).index for p in model.parameters()] == [0, 1, 2]
    assert piece_of(model[1].weight) == Piece(2, 0, 2, (1, 2))
    # a subset of the parameters (a ZeroRedundancyOptimizer rank's share) keeps the indices
    subset = list(model.parameters())[1:]
    assert [piece_of(p).index for p in subset] == [1, 2]


@pytest.mark.parametrize("params, error, pattern", [
    ({torch.zeros(1)}, TypeError, r"params must be an ordered iterable of tensors, not a set"),
    ([torch.zeros(1), 3], TypeError, r"params must contain tensors, got int at position 1"),
    ([{"lr": 1.0}], ValueError, r"a parameter group must have a 'params' entry"),
    ([{"params": {torch.zeros(1)}}], TypeError, r"a group's params must be an ordered iterable"),
    (5, TypeError, r"params must be an iterable of tensors, got int"),
])
def test_number_parameters_rejects(params, error, pattern):
    with pytest.raises(error, match=pattern):
        number_parameters(params)


def test_number_parameters_rejects_duplicates_before_declaring():
    a, b = torch.zeros(2), torch.zeros(3)
    with pytest.raises(ValueError, match=r"the parameter at position 2 appears more than once"):
        number_parameters([a, b, a])
    assert piece_of(a) is None and piece_of(b) is None


def test_a_piece_knows_its_blocks():
    piece = Piece(4, 30, 12, (10, 6))
    assert piece.blocks("row") == BlockLayout(12, 6, 30, 60)
    assert piece.blocks("tensor").block_size == 60 and piece.blocks(7).block_size == 7
    record = PieceRecord(Piece(0, 5, 10, (100,)), 4, "w")
    assert (record.layout.first_block, record.layout.num_blocks) == (1, 3)
    assert PieceRecord(Piece(0, 5, 0, (100,)), 4).layout.num_blocks == 0
    assert record.label() == "piece 'w' (tensor index 0)"
    sliced = Piece(1, 3, 9, (6, 8), split=(1, 4))
    assert sliced.blocks("row") == BlockLayout(9, 2, 3, 12, sliced=True)
    with pytest.raises(ValueError, match=r"block=5: tensor index 1 is declared a piece of column slice 1 of 4"):
        sliced.blocks(5)


# ---------------------------------------------------------------- the shared-block layout

def D(index, offset, numel, shape, block, name="p", kind="tensor", part=0, parts=1):
    return PieceRecord(Piece(index, offset, numel, shape, split=(part, parts)), block, name, kind)


LAYOUT_ERRORS = [
    # overlaps: on one rank, across ranks
    ([[D(0, 0, 10, (20,), 3, "a"), D(0, 9, 2, (20,), 3, "b")]], ValueError,
     r"^pieces of tensor index 0 overlap: 'a' holds \[0, 10\) on rank 0 and 'b' holds \[9, 11\) on rank 0$"),
    ([[D(0, 0, 10, (20,), 3, "a")], [], [D(0, 5, 10, (20,), 3, "c")]], ValueError,
     r"^pieces of tensor index 0 overlap: 'a' holds \[0, 10\) on rank 0 and 'c' holds \[5, 15\) on rank 2$"),
    # disagreements between ranks
    ([[D(2, 0, 10, (4, 5), 5, "x")], [D(2, 10, 10, (20,), 5, "y")]], ValueError,
     r"^tensor index 2 has logical shape \(4, 5\) in 'x' on rank 0 but \(20,\) in 'y' on rank 1$"),
    ([[D(2, 0, 10, (20,), 5, "x")], [D(2, 10, 10, (20,), 4, "x")]], ValueError,
     r"^tensor index 2 has block size 5 in 'x' on rank 0 but 4 in 'x' on rank 1$"),
    ([[D(3, 0, 10, (20,), 5, "x", "dtensor")], [D(3, 10, 10, (20,), 5, "x")]], ValueError,
     r"^tensor index 3 has kind 'dtensor' in 'x' on rank 0 but 'tensor' in 'x' on rank 1; "
     r"give one logical tensor one way$"),
    # the RNG's fields
    ([[D(0, 2**33 - 1, 1, (2**33,), 1, "big")]], ValueError,
     r"^a tensor of 8589934592 elements in blocks of 1 has more than 2\*\*32 blocks; use a larger block$"),
]


@pytest.mark.parametrize("records, error, pattern", LAYOUT_ERRORS)
def test_shared_block_layout_rejects(records, error, pattern):
    with pytest.raises(error, match=pattern):
        shared_block_layout(records)


def test_shared_block_layout_names_ranks_and_allows_2_to_32_blocks():
    with pytest.raises(ValueError, match=r"on rank 5 and .* on rank 9"):
        shared_block_layout([[D(0, 0, 3, (9,), 2, "a")], [D(0, 2, 3, (9,), 2, "b")]], ranks=[5, 9])
    layout = shared_block_layout([[D(0, 2**32 - 1, 1, (2**32,), 1)]])  # exactly 2**32 blocks
    assert layout.blocks == () and layout.num_rows == (1,)


def test_shared_block_layout_by_hand():
    # tensor 0: 10 elements in blocks of 4 -> blocks [0,4) [4,8) [8,10)
    #   rank 0 holds [0, 5) and [9, 10); rank 1 holds [5, 9); rank 2 nothing of it
    # tensor 1: 6 elements, one block ("tensor"), cut over ranks 0, 1, 2; tensor 2 whole on rank 2
    layout = shared_block_layout([
        [D(0, 0, 5, (10,), 4), D(1, 0, 2, (6,), 6), D(0, 9, 1, (10,), 4)],
        [D(1, 2, 1, (6,), 6), D(0, 5, 4, (10,), 4), D(1, 3, 0, (6,), 6)],
        [D(2, 0, 3, (3,), 1), D(1, 3, 3, (6,), 6)],
    ])
    assert layout.blocks == ((0, 1), (0, 2), (1, 0))
    assert layout.holders == (2, 2, 3)
    assert layout.num_rows == (4, 3, 4)
    assert layout.rows == ((1, 2, 3), (0, 1, 2), (3,))
    assert layout.positions == ((0, 2, 1), (2, 0, 1), (2,))
    assert layout.cross_rank
    # the same pieces on one rank: every block still needs adding up, but no collective
    alone = shared_block_layout([[d for rank in [
        [D(0, 0, 5, (10,), 4), D(0, 9, 1, (10,), 4)], [D(0, 5, 4, (10,), 4)]] for d in rank]])
    assert alone.blocks == ((0, 1), (0, 2)) and alone.holders == (1, 1) and not alone.cross_rank
    assert alone.rows == ((1, 2, 3, 4),) and alone.positions == ((0, 1, 0, 1),)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_shared_block_layout_matches_brute_force(world_size):
    rng = random.Random(world_size)
    for case in range(40):
        holders = [rng.sample(range(world_size), rng.randint(1, world_size))
                   for _ in range(rng.randint(1, 5))]
        records = by_rank(random_cuts(rng, holders), world_size, rng)
        layout = shared_block_layout(records)
        assert dataclasses.asdict(layout) == brute_force_layout(records), (world_size, case)
        assert layout.cross_rank == any(h >= 2 for h in layout.holders)


def test_shared_block_layout_is_independent_of_tensor_sizes():
    # a 2**31-element tensor in blocks of 3, cut in two: the layout never walks its blocks
    n = 2**31
    layout = shared_block_layout([[D(0, 0, n // 2 + 1, (n,), 3)], [D(0, n // 2 + 1, n // 2 - 1, (n,), 3)]])
    assert layout.blocks == ((0, (n // 2) // 3),) and layout.rows == ((layout.num_rows[0] - 1,), (0,))


def test_pieces_of_column_slices_share_every_row_they_cross():
    # a (4, 6) tensor in 2 column slices of (4, 3), row blocks of 3 elements per slice:
    # rank 0 holds slice 0 rows 0-3 (cut at element 5); rank 1 holds slice 1 whole
    layout = shared_block_layout([
        [D(0, 0, 5, (4, 6), "row", "a", part=0, parts=2), D(0, 5, 7, (4, 6), "row", "b", part=0, parts=2)],
        [D(0, 0, 12, (4, 6), "row", "c", part=1, parts=2)],
    ])
    assert layout.blocks == ((0, 0), (0, 1), (0, 2), (0, 3))
    assert layout.holders == (2, 2, 2, 2)
    assert layout.rows == ((0, 1, 2, 3, 4), (0, 1, 2, 3))
    assert layout.positions == ((0, 1, 1, 2, 3), (0, 1, 2, 3))
    with pytest.raises(ValueError, match="column slice count 2 in 'a' on rank 0 but 1"):
        shared_block_layout([[D(0, 0, 6, (4, 6), "row", "a", part=0, parts=2)], [D(0, 6, 3, (4, 6), 3, "b")]])
    with pytest.raises(ValueError, match=r"pieces of tensor index 0 overlap"):
        shared_block_layout([[D(0, 0, 6, (4, 6), "row", "a", part=1, parts=2)],
                             [D(0, 3, 3, (4, 6), "row", "b", part=1, parts=2)]])
    with pytest.raises(ValueError, match=r"past the end of column slice 1 of 2"):
        D(0, 10, 3, (4, 6), "row", "a", part=1, parts=2)
