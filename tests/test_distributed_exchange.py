"""BlockSumExchange on 2 and 4 gloo ranks (CPU): block sums of split blocks, validation, cost.

Spawning ranks costs seconds (each imports torch), so each world size is spawned once, by a
module-scoped fixture, and runs every case; the tests below assert on what the ranks returned.

Every case is a set of logical tensors cut at random offsets (test_pieces.random_cuts: empty
and one-element pieces, several pieces of one tensor on a rank, ranks holding nothing, pieces
left out) under block sizes 1, 7, 300 and the whole tensor, each tensor's pieces held over one
of several process groups (the world, two distinct groups of the same ranks, pairs, a trio, a
group of one rank) or whole on one rank without a group. Every rank computes its local rows
from per-element values (a, b, c) of known global tensors, runs ``reduce_``, and returns its
rows; the expected rows are the whole-block sums over the elements some piece holds.

NOTE: [tolerance] Even cases use integer values in [-8, 8]: every partial sum is an integer of
magnitude <= 8 * 700 < 2**24, exact in float32 whatever the summation order, so the result
must equal the float64 sum exactly (a wrong row or a double count is off by >= 1). Odd cases
use standard-normal values: the rows are float32 sums of the block's n elements in some order
(within a piece, then across pieces and ranks), and any order of summing n float32 terms has
|error| <= (n - 1) * 2**-24 * sum|x_i| (+ O(2**-48)), so rows are compared to the float64 sum
with atol = n * 2**-24 * sum|x_i| per row and sum.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import re

import pytest
import torch

from distributed_helpers import RankError, run_ranks
from magma_ext.exchange import BYTES_PER_SHARED_BLOCK, BlockSumExchange, PieceRecord
from magma_ext.pieces import Piece
from test_pieces import brute_force_layout, random_cuts, random_shape

RANDOM_CASES = 30
U = 2.0**-24

# group name -> ranks; "world" is torch.distributed.group.WORLD, the others new_group(ranks)
GROUPS = {
    2: {"world": (0, 1), "pair": (0, 1), "solo0": (0,), "solo1": (1,)},
    4: {"world": (0, 1, 2, 3), "world2": (0, 1, 2, 3), "pair01": (0, 1), "pair23": (2, 3),
        "trio": (1, 2, 3), "solo0": (0,)},
}


def D(index, offset, numel, shape, block, name="p", kind="tensor", split=(0, 1)) -> PieceRecord:
    """The record of a piece without a process group."""
    return PieceRecord(Piece(index, offset, numel, shape, split=split), block, name, kind)


def _with_group(record: PieceRecord, group) -> PieceRecord:
    return record._replace(piece=dataclasses.replace(record.piece, group=group))


# ---------------------------------------------------------------- what runs on every rank

def _make_groups(world_size: int) -> dict:
    import torch.distributed as dist

    out = {}
    for name, ranks in GROUPS[world_size].items():  # the same order on every rank
        out[name] = dist.group.WORLD if name == "world" else dist.new_group(list(ranks))
    return out


class _Counter:
    """Counts calls of torch.distributed functions made through the module's attributes."""

    def __init__(self, *names):
        import torch.distributed as dist

        self.dist, self.names, self.calls = dist, names, {name: 0 for name in names}
        self.saved = {name: getattr(dist, name) for name in names}

    def __enter__(self):
        for name in self.names:
            def counted(*args, _name=name, **kwargs):
                self.calls[_name] += 1
                return self.saved[_name](*args, **kwargs)
            setattr(self.dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.dist, name, fn)


