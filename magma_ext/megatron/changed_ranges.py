"""Which elements of a bucket change at a step, given the mask rules (the sparse sync's layout).

A block Magma masked at a step did not change, and every rank knows which blocks those are
without being told: a mask is a function of (seed, tensor index, block, step)
(``magma_ext.philox``). So every rank computes the same changed element ranges of every bucket:
the kept blocks of masked tensors, and all of every tensor that is not masked. The draws run on
the host (``magma_ext.philox.keep_mask_numpy``), from the host's step count: no device work and
no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..philox import keep_mask_numpy
from .buckets import BucketTensor

__all__ = ["MaskRule", "BlockTable", "changed_ranges", "shard_ranges"]


@dataclass(frozen=True)
class MaskRule:
    """How a tensor's blocks are drawn this step (from its Magma parameter group)."""

    seed: int
    keep_prob: float
    masked: bool  # False: the whole tensor changes every step

    @classmethod
    def of_group(cls, group: dict) -> MaskRule:
        masked = group["magma"] and group["mask"] in ("magma", "skip") and group["keep_prob"] < 1
        return cls(int(group["seed"]), float(group["keep_prob"]), bool(masked))


@dataclass(frozen=True)
class BlockTable:
    """Every block of a bucket's tensors as flat numpy arrays, built once: a step's changed ranges
    then take one Philox draw per mask rule for the whole bucket.

    Rows are in bucket order (tensors by start, blocks in order); ``whole`` marks the one row a
    tensor gets when its rule is not masked (its blocks' rows then do not count).
    """

    starts: np.ndarray
    lengths: np.ndarray
    tensor_index: np.ndarray
    block_index: np.ndarray
    rule: np.ndarray
    whole: np.ndarray  # bool
    rule_keys: frozenset

    @classmethod
    def of(cls, tensors: list[BucketTensor]) -> BlockTable:
        columns = [[], [], [], [], [], []]
        for t in sorted(tensors, key=lambda t: t.start):
            if t.layout.numel == 0:
                continue
            lengths = t.layout.lengths()
            starts = [t.start]
            for length in lengths[:-1]:
                starts.append(starts[-1] + length)
            rows = len(lengths) + 1
            columns[0] += [t.start] + starts
            columns[1] += [t.layout.numel] + lengths
            columns[2] += [t.index] * rows
            columns[3] += [0] + list(range(t.layout.first_block, t.layout.first_block + len(lengths)))
            columns[4] += [t.rule] * rows
            columns[5] += [True] + [False] * len(lengths)
        as_int = [np.array(column, dtype=np.int64) for column in columns[:5]]
        return cls(*as_int, np.array(columns[5], dtype=bool), frozenset(columns[4]))

    def changed(self, rules: dict, step: int) -> torch.Tensor:
        """``(k, 2)`` changed element ranges at ``step``, sorted and merged."""
        if not self.rule_keys <= rules.keys():
            raise KeyError(f"no mask rule for the tensors of rules {sorted(self.rule_keys - rules.keys())}")
        take = np.zeros(len(self.starts), dtype=bool)
        for key, rule in rules.items():
            rows = self.rule == key
            if not rule.masked:
                take |= rows & self.whole
                continue
            rows &= ~self.whole
            if rows.any():
                take[rows] = keep_mask_numpy(rule.seed, self.tensor_index[rows], self.block_index[rows], step,
                                             rule.keep_prob)
        starts = self.starts[take]
        return _merge(torch.from_numpy(np.stack([starts, starts + self.lengths[take]], axis=1)))


def changed_ranges(tensors: list[BucketTensor], rules: dict, step: int) -> torch.Tensor:
    """``(k, 2)`` int64 ``[start, stop)`` element ranges of a bucket that change at ``step``
    (sorted, adjacent ranges merged): every element of a tensor whose rule is not masked, the
    kept blocks' elements of the others. Elements outside every tensor (padding) never change."""
    return BlockTable.of(tensors).changed(rules, step)


def _merge(ranges: torch.Tensor) -> torch.Tensor:
    """Merge sorted ranges that touch or overlap."""
    if len(ranges) <= 1:
        return ranges
    r = ranges.numpy()
    running_end = np.maximum.accumulate(r[:, 1])
    new = np.ones(len(r), dtype=bool)
    new[1:] = r[1:, 0] > running_end[:-1]
    firsts = np.flatnonzero(new)
    ends = np.maximum.reduceat(r[:, 1], firsts)
    return torch.from_numpy(np.stack([r[firsts, 0], ends], axis=1))


def shard_ranges(ranges: torch.Tensor, numel: int, size: int) -> list[torch.Tensor]:
    """``ranges`` (sorted and disjoint, as :func:`changed_ranges` gives them) of a bucket of
    ``numel`` elements cut at the shard boundaries of ``size`` ranks: per rank, ``(k_r, 2)``
    ranges in that rank's shard coordinates."""
    shard = numel // size
    r = ranges.numpy()
    out = []
    for rank in range(size):
        lo, hi = rank * shard, (rank + 1) * shard
        # ranges are sorted and disjoint: the ones that overlap [lo, hi) are one run of them
        first, last = np.searchsorted(r[:, 1], lo, side="right"), np.searchsorted(r[:, 0], hi, side="left")
        clipped = np.clip(r[first:last], lo, hi) - lo
        out.append(torch.from_numpy(np.ascontiguousarray(clipped[clipped[:, 1] > clipped[:, 0]])))
    return out
