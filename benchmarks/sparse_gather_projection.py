"""Project the sparse parameter gather's traffic to other data-parallel sizes and keep_probs.

    python benchmarks/sparse_gather_projection.py layout.json
    python benchmarks/sparse_gather_projection.py layout.json --keep-probs 0.5 0.1 --dps 2 8 64 512 \
        --steps 20 --out projection.md
    python benchmarks/sparse_gather_projection.py --self-check [layout.json]

``layout.json`` is a bucket layout record (``benchmarks/sparse_gather_record.py``), as
``benchmarks/megatron_bench.py --distributed-optimizer --param-gather sparse --layout-json
layout.json`` writes it: every bucket's size and element size, its tensors' positions and block
layouts, and their mask rules. No GPU and no megatron-core: the masks are drawn on the CPU from
the rules, as every rank draws them.

For each keep_prob (it replaces the keep_prob of every masked rule; the blocks stay the
record's) and each DP size, each bucket's recorded size (already padded for the recorded DP
size) is padded to a multiple of DP (``ceil(numel / DP) * DP``, as Megatron pads its buckets)
and, for steps 1..``--steps``, the sparse gather's traffic is counted as
:class:`magma_ext.megatron.sparse_gather.SparseGather` sends it: per group of buckets of one
element size, every rank packs the changed elements of its shard and the packed buffers are
padded to the largest rank's count. *bytes vs dense* is that padded width times the element
size, summed over the groups, over the dense all-gather's shard bytes (a rank's sent + received
is DP times either, so this is also the ratio of sent + received); *without padding* uses the
mean rank's count instead of the largest, to show what the padding to the largest rank costs.

Per-rank counts come from one ``searchsorted`` of the shard boundaries into the changed ranges
(``--self-check`` compares them with ``shard_ranges``), so DP 512 costs no more than DP 2; the
masks' draw (``changed_ranges``, once per keep_prob and step) is the cost: seconds for a
1B-parameter layout in tensor blocks, tens of seconds in row blocks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

# first: it puts the checkout on sys.path where magma_ext is not installed
from sparse_gather_record import RecordBucket, buckets_of_record, padded_numel, synthetic_record, with_keep_prob

from magma_ext.megatron.changed_ranges import BlockTable, changed_ranges, shard_ranges
from magma_ext.megatron.sparse_gather import SparseGather


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------

def changed_before(ranges: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """For each ``x`` of ``points``, the changed elements in ``[0, x)``: ``ranges`` are
    ``changed_ranges``'s (sorted, disjoint)."""
    if len(ranges) == 0:
        return torch.zeros_like(points)
    starts, ends = ranges[:, 0].contiguous(), ranges[:, 1].contiguous()
    before = torch.zeros(len(ranges) + 1, dtype=torch.int64)
    torch.cumsum(ends - starts, 0, out=before[1:])
    reached = torch.searchsorted(starts, points, right=True)  # ranges starting at or before x
    # only the last of those can run on past x: take off its part at or after x
    last_end = torch.where(reached > 0, ends[(reached - 1).clamp(min=0)], torch.zeros_like(points))
    return before[reached] - (last_end - points).clamp(min=0)


def rank_counts(ranges: torch.Tensor, numel: int, dp: int) -> torch.Tensor:
    """Changed elements in each of ``dp`` shards of a bucket of ``numel`` elements (a multiple of
    ``dp``): what ``shard_ranges`` gives, summed per rank, without a loop over ranks."""
    shard = numel // dp
    before = changed_before(ranges, torch.arange(dp + 1, dtype=torch.int64) * shard)
    return before[1:] - before[:-1]