def _random_spec(world_size: int, case: int) -> list[tuple[str | None, int, list]]:
    """[(group name or None, tensor index, [(rank, record), ...])], the same on every rank."""
    rng = random.Random(1000 * world_size + case)
    names = list(GROUPS[world_size]) + [None]
    spec = []
    for index in range(rng.randint(1, 6)):
        name = rng.choice(names)
        if name is None:  # a whole tensor on one rank
            shape = random_shape(rng)
            numel = 1
            for size in shape:
                numel *= size
            block = rng.choice([1, 7, 300, "tensor"])
            spec.append((None, index, [(rng.randrange(world_size), D(index, 0, numel, shape, block, f"t{index}"))]))
        else:
            holders = list(GROUPS[world_size][name])
            holders = rng.sample(holders, rng.randint(1, len(holders)))
            ((_, pieces),) = random_cuts(rng, [holders], first_index=index)
            if pieces:  # (every piece may have been left out)
                spec.append((name, index, pieces))
    return spec


def _fixed_specs(world_size: int) -> list:
    if world_size == 2:
        return [
            # one block ("tensor") split over both ranks, rank 0 holding two pieces of it
            [("world", 0, [(0, D(0, 0, 3, (4, 5), "tensor", "w")), (1, D(0, 3, 10, (4, 5), "tensor", "w")),
                           (0, D(0, 13, 7, (4, 5), "tensor", "w"))])],
            # a group of one rank with two local pieces of one block: added up, no collective
            [("solo1", 0, [(1, D(0, 0, 5, (9,), "tensor", "s")), (1, D(0, 5, 4, (9,), "tensor", "s"))]),
             ("pair", 1, [(0, D(1, 0, 1, (1,), 1, "one"))])],
        ]
    return [
        # a block over 3 ranks of the trio; rank 0 holds nothing of the world group's tensor
        [("trio", 0, [(1, D(0, 0, 4, (12,), "tensor", "a")), (2, D(0, 4, 1, (12,), "tensor", "a")),
                      (3, D(0, 5, 7, (12,), "tensor", "a")), (2, D(0, 12, 0, (12,), "tensor", "a"))]),
         ("world", 1, [(1, D(1, 0, 6, (2, 5), 7, "b")), (3, D(1, 6, 4, (2, 5), 7, "b"))]),
         ("solo0", 2, [(0, D(2, 0, 3, (3,), 1, "c"))])],
    ]


def _local_rows(records, values) -> torch.Tensor:
    rows = [torch.zeros(0, 3)]
    for record in records:
        d = record.piece
        if d.numel:
            lengths = torch.tensor(record.layout.lengths())
            piece = values[d.index][d.offset:d.offset + d.numel]
            rows.append(torch.segment_reduce(piece, "sum", lengths=lengths, axis=0))
    return torch.cat(rows)


