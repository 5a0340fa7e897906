"""Bucket layout records: the sparse parameter sync's buckets and mask rules as JSON, to replay.

A record holds every bucket's size and element size, its tensors' positions and block layouts,
and their mask rules: what ``magma_ext.megatron``'s sparse gather computes its layouts from.
``benchmarks/megatron_bench.py --layout-json`` writes one from a real run
(:func:`record_of_optimizer`); ``benchmarks/sparse_gather_bench.py`` replays it on GPUs and
``benchmarks/sparse_gather_projection.py`` projects it to other data-parallel sizes, both
through :func:`buckets_of_record`. No GPU and no megatron-core needed.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

try:
    import magma_ext  # noqa: F401
except ImportError:  # a checkout that is not installed: use the package next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magma_ext.layout import BlockLayout
from magma_ext.megatron.buckets import Bucket, BucketTensor
from magma_ext.megatron.changed_ranges import MaskRule

# A bucket as buckets_of_record gives it: (numel, element size, tensors).
RecordBucket = tuple[int, int, list[BucketTensor]]


def layout_record(buckets: list[Bucket], rules: dict) -> dict:
    """The buckets' layouts and mask rules (``{key: MaskRule}``) as plain JSON-able data."""
    return {
        "rules": {str(key): vars(rule).copy() for key, rule in rules.items()},
        "buckets": [
            {
                "numel": bucket.param_data.numel(),
                "element_size": bucket.param_data.element_size(),
                "tensors": [dict(start=t.start, index=t.index, rule=t.rule, numel=t.layout.numel,
                                 block_size=t.layout.block_size, offset=t.layout.offset,
                                 logical_numel=t.layout.logical_numel, sliced=t.layout.sliced)
                            for t in bucket.tensors],
            }
            for bucket in buckets
        ],
    }


def record_of_optimizer(optimizer) -> dict | None:
    """The record of a Megatron optimizer built by ``get_megatron_magma_optimizer(...,
    sparse_param_gather=True)``: its sparse gather's buckets and its parameter groups' current
    mask rules; None for an optimizer without a sparse gather (host data: no collective)."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        gather = getattr(part, "sparse_gather", None)
        if gather is not None:
            return layout_record(gather.buckets, part.mask_rules())
    return None


def buckets_of_record(record: dict) -> tuple[list[RecordBucket], dict]:
    """``([(numel, element size, tensors) per bucket], rules)`` from :func:`layout_record`."""
    rules = {int(key): MaskRule(**value) for key, value in record["rules"].items()}
    buckets = []
    for bucket in record["buckets"]:
        tensors = [BucketTensor(start=t["start"], index=t["index"], rule=t["rule"],
                                layout=BlockLayout(t["numel"], t["block_size"], t["offset"], t["logical_numel"],
                                                   t["sliced"]))
                   for t in bucket["tensors"]]
        buckets.append((bucket["numel"], bucket["element_size"], tensors))
    return buckets, rules


def padded_numel(numel: int, dp: int) -> int:
    """A bucket's size padded to a multiple of ``dp``, as Megatron pads it."""
    return -(-numel // dp) * dp


def with_keep_prob(rules: dict, keep_prob: float) -> dict:
    """``rules`` with every masked rule's keep_prob replaced (unmasked rules stay unmasked)."""
    return {key: MaskRule(rule.seed, keep_prob, True) if rule.masked else rule for key, rule in rules.items()}


def synthetic_record(seed: int = 0) -> dict:
    """A small record: buckets of two element sizes, tensors with gaps between them, pieces not
    starting on a block boundary, a dense tensor, bucket sizes that few DP sizes divide."""
    rng = random.Random(seed)
    rules = {0: MaskRule(seed=rng.randrange(2**64), keep_prob=0.5, masked=True),
             1: MaskRule(seed=rng.randrange(2**64), keep_prob=0.5, masked=True),
             2: MaskRule(seed=0, keep_prob=1.0, masked=False)}
    buckets, index = [], 0
    for dtype in (torch.bfloat16, torch.float32, torch.bfloat16):
        tensors, position = [], rng.randint(0, 3)
        for _ in range(rng.randint(2, 6)):
            numel = rng.choice([1, 5, 17, 40, 96, 300])
            offset = rng.randint(0, 20)
            layout = BlockLayout(numel=numel, block_size=rng.choice([1, 3, 8, 16, 64, 500]), offset=offset,
                                 logical_numel=offset + numel + rng.randint(0, 9))
            tensors.append(BucketTensor(start=position, index=index, layout=layout, rule=rng.randint(0, 2)))
            index += 1
            position += numel + rng.choice([0, 0, 3])
        buckets.append(Bucket(torch.empty(position + rng.randint(0, 7), dtype=dtype), tensors))
    return layout_record(buckets, rules)
