"""Magma inside Megatron-core's optimizer stack (needs megatron-core >= 0.19; tested with 0.19.2).

    from magma_ext.megatron import get_megatron_magma_optimizer
    optimizer = get_megatron_magma_optimizer(optimizer_config, model_chunks, keep_prob=0.5)

``layout``, ``global_names``, ``allow_list``, ``internals``, ``scores`` and ``training`` import
without megatron-core; the builder (``optimizer``) is imported on first use of its names.
Megatron-LM's own loop: ``python -m magma_ext.megatron.training`` (``magma_ext.megatron.training``).
"""

from .global_names import global_parameter_names
from .layout import TensorParallelSlice, is_paper_masked, logical_shape, piece_arguments, stable_name

_BUILDER_NAMES = ("get_megatron_magma_optimizer", "magma_optimizers", "param_sync_bytes", "MagmaDistributedOptimizer",
                  "MagmaFloat16Optimizer", "MagmaFP32Optimizer")

__all__ = ["TensorParallelSlice", "is_paper_masked", "logical_shape", "piece_arguments", "stable_name",
           "global_parameter_names", *_BUILDER_NAMES]


def __getattr__(name: str):
    if name in _BUILDER_NAMES:
        from . import optimizer

        return getattr(optimizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
