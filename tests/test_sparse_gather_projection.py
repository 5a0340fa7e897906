"""benchmarks/sparse_gather_projection.py on CPU: its per-step traffic fractions against an
element-by-element count on small bucket records, at keep_prob 1 and 0, and its per-rank
counts against shard_ranges."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from magma_ext.layout import BlockLayout
from magma_ext.megatron.buckets import Bucket, BucketTensor
from magma_ext.megatron.changed_ranges import MaskRule
from magma_ext.philox import keep_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sparse_gather_projection as projection  # noqa: E402
from sparse_gather_record import buckets_of_record, layout_record, padded_numel, synthetic_record  # noqa: E402

DPS = [1, 2, 3, 8]


def round_trip(buckets, rules):
    """The record as the script reads it: through JSON and buckets_of_record."""
    return buckets_of_record(json.loads(json.dumps(layout_record(buckets, rules))))


def random_record(seed: int):
    """The script's own synthetic record (gaps between tensors, pieces at offsets inside their
    logical tensors, a dense rule, two element sizes, sizes few DP sizes divide), read back as
    the script reads a file."""
    return buckets_of_record(json.loads(json.dumps(synthetic_record(seed))))


def brute_force_fractions(buckets, rules, keep_prob, dp, step):
    """Element by element: which change, then per element size the largest rank's count."""
    counts, dense = {}, 0
    for numel, element_size, tensors in buckets:
        padded = -(-numel // dp) * dp
        changed = torch.zeros(padded, dtype=torch.bool)
        for t in tensors:
            rule = rules[t.rule]
            elements = torch.arange(t.layout.numel, dtype=torch.int64)
            if rule.masked:
                blocks = (t.layout.offset + elements) // t.layout.block_size
                kept = keep_mask(rule.seed, torch.full_like(blocks, t.index), blocks,
                                 torch.full_like(blocks, step), keep_prob)
            else:
                kept = torch.ones(t.layout.numel, dtype=torch.bool)
            changed[t.start + elements] = kept
        per_rank = changed.view(dp, padded // dp).sum(dim=1)
        counts[element_size] = counts.get(element_size, 0) + per_rank
        dense += padded // dp * element_size
    sparse = sum(int(c.max()) * size for size, c in counts.items())
    mean = sum(int(c.sum()) * size for size, c in counts.items()) / dp
    return sparse / dense, mean / dense


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_projection_matches_an_element_count(seed):
    buckets, rules = random_record(seed)
    keep_probs, steps = [0.5, 0.1], 4
    results = projection.project(buckets, rules, keep_probs, DPS, steps)
    assert [(p.keep_prob, p.dp) for p in results] == [(k, dp) for k in keep_probs for dp in DPS]
    for p in results:
        expected = [brute_force_fractions(buckets, rules, p.keep_prob, p.dp, step) for step in range(1, steps + 1)]
        assert p.fractions == pytest.approx([e[0] for e in expected], rel=1e-12), (p.keep_prob, p.dp)
        assert p.unpadded == pytest.approx([e[1] for e in expected], rel=1e-12), (p.keep_prob, p.dp)
        assert p.min <= p.mean <= p.max
        assert all(u <= f for u, f in zip(p.unpadded, p.fractions))


def gapless_record():
    """Two buckets of 24 elements (divisible by every DP size here), filled by their tensors:
    one bf16 bucket with a masked and a dense tensor, one fp32 bucket with a masked tensor."""
    masked = MaskRule(seed=99, keep_prob=0.5, masked=True)
    dense = MaskRule(seed=0, keep_prob=1.0, masked=False)
    bf16 = Bucket(torch.zeros(24, dtype=torch.bfloat16),
                  [BucketTensor(0, 0, BlockLayout(16, 4), 0), BucketTensor(16, 1, BlockLayout(8, 8), 1)])
    fp32 = Bucket(torch.zeros(24, dtype=torch.float32), [BucketTensor(0, 2, BlockLayout(24, 6), 0)])
    return round_trip([bf16, fp32], {0: masked, 1: dense})


def test_keeping_every_block_moves_everything_and_pads_nothing():
    buckets, rules = gapless_record()
    for p in projection.project(buckets, rules, [1.0], DPS, 5):
        assert p.fractions == [1.0] * 5 and p.unpadded == [1.0] * 5, p.dp


def test_keeping_no_block_moves_only_the_dense_tensors():
    buckets, rules = gapless_record()
    # the dense tensor: 8 bf16 elements, of 24 * 2 + 24 * 4 bytes in all
    share = 8 * 2 / (24 * 2 + 24 * 4)
    for p in projection.project(buckets, rules, [0.0], DPS, 3):
        assert p.unpadded == pytest.approx([share] * 3), p.dp
        # its 8 elements sit in the bucket's last third: the ranks holding them set the width
        width = min(8, 24 // p.dp)
        assert p.fractions == pytest.approx([width * 2 / (24 * 2 + 24 * 4) * p.dp] * 3), p.dp
    # and on the random records, the dense rule's elements over the padded bytes
    buckets, rules = random_record(3)
    for p in projection.project(buckets, rules, [0.0], DPS, 2):
        dense_bytes = sum(t.layout.numel * size for _, size, tensors in buckets for t in tensors
                          if not rules[t.rule].masked)
        padded_bytes = sum(-(-numel // p.dp) * p.dp * size for numel, size, _ in buckets)
        assert p.unpadded == pytest.approx([dense_bytes / padded_bytes] * 2), p.dp
        if p.dp == 1:
            assert p.fractions == pytest.approx(p.unpadded)


def test_the_per_rank_counts_match_shard_ranges():
    for seed in range(3):
        buckets, rules = random_record(seed)
        assert projection.self_check(buckets, rules, [0.0, 0.3, 1.0], [1, 2, 3, 8, 13, 64], 3) == 3 * 3 * 3 * 6


def test_the_script_end_to_end(tmp_path, capsys):
    buckets = [Bucket(torch.zeros(40, dtype=torch.bfloat16), [BucketTensor(0, 0, BlockLayout(36, 6), 0)])]
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(layout_record(buckets, {0: MaskRule(5, 0.5, True)})))
    out = tmp_path / "projection.md"
    assert projection.main([str(path), "--dps", "2", "3", "--steps", "3", "--out", str(out), "--self-check"]) == 0
    table = out.read_text()
    assert str(path) in table and "36 elements in 1 tensors" in table
    assert len([line for line in table.splitlines() if line.startswith("| 0.")]) == 4
    assert table.strip() in capsys.readouterr().out


@pytest.mark.parametrize("seed", [0, 1])
def test_in_place_transfers_match_the_gathers_own_count(seed):
    """The projection's in-place transfer count equals direct_ops over the shard ranges the
    gather itself would build, per element size, at every DP size."""
    from collections import defaultdict

    from magma_ext.megatron.changed_ranges import changed_ranges, shard_ranges
    from magma_ext.megatron.in_place_exchange import direct_ops

    buckets, rules = random_record(seed)
    for dp in DPS + [13]:
        for step in (1, 2, 3):
            ranges = [changed_ranges(tensors, rules, step) for _, _, tensors in buckets]
            members = defaultdict(list)
            for (numel, size, _), r in zip(buckets, ranges):
                members[size].append(shard_ranges(r, padded_numel(numel, dp), dp))
            expected = max(direct_ops(layout) for layout in members.values())
            assert projection.StepCounts.of(buckets, ranges, dp).most_transfers() == expected, (dp, step)


def test_a_record_round_trips_and_comes_from_the_optimizer_part_with_a_sparse_gather():
    """layout_record then buckets_of_record gives back every bucket's size, element size and
    tensors and the rules; record_of_optimizer reads the part of a Megatron optimizer that has a
    sparse gather (its buckets, its current rules), None where no part has one."""
    from types import SimpleNamespace

    from sparse_gather_record import record_of_optimizer

    rules = {0: MaskRule(5, 0.5, True), 1: MaskRule(0, 1.0, False)}
    sliced = BlockLayout(numel=12, block_size=4, offset=6, logical_numel=30, sliced=True)
    buckets = [Bucket(torch.zeros(40, dtype=torch.bfloat16), [BucketTensor(0, 3, BlockLayout(36, 6), 0)]),
               Bucket(torch.zeros(16, dtype=torch.float32), [BucketTensor(2, 7, sliced, 1)])]
    read, read_rules = round_trip(buckets, rules)
    assert read_rules == rules
    assert read == [(40, 2, buckets[0].tensors), (16, 4, buckets[1].tensors)]
    dense = SimpleNamespace(sparse_gather=None)
    sparse = SimpleNamespace(sparse_gather=SimpleNamespace(buckets=buckets), mask_rules=lambda: rules)
    assert record_of_optimizer(SimpleNamespace(chained_optimizers=[dense, sparse])) == layout_record(buckets, rules)
    assert record_of_optimizer(SimpleNamespace(chained_optimizers=[dense])) is None
