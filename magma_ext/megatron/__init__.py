"""Magma inside Megatron-core's optimizer stack (needs megatron-core >= 0.17; tested with 0.19.2).

    from magma_ext.megatron import get_megatron_magma_optimizer
    optimizer = get_megatron_magma_optimizer(optimizer_config, [model], keep_prob=0.5)

``layout`` and ``scores`` import without megatron-core; the builder (``optimizer``) is imported
on first use of its names.
"""

from .layout import TensorParallelSlice, is_paper_masked, logical_shape, piece_arguments, stable_name

_BUILDER_NAMES = ("get_megatron_magma_optimizer", "magma_optimizers", "param_sync_bytes", "MagmaDistributedOptimizer",
                  "MagmaFloat16Optimizer", "MagmaFP32Optimizer")

__all__ = ["TensorParallelSlice", "is_paper_masked", "logical_shape", "piece_arguments", "stable_name",
           *_BUILDER_NAMES]


def __getattr__(name: str):
    if name in _BUILDER_NAMES:
        from . import optimizer

        return getattr(optimizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