def rank_range_counts(ranges: torch.Tensor, numel: int, dp: int) -> torch.Tensor:
    """How many of ``ranges`` (sorted, disjoint) overlap each of ``dp`` shards of a bucket of
    ``numel`` elements: the lengths of ``shard_ranges``'s lists, without a loop over ranks."""
    if len(ranges) == 0:
        return torch.zeros(dp, dtype=torch.int64)
    bounds = torch.arange(dp + 1, dtype=torch.int64) * (numel // dp)
    first = torch.searchsorted(ranges[:, 1].contiguous(), bounds[:-1], right=True)  # ends after the shard's start
    stop = torch.searchsorted(ranges[:, 0].contiguous(), bounds[1:], right=False)  # start before its end
    return (stop - first).clamp(min=0)


@dataclass
class StepCounts:
    """One step's changes at data-parallel size ``dp``, per element size (the sparse gather
    decides its route per dtype): changed elements and changed ranges of each rank's shard."""

    dp: int
    elements: dict[int, torch.Tensor]
    ranges: dict[int, torch.Tensor]
    dense_bytes: int  # a dense all-gather's shard, in bytes

    @classmethod
    def of(cls, buckets: list[RecordBucket], ranges: list[torch.Tensor], dp: int) -> StepCounts:
        """From the changed ``ranges`` of every bucket (buckets padded to a multiple of ``dp``)."""
        elements = defaultdict(lambda: torch.zeros(dp, dtype=torch.int64))
        range_counts = defaultdict(lambda: torch.zeros(dp, dtype=torch.int64))
        dense = 0
        for (numel, element_size, _), bucket_ranges in zip(buckets, ranges):
            padded = padded_numel(numel, dp)
            elements[element_size] += rank_counts(bucket_ranges, padded, dp)
            range_counts[element_size] += rank_range_counts(bucket_ranges, padded, dp)
            dense += padded // dp * element_size
        return cls(dp, dict(elements), dict(range_counts), dense)

    def transfers(self, element_size: int) -> int:
        """The most point-to-point transfers a rank posts on the in-place route
        (``magma_ext.megatron.in_place_exchange.direct_ops``)."""
        mine = self.ranges[element_size]
        return int(((self.dp - 1) * mine + mine.sum() - mine).max())

    def fractions(self) -> tuple[float, float]:
        """(packed bytes over dense bytes, the same with the mean rank's count for the padded
        width: what the in-place route moves)."""
        packed = sum(int(c.max()) * size for size, c in self.elements.items())
        mean = sum(int(c.sum()) * size for size, c in self.elements.items()) / self.dp
        return packed / self.dense_bytes, mean / self.dense_bytes

    def most_transfers(self) -> int:
        """:meth:`transfers`, the largest over element sizes."""
        return max((self.transfers(size) for size in self.ranges), default=0)

    def auto_route(self) -> tuple[float, bool]:
        """(bytes vs dense, whether some element size went in place) with the routes
        ``SparseGather``'s auto rule picks per element size (its ``max_padding`` and
        ``max_direct_ops``)."""
        moved, in_place = 0.0, False
        for size, c in self.elements.items():
            exact = int(c.sum())
            if (self.dp * int(c.max()) > SparseGather.max_padding * exact
                    and self.transfers(size) <= SparseGather.max_direct_ops):
                moved += exact * size / self.dp  # each rank's mean: it sends its own and receives the others'
                in_place = True
            else:
                moved += int(c.max()) * size
        return moved / self.dense_bytes, in_place


@dataclass
class Projection:
    keep_prob: float
    dp: int
    fractions: list[float] = field(default_factory=list)  # per step: bytes vs dense (the packed route)
    unpadded: list[float] = field(default_factory=list)  # per step: the mean rank's count (the in-place route)
    transfers: list[int] = field(default_factory=list)  # per step: the in-place route's most transfers of a rank
    auto: list[float] = field(default_factory=list)  # per step: bytes vs dense with the auto rule's routes
    auto_in_place: list[bool] = field(default_factory=list)  # per step: whether the auto rule went in place

    @property
    def transfers_max(self) -> int:
        return max(self.transfers) if self.transfers else 0

    @property
    def mean(self) -> float:
        return statistics.fmean(self.fractions)

    @property
    def min(self) -> float:
        return min(self.fractions)

    @property
    def max(self) -> float:
        return max(self.fractions)

    @property
    def unpadded_mean(self) -> float:
        return statistics.fmean(self.unpadded)


def project(buckets: list[RecordBucket], rules: dict, keep_probs: list[float], dps: list[int],
            steps: int) -> list[Projection]:
    """Per keep_prob and DP size (in that order), the per-step fractions over steps 1..``steps``."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not sum(numel for numel, _, _ in buckets):
        raise ValueError("the record has no elements")
    out = []
    tables = [BlockTable.of(tensors) for _, _, tensors in buckets]  # built once, drawn per step
    for keep_prob in keep_probs:
        step_rules = with_keep_prob(rules, keep_prob)
        per_dp = {dp: Projection(keep_prob, dp) for dp in dps}
        for step in range(1, steps + 1):
            ranges = [table.changed(step_rules, step) for table in tables]
            for dp, projection in per_dp.items():
                counts = StepCounts.of(buckets, ranges, dp)
                fraction, unpadded = counts.fractions()
                projection.fractions.append(fraction)
                projection.unpadded.append(unpadded)
                projection.transfers.append(counts.most_transfers())
                auto, in_place = counts.auto_route()
                projection.auto.append(auto)
                projection.auto_in_place.append(in_place)
        out.extend(per_dp.values())
    return out


# --------------------------------------------------------------------------------------------
# Self-check: the per-rank counts against shard_ranges
# --------------------------------------------------------------------------------------------

def self_check(buckets: list[RecordBucket], rules: dict, keep_probs: list[float], dps: list[int],
               steps: int) -> int:
    """Compare :func:`rank_counts` and :func:`rank_range_counts` with ``shard_ranges`` on every bucket; return the number of
    (bucket, step, keep_prob, DP) cases compared; raise AssertionError on a difference."""
    cases = 0
    for keep_prob in keep_probs:
        step_rules = with_keep_prob(rules, keep_prob)
        for step in range(1, steps + 1):
            for b, (numel, _, tensors) in enumerate(buckets):
                ranges = changed_ranges(tensors, step_rules, step)
                for dp in dps:
                    padded = padded_numel(numel, dp)
                    expected = [int((r[:, 1] - r[:, 0]).sum()) for r in shard_ranges(ranges, padded, dp)]
                    got = rank_counts(ranges, padded, dp).tolist()
                    if got != expected:
                        raise AssertionError(f"bucket {b}, step {step}, keep_prob {keep_prob}, DP {dp}: "
                                             f"per-rank counts {got} != shard_ranges' {expected}")
                    lists = [len(r) for r in shard_ranges(ranges, padded, dp)]
                    if rank_range_counts(ranges, padded, dp).tolist() != lists:
                        raise AssertionError(f"bucket {b}, step {step}, keep_prob {keep_prob}, DP {dp}: range "
                                             f"counts {rank_range_counts(ranges, padded, dp).tolist()} != {lists}")
                    cases += 1
    return cases


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def describe_record(path: str, buckets: list[RecordBucket], rules: dict, steps: int) -> str:
    tensors = [t for _, _, bucket_tensors in buckets for t in bucket_tensors]
    masked = [t for t in tensors if rules[t.rule].masked]
    sizes = "/".join(str(s) for s in sorted({size for _, size, _ in buckets}))
    return (f"Layout `{path}`: {sum(t.layout.numel for t in tensors):,} elements in {len(tensors)} tensors "
            f"({sum(t.layout.numel for t in masked):,} in {len(masked)} masked tensors), {len(buckets)} buckets "
            f"({sum(numel for numel, _, _ in buckets):,} elements with padding; element sizes {sizes} bytes); "
            f"steps 1-{steps}. *bytes vs dense*: (sent + received) per rank of the sparse gather's packed route "
            f"over a dense all-gather's, buckets padded to a multiple of DP; *without padding*: the "
            f"mean rank's changed elements instead of the largest rank's, which is what the in-place route "
            f"moves (`SparseGather.route`); *in-place transfers*: the most point-to-point sends and "
            f"receives one rank would post on that route in one step; *auto route*: what `SparseGather`'s "
            f"default rule sends (in place per element size where packing pads past "
            f"{SparseGather.max_padding:g}x the changed elements and no rank posts more than "
            f"{SparseGather.max_direct_ops:,} transfers; packed otherwise).")


def format_table(projections: list[Projection]) -> str:
    lines = ["| keep_prob | DP | packed: bytes vs dense mean | min | max | in place (without padding) "
             "| in-place transfers (max) | auto route: bytes vs dense | auto route taken |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in projections:
        steps_in_place = sum(p.auto_in_place)
        taken = ("packed" if not steps_in_place else "in place" if steps_in_place == len(p.auto_in_place)
                 else f"in place in {steps_in_place} of {len(p.auto_in_place)} steps")
        lines.append(f"| {p.keep_prob:g} | {p.dp} | {p.mean:.4f} | {p.min:.4f} | {p.max:.4f} "
                     f"| {p.unpadded_mean:.4f} | {p.transfers_max:,} | {statistics.fmean(p.auto):.4f} | {taken} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("layout_json", nargs="?", default=None,
                   help="a layout record JSON file (benchmarks/megatron_bench.py --layout-json)")
    p.add_argument("--keep-probs", type=float, nargs="+", default=[0.5, 0.1],
                   help="keep_prob of every masked rule, one projection each")
    p.add_argument("--dps", type=int, nargs="+", default=[2, 8, 64, 512], help="data-parallel sizes")
    p.add_argument("--steps", type=int, default=20, help="steps 1..N")
    p.add_argument("--out", default=None, help="also write the table as Markdown to this file")
    p.add_argument("--self-check", action="store_true",
                   help="compare the per-rank counts with shard_ranges on a synthetic record (and on "
                        "the layout's first step, if one is given), then project as usual")
    args = p.parse_args(argv)
    if args.layout_json is None and not args.self_check:
        p.error("a layout JSON file is needed (or --self-check alone)")
    if any(not 0.0 <= k <= 1.0 for k in args.keep_probs):
        p.error(f"--keep-probs {args.keep_probs}: each must be in [0, 1]")
    if any(dp < 1 for dp in args.dps):
        p.error(f"--dps {args.dps}: each must be at least 1")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.self_check:
        buckets, rules = buckets_of_record(json.loads(json.dumps(synthetic_record())))
        cases = self_check(buckets, rules, [0.0, 0.1, 0.5, 1.0], sorted({1, 2, 3, 8, 13, *args.dps}), 5)
        if args.layout_json is not None:
            buckets, rules = buckets_of_record(json.loads(Path(args.layout_json).read_text()))
            cases += self_check(buckets, rules, args.keep_probs, args.dps, 1)
        print(f"self-check: per-rank counts equal shard_ranges' in {cases} cases", file=sys.stderr)
        if args.layout_json is None:
            return 0

    buckets, rules = buckets_of_record(json.loads(Path(args.layout_json).read_text()))
    if not any(rule.masked for rule in rules.values()):
        print("note: the record has no masked rule (recorded at keep_prob 1, or nothing masked): "
              "--keep-probs change nothing", file=sys.stderr)
    projections = project(buckets, rules, args.keep_probs, args.dps, args.steps)
    heading = (f"# Sparse parameter gather: traffic projected to other data-parallel sizes\n\n"
               f"Computed {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on the CPU (the masks are drawn "
               f"as every rank draws them; no GPU) by `python benchmarks/sparse_gather_projection.py "
               f"{' '.join(sys.argv[1:]) if argv is None else ' '.join(argv)}`.\n\n")
    report = heading + describe_record(args.layout_json, buckets, rules, args.steps) + "\n\n" + \
        format_table(projections)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