def _whole_block_sums(spec, values):
    """index -> (float64 sums of each block over the held elements, sum |x|, elements held)."""
    out = {}
    for _, index, pieces in spec:
        d0, block_size = pieces[0][1].piece, pieces[0][1].layout.block_size
        held = torch.zeros(d0.logical_numel, dtype=torch.bool)
        for _, record in pieces:
            held[record.piece.offset:record.piece.offset + record.piece.numel] = True
        blocks = -(-d0.logical_numel // block_size)
        block_of = torch.arange(d0.logical_numel) // block_size
        x = values[index].double() * held[:, None]
        sums = torch.zeros(blocks, 3, dtype=torch.float64).index_add_(0, block_of, x)
        abs_sums = torch.zeros(blocks, 3, dtype=torch.float64).index_add_(0, block_of, x.abs())
        counts = torch.zeros(blocks, dtype=torch.float64).index_add_(0, block_of, held.double())
        out[index] = (sums, abs_sums, counts)
    return out


def _run_spec(rank: int, world_size: int, spec, groups: dict, case: int, integers: bool) -> dict:
    generator = torch.Generator().manual_seed(case)
    values = {}
    for _, index, pieces in spec:
        shape = (pieces[0][1].piece.logical_numel, 3)
        values[index] = (torch.randint(-8, 9, shape, generator=generator).float() if integers
                         else torch.randn(shape, generator=generator))
    mine = [_with_group(d, None if name is None else groups[name])
            for name, _, pieces in spec for r, d in pieces if r == rank]
    random.Random(case * 97 + rank).shuffle(mine)  # each rank its own order
    joined = sorted({name for name, _, _ in spec if name is not None and rank in GROUPS[world_size][name]})
    if rank % 2:
        joined.reverse()

    with _Counter("all_gather_object") as counted_build:
        exchange = BlockSumExchange.build(mine, "cpu", groups=[groups[name] for name in joined])
    block_sums = _local_rows(mine, values)
    before = block_sums.clone()
    with _Counter("all_reduce") as counted_reduce:
        assert exchange.reduce_(block_sums) is block_sums

    # independent expectations: the whole-block sums, and the cost from the brute-force layout
    whole = _whole_block_sums(spec, values)
    expected, tolerance, keys = [], [], []
    for record in mine:
        sums, abs_sums, counts = whole[record.piece.index]
        span = slice(record.layout.first_block, record.layout.first_block + record.layout.num_blocks)
        expected.append(sums[span])
        tolerance.append(counts[span, None] * U * abs_sums[span])
        keys += [(record.piece.index, b) for b in range(span.start, span.stop)]
    expected = torch.cat(expected) if expected else torch.zeros(0, 3, dtype=torch.float64)
    tolerance = torch.cat(tolerance) if tolerance else torch.zeros(0, 3, dtype=torch.float64)
    error = (block_sums.double() - expected).abs()
    bad = error > (0 if integers else tolerance)
    collectives = bytes_ = 0
    for name in joined:
        by_rank = [[d for n, _, pieces in spec if n == name for r, d in pieces if r == q]
                   for q in range(world_size)]
        layout = brute_force_layout(by_rank)
        if any(h >= 2 for h in layout["holders"]):
            collectives += 1
            bytes_ += BYTES_PER_SHARED_BLOCK * len(layout["blocks"])
    wrong = bad.any(1).nonzero().flatten().tolist()
    worst = float((error / tolerance.clamp_min(1e-300)).max()) if error.numel() and not integers else 0.0
    return dict(
        case=case, integers=integers, rows=block_sums.shape[0],
        bad=[(keys[i], block_sums[i].tolist(), expected[i].tolist()) for i in wrong],
        max_error_over_tolerance=worst,
        changed=int((block_sums != before).any(1).sum()),
        bits={key: block_sums[i].view(torch.int32).tolist() for i, key in enumerate(keys)},
        gathers=counted_build.calls["all_gather_object"], expected_gathers=len(joined),
        all_reduces=counted_reduce.calls["all_reduce"], collectives_per_step=exchange.collectives_per_step,
        expected_collectives=collectives, bytes_per_step=exchange.bytes_per_step, expected_bytes=bytes_,
    )


def _validation_cases(world_size: int) -> dict:
    """name -> {rank: [(record, group name or None)]} (+ "groups": names joined by rank)."""
    last = world_size - 1
    cases = {
        "overlap_across_ranks": {0: [(D(0, 0, 10, (20,), 4, "w"), "world")],
                                 last: [(D(0, 5, 10, (20,), 4, "w"), "world")]},
        "shapes_differ": {0: [(D(0, 0, 10, (4, 5), 4, "w"), "world")],
                          last: [(D(0, 10, 10, (20,), 4, "w"), "world")]},
        "kinds_mixed": {0: [(D(0, 0, 10, (20,), 4, "w", "dtensor"), "world")],
                        last: [(D(0, 10, 10, (20,), 4, "w"), "world")]},
        "block_sizes_differ": {0: [(D(0, 0, 10, (20,), 4, "w"), "world")],
                               last: [(D(0, 10, 10, (20,), 5, "w"), "world")]},
        "blocks_cut_across_slices_on_last_rank": {0: [(D(0, 0, 6, (4, 6), "row", "w", split=(0, 2)), "world")],
                                                  last: [(D(0, 6, 6, (4, 6), 3, "w", split=(0, 2)), "world")]},
        "overlap_on_last_rank_only": {0: [(D(0, 10, 10, (20,), 4, "w"), "world")],
                                      last: [(D(0, 0, 5, (20,), 4, "a"), "world"),
                                             (D(0, 3, 5, (20,), 4, "b"), "world")]},
        "whole_without_group": {0: [(D(0, 0, 10, (20,), 4, "w"), "world")],
                                last: [(D(1, 0, 5, (20,), 4, "v"), None)]},
        "two_groups_one_tensor": {last: [(D(0, 0, 5, (20,), 4, "a"), "world"),
                                         (D(0, 5, 5, (20,), 4, "b"), "world2" if world_size == 4 else "pair")]},
        "not_a_record": {last: [("w", "world")]},
    }
    out = {}
    for name, pieces in cases.items():
        groups = {rank: ["world", "world2" if world_size == 4 else "pair"] for rank in range(world_size)}
        out[name] = {"pieces": pieces, "groups": groups}
    if world_size == 4:  # an error in a group that ranks 0 and 1 are not in: only its members raise
        out["error_in_other_group"] = {
            "pieces": {0: [(D(0, 0, 3, (6,), 4, "p"), "pair01")], 1: [(D(0, 3, 3, (6,), 4, "p"), "pair01")],
                       2: [(D(1, 0, 3, (6,), 4, "q"), "pair23")], 3: [(D(1, 2, 4, (6,), 4, "q"), "pair23")]},
            "groups": {0: ["pair01"], 1: ["pair01"], 2: ["pair23"], 3: ["pair23"]},
        }
    return out


def _validate(rank: int, world_size: int, groups: dict) -> dict:
    out = {}
    for name, case in _validation_cases(world_size).items():
        mine = [d if isinstance(d, str) else _with_group(d, None if g is None else groups[g])
                for d, g in case["pieces"].get(rank, [])]
        try:
            exchange = BlockSumExchange.build(mine, "cpu", groups=[groups[g] for g in case["groups"][rank]])
        except (ValueError, TypeError) as error:
            out[name] = (type(error).__name__, str(error))
        else:
            exchange.reduce_(torch.ones(exchange.num_rows, 3))  # still in step with the others
            out[name] = None
    return out


def _api_checks(rank: int, world_size: int, groups: dict) -> dict:
    """Pieces with a real process group, DTensors, and reduce_'s argument checks."""
    import torch.distributed as dist
    from magma_ext.pieces import Piece, declare_piece, number_parameters, piece_of

    out = {}
    shard = torch.zeros(3)
    declare_piece(shard, index=5, offset=3 * rank, shape=(3 * world_size,), group=dist.group.WORLD)
    out["piece"] = piece_of(shard) == Piece(5, 3 * rank, 3, (3 * world_size,), dist.group.WORLD)
    out["deepcopy_shares_piece"] = piece_of(copy.deepcopy(shard)) is piece_of(shard)
    try:
        number_parameters([shard])
    except ValueError as error:
        out["number_sharded"] = str(error)
    exchange = BlockSumExchange.build([PieceRecord(piece_of(shard), "tensor")], "cpu")
    sums = torch.full((1, 3), float(rank + 1))
    exchange.reduce_(sums)
    out["whole_tensor_block"] = sums.tolist()
    errors = []
    for bad in (torch.zeros(2, 3), torch.zeros(3), [[0.0] * 3]):
        try:
            exchange.reduce_(bad)
        except (TypeError, ValueError) as error:
            errors.append(f"{type(error).__name__}: {error}")
    out["reduce_errors"] = errors
    out["empty_build"] = BlockSumExchange.build([], "cpu").collectives_per_step == 0  # no group: local

    if world_size == 2:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world_size,))
        weight = distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)])
        declare_piece(weight, index=2, offset=0, shape=(4, 3))
        out["dtensor_index"] = piece_of(weight) == Piece(2, 0, 12, (4, 3))
        try:
            declare_piece(weight, index=2, offset=0, shape=(4, 3), group=dist.group.WORLD)
        except TypeError as error:
            out["dtensor_group"] = str(error)
        number_parameters([torch.zeros(1), weight])
        out["dtensor_numbered"] = piece_of(weight) == Piece(1, 0, 12, (4, 3))
    return out


