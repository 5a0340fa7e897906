"""Megatron's DDP buckets as plain data, for the sparse parameter sync.

Megatron's ``DistributedDataParallel`` keeps a model chunk's parameters in flat ``param_data``
buffers, one per bucket, and groups the buckets into bucket groups (the units its parameter
all-gather launches). :func:`buckets_of_chunks` reads them into :class:`Bucket` objects: each
parameter's element range in its bucket and its blocks as Magma numbers them.
:func:`bucket_group_parts` gives the bucket groups with the positions of their buckets.

No megatron-core import: these functions read attributes of megatron-core 0.19's bucket groups
and buckets, so CPU tests drive them with stand-ins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import BlockLayout
from ..pieces import Piece
from .layout import piece_arguments

__all__ = ["BucketTensor", "Bucket", "buckets_of_chunks", "bucket_group_parts"]


@dataclass(frozen=True)
class BucketTensor:
    """A parameter in a bucket: elements ``[start, start + layout.numel)`` of its ``param_data``.

    ``layout`` gives the blocks of the (TP-local) tensor, numbered as Magma numbers them;
    ``rule`` is the key of its mask rule (its parameter group) in the rules passed per step.
    """

    start: int
    index: int
    layout: BlockLayout
    rule: int


@dataclass
class Bucket:
    """One bucket of a data-parallel group: its flat parameter buffer (``numel`` divisible by the
    group's size, rank r holding elements ``[r * numel / size, (r + 1) * numel / size)``)."""

    param_data: torch.Tensor
    tensors: list[BucketTensor]


def buckets_of_chunks(model_chunks, indices: dict, slices: dict, group_of: dict, blocks: list,
                      attribute: str = "bucket_groups"):
    """The :class:`Bucket` of every bucket of Megatron's DDP ``model_chunks`` (their
    ``attribute``: ``bucket_groups`` for the dense parameters, ``expert_parallel_bucket_groups``
    for the experts'), and the process group that gathers them (None without buckets).

    ``indices``, ``slices`` and ``group_of`` map each model parameter to its tensor index, its
    :class:`~magma_ext.megatron.layout.TensorParallelSlice` and its parameter group's position;
    ``blocks`` gives each group's ``block`` option. Reads ``bucket_groups``, their
    ``intra_distributed_optimizer_instance_group`` and ``buckets``, and each bucket's
    ``param_data``, ``params_list`` and ``param_to_index`` (megatron-core 0.19).

    Raises ValueError for a bucket whose buffer is not floating point (FP8 and other quantized
    parameters: Megatron post-processes those after its own gather, which this one replaces).
    """
    buckets, groups = [], []
    for chunk in model_chunks:
        for bucket_group in getattr(chunk, attribute):
            groups.append(bucket_group.intra_distributed_optimizer_instance_group)
            for bucket in bucket_group.buckets:
                if bucket.param_data is None or not bucket.param_data.is_floating_point():
                    found = "no buffer" if bucket.param_data is None else f"a {bucket.param_data.dtype} buffer"
                    raise ValueError(f"sparse_param_gather: a bucket with {found} (FP8 or other quantized "
                                     "parameters) is not supported: Megatron post-processes those after its "
                                     "own gather")
                tensors = []
                for param in bucket.params_list:
                    whole = piece_arguments(indices[param], tuple(param.shape), 0, param.numel(), slices[param],
                                            split_group=None, replica_group=None)
                    block = blocks[group_of[param]]
                    tensors.append(BucketTensor(start=bucket.param_to_index[param][0], index=indices[param],
                                                layout=Piece(**whole, numel=param.numel()).blocks(block),
                                                rule=group_of[param]))
                buckets.append(Bucket(bucket.param_data, tensors))
    if any(g is not groups[0] for g in groups):
        raise ValueError("sparse_param_gather: the buckets are gathered over several process groups")
    return buckets, (groups[0] if groups else None)


def bucket_group_parts(model_chunks, attribute: str = "bucket_groups") -> tuple[list, list[list[int]]]:
    """Megatron's bucket groups (``attribute``, as for :func:`buckets_of_chunks`) of
    ``model_chunks`` and, per group, the positions of its buckets in what
    :func:`buckets_of_chunks` returns (the ``SparseGather`` parts)."""
    groups, parts, count = [], [], 0
    for chunk in model_chunks:
        for bucket_group in getattr(chunk, attribute):
            groups.append(bucket_group)
            parts.append(list(range(count, count + len(bucket_group.buckets))))
            count += len(bucket_group.buckets)
    return groups, parts
