"""What each tensor Megatron-core hands its inner optimizer is, as a magma_ext piece.

Pure functions of names, shapes and ranges (no megatron-core import), so CI checks them on CPU.

**Tensor indices.** A parameter's tensor index is the index of its global name
(:func:`magma_ext.name_index` of its name in the model with pipeline and expert parallelism 1,
``magma_ext.megatron.global_names``): tensor and data parallelism change shapes, not names, and
pipeline and expert parallelism change names that ``global_names`` maps back, so every rank of
every layout of one model numbers its parameters alike, as a single-process
``Magma(model.named_parameters())`` would.

**Tensor parallelism.** Megatron cuts a weight of logical shape ``S`` along ``partition_dim``
into ``tp_size`` equal slices, TP rank ``t`` holding slice ``t``:

- ``partition_dim=0`` (column-parallel ``linear_qkv``, ``linear_fc1``, vocabulary-parallel
  embeddings and output layer, and their biases): the slice is the contiguous range
  ``[t * local_numel, (t + 1) * local_numel)`` of the flattened logical tensor.
- ``partition_dim=1`` (row-parallel ``linear_proj``, ``linear_fc2`` weights): every row runs
  through every slice, so the slice is a column slice (:class:`magma_ext.Piece`'s ``split``):
  rows and whole-tensor blocks are the logical tensor's, their sums added over TP.
- no ``tensor_model_parallel`` attribute (norms, position embeddings, row-parallel biases): the
  tensor is replicated across TP; each TP rank's copy is its own logical tensor's pieces,
  exchanged over the data-parallel group only (all TP ranks compute the same).

**Data parallelism** (Megatron's distributed optimizer) then hands each rank elements
``[start, stop)`` of the flattened TP-local tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["TensorParallelSlice", "logical_shape", "piece_arguments", "stable_name", "is_paper_masked"]


@dataclass(frozen=True)
class TensorParallelSlice:
    """How a TP-local tensor sits in its logical tensor.

    Attributes:
        partition_dim: the dimension Megatron cut (``param.partition_dim``), or None for a tensor
            replicated across tensor-parallel ranks.
        rank: this rank's position in its tensor-parallel group.
        size: the tensor-parallel group's size.
    """

    partition_dim: int | None
    rank: int
    size: int

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} of {self.size} is out of range")

    @property
    def is_split(self) -> bool:
        return self.partition_dim is not None and self.size > 1


def logical_shape(local_shape: tuple[int, ...], tp: TensorParallelSlice) -> tuple[int, ...]:
    """The shape of the logical tensor a TP-local tensor of ``local_shape`` is a slice of."""
    shape = tuple(local_shape)
    if not tp.is_split:
        return shape
    if tp.partition_dim not in (0, 1) or tp.partition_dim >= len(shape):
        raise ValueError(
            f"a tensor of shape {shape} cut along dimension {tp.partition_dim}: Magma takes "
            "tensor-parallel tensors cut along dimension 0 (column-parallel) or 1 (row-parallel)"
        )
    sizes = list(shape)
    sizes[tp.partition_dim] *= tp.size
    return tuple(sizes)


def piece_arguments(index: int, local_shape: tuple[int, ...], start: int, stop: int,
                    tp: TensorParallelSlice, *, split_group, replica_group) -> dict:
    """Keyword arguments of :func:`magma_ext.declare_piece` for elements ``[start, stop)`` of a
    TP-local tensor of ``local_shape`` (the range a distributed optimizer hands a rank; the whole
    tensor without one).

    ``split_group`` holds every piece of a TP-split tensor (the tensor-and-data-parallel group
    with a distributed optimizer, the tensor-parallel group without); ``replica_group`` holds the
    pieces of a TP-replicated tensor (the data-parallel group, or None without a distributed
    optimizer: the tensor is then whole).
    """
    local_numel = 1
    for size in local_shape:
        local_numel *= size
    if not 0 <= start <= stop <= local_numel:
        raise ValueError(f"range [{start}, {stop}) is outside a tensor of {local_numel} elements")
    shape = logical_shape(local_shape, tp)
    if not tp.is_split:
        whole = start == 0 and stop == local_numel
        group = None if whole and replica_group is None else replica_group
        if group is None and not whole:
            raise ValueError(f"range [{start}, {stop}) of {local_numel} elements needs a replica_group")
        return dict(index=index, offset=start, shape=shape, group=group)
    if tp.partition_dim == 0:
        return dict(index=index, offset=tp.rank * local_numel + start, shape=shape, group=split_group)
    return dict(index=index, offset=start, shape=shape, group=split_group, split=(tp.rank, tp.size))


_MODULE_PREFIX = re.compile(r"^(module\.)+")


def stable_name(name: str) -> str:
    """A parameter name without the ``module.`` prefixes of Megatron's DDP and Float16Module."""
    return _MODULE_PREFIX.sub("", name)


_MASKED_PARENTS = (".self_attention.", ".cross_attention.", ".mlp.")


def is_paper_masked(name: str, ndim: int) -> bool:
    """The paper's choice: the attention and MLP weights (matrices under a layer's
    ``self_attention``, ``cross_attention`` or ``mlp``, a MoE router's excepted); not embeddings,
    the output layer, norms or biases."""
    name = "." + stable_name(name)
    return ndim >= 2 and ".router." not in name and any(parent in name for parent in _MASKED_PARENTS)