def _rank_body(rank: int, world_size: int) -> dict:
    groups = _make_groups(world_size)
    validation = _validate(rank, world_size, groups)
    cases = []
    specs = _fixed_specs(world_size) + [_random_spec(world_size, case) for case in range(RANDOM_CASES)]
    for case, spec in enumerate(specs):
        cases.append(_run_spec(rank, world_size, spec, groups, case, integers=case % 2 == 0))
    return dict(validation=validation, cases=cases, api=_api_checks(rank, world_size, groups))


# ---------------------------------------------------------------- the tests, in the parent

@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def ranks(request):
    world_size = request.param
    return world_size, run_ranks(world_size, _rank_body, world_size, timeout=90)


@pytest.mark.multiprocess
def test_rows_equal_whole_block_sums(ranks):
    world_size, results = ranks
    for rank, result in enumerate(results):
        for case in result["cases"]:
            assert not case["bad"], (f"rank {rank} case {case['case']} (integers={case['integers']}): "
                                     f"(key, got, expected) {case['bad'][:5]}")
            assert case["max_error_over_tolerance"] <= 1.0
    # the cases exercised something: rows that were added to, on every rank
    assert all(sum(case["changed"] for case in result["cases"]) > 0 for result in results)


@pytest.mark.multiprocess
def test_every_piece_of_a_block_ends_with_the_same_bits(ranks):
    world_size, results = ranks
    for c in range(len(results[0]["cases"])):
        seen = {}
        for rank, result in enumerate(results):
            for key, bits in result["cases"][c]["bits"].items():
                assert seen.setdefault(key, bits) == bits, (c, rank, key)


@pytest.mark.multiprocess
def test_one_gather_per_group_at_build_and_one_all_reduce_per_group_per_step(ranks):
    world_size, results = ranks
    total = 0
    for rank, result in enumerate(results):
        for case in result["cases"]:
            what = f"rank {rank} case {case['case']}"
            assert case["gathers"] == case["expected_gathers"], what
            assert case["all_reduces"] == case["collectives_per_step"] == case["expected_collectives"], what
            assert case["bytes_per_step"] == case["expected_bytes"], what
            total += case["all_reduces"]
    assert total > 0
    # the 2-rank case of a group of one rank with two local pieces of a block: no collective
    if world_size == 2:
        assert results[1]["cases"][1]["all_reduces"] == 0 and results[1]["cases"][1]["changed"] == 2


EXPECTED_ERRORS = {
    "overlap_across_ranks": ("ValueError", r"^pieces of tensor index 0 overlap: 'w' holds \[0, 10\) on rank 0 "
                                           r"and 'w' holds \[5, 15\) on rank {last}$"),
    "shapes_differ": ("ValueError", r"^tensor index 0 has logical shape \(4, 5\) in 'w' on rank 0 but \(20,\) "
                                    r"in 'w' on rank {last}$"),
    "kinds_mixed": ("ValueError", r"^tensor index 0 has kind 'dtensor' in 'w' on rank 0 but 'tensor' in 'w' "
                                  r"on rank {last}; give one logical tensor one way$"),
    "block_sizes_differ": ("ValueError", r"^tensor index 0 has block size 4 in 'w' on rank 0 but 5"),
    "blocks_cut_across_slices_on_last_rank": ("ValueError", r"^block=3: tensor index 0 is declared a piece of "
                                                            r"column slice 0 of 2 \(a row-parallel weight\)"),
    "overlap_on_last_rank_only": ("ValueError", r"^pieces of tensor index 0 overlap: 'a' holds \[0, 5\) on rank "
                                                r"{last} and 'b' holds \[3, 8\) on rank {last}$"),
    "whole_without_group": ("ValueError", r"^piece 'v' \(tensor index 1\) on rank {last} holds \[0, 5\) of 20 "
                                          r"elements without a process group: a piece without one must be "
                                          r"the whole tensor$"),
    "two_groups_one_tensor": ("ValueError", r"^tensor index 0 on rank {last}: 'a' names process group '.*' "
                                            r"\(ranks \[0, 1.*\]\) but 'b' names process group '.*' \(ranks "
                                            r"\[0, 1.*\]\); all pieces of a logical tensor must name one group$"),
    "not_a_record": ("TypeError", r"^records\[0\] must be a PieceRecord, got str$"),
}


@pytest.mark.multiprocess
def test_every_rank_raises_the_same_error_without_hanging(ranks):
    world_size, results = ranks
    last = world_size - 1
    for name, (kind, pattern) in EXPECTED_ERRORS.items():
        got = [result["validation"][name] for result in results]
        assert all(g == got[0] for g in got), (name, got)
        assert got[0] is not None and got[0][0] == kind, (name, got[0])
        assert re.search(pattern.format(last=last), got[0][1]), (name, got[0][1])
    if world_size == 4:
        got = [result["validation"]["error_in_other_group"] for result in results]
        assert got[0] is None and got[1] is None
        assert got[2] == got[3] == ("ValueError", "pieces of tensor index 1 overlap: 'q' holds [0, 3) on rank 2 "
                                                  "and 'q' holds [2, 6) on rank 3")


@pytest.mark.multiprocess
def test_pieces_with_process_groups_and_reduce_checks(ranks):
    world_size, results = ranks
    total = float(sum(range(1, world_size + 1)))
    for result in results:
        api = result["api"]
        assert api["piece"] and api["deepcopy_shares_piece"]
        assert re.match(r"the parameter at position 0 is declared a piece of tensor index 5 .* held with a "
                        r"process group; number_parameters is for whole parameters", api["number_sharded"])
        assert api["whole_tensor_block"] == [[total] * 3]  # one block ("tensor") over all ranks
        assert api["reduce_errors"] == [
            "ValueError: block_sums must have shape (1, 3), got (2, 3)",
            "ValueError: block_sums must have shape (1, 3), got (3,)",
            "TypeError: block_sums must be a tensor, got list",
        ]
        assert api["empty_build"]
        if world_size == 2:
            assert api["dtensor_index"] and api["dtensor_numbered"]
            assert api["dtensor_group"].startswith("a DTensor describes its own sharding")


def test_build_without_process_groups_needs_no_distributed():
    # one process, torch.distributed never initialized: whole tensors only (group None)
    exchange = BlockSumExchange.build([D(0, 0, 5, (5,), 2, "a"), D(1, 0, 0, (0,), 1, "e")], "cpu")
    assert (exchange.num_rows, exchange.collectives_per_step, exchange.bytes_per_step) == (3, 0, 0)
    sums = torch.arange(9.0).view(3, 3)
    assert torch.equal(exchange.reduce_(sums), torch.arange(9.0).view(3, 3))
    with pytest.raises(ValueError, match=r"piece 'a' \(tensor index 0\) on rank 0 holds \[0, 3\) of 5 elements "
                                         r"without a process group"):
        BlockSumExchange.build([D(0, 0, 3, (5,), 2, "a")], "cpu")
    with pytest.raises(ValueError, match=r"pieces of tensor index 0 overlap"):
        BlockSumExchange.build([D(0, 0, 5, (5,), 2, "a"), D(0, 0, 5, (5,), 2, "b")], "cpu")


def _fail_on_rank_1(rank: int) -> None:
    import time

    if rank == 1:
        raise ValueError("rank 1 fails")
    time.sleep(600)  # rank 0 hangs: the harness must kill it


@pytest.mark.multiprocess
def test_harness_reraises_a_rank_error_and_kills_the_ranks_left():
    import time

    start = time.monotonic()
    with pytest.raises(ValueError, match="rank 1 fails") as caught:
        run_ranks(2, _fail_on_rank_1, timeout=60, error_grace=0.5)
    assert time.monotonic() - start < 30
    assert isinstance(caught.value.__cause__, RankError) and caught.value.__cause__.rank == 1
    assert "in _fail_on_rank_1" in caught.value.__cause__.remote_traceback
    assert "raised on rank 1" in caught.value.__notes__[0]
