"""Megatron-core's optimizer stack with Magma as the inner optimizer.

:func:`get_megatron_magma_optimizer` builds what ``megatron.core.optimizer.get_megatron_optimizer``
builds for ``optimizer="adam"`` (the same parameter groups, grad scaler, wrapper class and
``ChainedOptimizer``), with a :class:`magma_ext.Magma` inside, and declares every tensor that
wrapper hands Magma as a piece of its logical tensor (``magma_ext.megatron.layout``), so that
masks and scores are those of one process on every TP/DP layout.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import (
    ChainedOptimizer,
    DistributedOptimizer,
    FP32Optimizer,
    Float16OptimizerWithFloat16Params,
    OptimizerConfig,
    _get_param_groups_and_buffers,
    get_standard_config_overrides,
)
from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron.core.process_groups_config import ProcessGroupCollection

from ..optimizer import Magma
from ..pieces import declare_piece
from .layout import TensorParallelSlice, is_paper_masked, piece_arguments, stable_name
from .overlapped_sync import BucketGroupSync
from .scores import CarriesMagmaScores, ShardStateFilter
from .buckets import bucket_group_parts, buckets_of_chunks
from .changed_ranges import MaskRule
from .sparse_gather import SparseGather, refuse_unsupported_sparse_gather
from .sync_bytes import SyncBytes

__all__ = ["get_megatron_magma_optimizer", "magma_optimizers", "param_sync_bytes"]

MAGMA_GROUP = "magma"  # the "optimizer" key of masked groups, which keeps them apart from dense ones


def get_megatron_magma_optimizer(
    config: OptimizerConfig,
    model_chunks: list,
    *,
    config_overrides=None,
    pg_collection=None,
    use_gloo_process_groups: bool = True,
    masked=None,
    sparse_param_gather: bool = False,
    **magma_options,
) -> ChainedOptimizer:
    """Megatron-core's optimizer for ``model_chunks`` with Magma inside.

    Args:
        config: Megatron's ``OptimizerConfig``. Magma takes ``lr``, ``weight_decay``,
            ``adam_beta1``/``adam_beta2`` and ``adam_eps`` from it; ``fp16``/``bf16``,
            ``use_distributed_optimizer``, ``clip_grad`` and the loss-scale settings choose and
            configure the wrapper, as ``get_megatron_optimizer`` does. ``config.optimizer`` is
            not read.
        model_chunks: the model, wrapped in Megatron's ``DistributedDataParallel`` (one chunk:
            pipeline parallelism is refused).
        config_overrides, pg_collection, use_gloo_process_groups: as for
            ``get_megatron_optimizer`` (default overrides: no weight decay for biases and 1-D
            parameters).
        masked: ``masked(name, param) -> bool`` chooses the masked parameters (name without
            ``module.`` prefixes); default: the attention and MLP weights, as the paper does.
            The others run the dense base optimizer (``"magma": False``).
        sparse_param_gather: with the distributed optimizer, make its parameter all-gather
            after each step move only the elements that changed (the kept blocks of masked
            tensors and all of the others; ``magma_ext.megatron.sparse_gather``); under
            ``overlap_param_gather``, each bucket group's gather launched from the forward
            pre-hooks (``magma_ext.megatron.overlapped_sync``). Bytes moved:
            :func:`param_sync_bytes`.
        **magma_options: Magma's own keywords (``keep_prob``, ``block``, ``seed``, ``tau``,
            ``score_ema``, ``base``, ``mask``, ``fused``).

    Returns:
        a ``ChainedOptimizer`` of one ``DistributedOptimizer``,
        ``Float16OptimizerWithFloat16Params`` or ``FP32Optimizer`` (subclasses that carry Magma's
        scores in checkpoints: see ``magma_ext.megatron.scores``).

    Raises:
        ValueError: a configuration this integration does not support (pipeline or expert
            parallelism, Megatron-FSDP, several distributed-optimizer instances, the
            precision-aware optimizer, CPU offloading, coupled weight decay,
            ``overlap_param_gather_with_optimizer_step``), ``block=N`` with a masked
            row-parallel weight under tensor parallelism, ``sparse_param_gather`` without the
            distributed optimizer, with ``reuse_grad_buf_for_mxfp8_param_ag`` or with FP8
            (quantized) parameter buffers, or a bad Magma option.
    """
    _refuse_unsupported(config, model_chunks, magma_options)
    refuse_unsupported_sparse_gather(sparse_param_gather, config.use_distributed_optimizer,
                                     getattr(model_chunks[0], "ddp_config", None))
    if config_overrides is None:
        config_overrides = get_standard_config_overrides(config)
    groups = ProcessGroupCollection.setup_process_groups_for_optimizer(
        pg_collection, model_chunks, use_gloo_process_groups)
    param_groups, buffers = _get_param_groups_and_buffers(
        model_chunks, model_chunk_offset=0, config=config, config_overrides=config_overrides,
        filter_fn=lambda g: True, buffer_name="buffers")
    if any(group["is_expert_parallel"] and group["params"] for group in param_groups):
        raise ValueError("model_chunks: expert-parallel (MoE) parameters are not supported yet")
    names = {p: stable_name(name) for name, p in model_chunks[0].named_parameters()}
    indices = {p: i for i, p in enumerate(names)}
    is_masked = masked or (lambda name, p: is_paper_masked(name, p.dim()))
    tp_group, tp_dp_group = _tensor_parallel_groups(pg_collection)
    tp_size = torch.distributed.get_world_size(tp_group)
    magma_groups = _split_groups(param_groups, names, is_masked, config)
    if not config.use_distributed_optimizer:
        # every rank holds every parameter, so dropping empty groups keeps them alike on all
        # ranks, and Megatron's Float16 checkpoints cannot merge an empty group's list
        magma_groups = [group for group in magma_groups if group["params"]]
    _refuse_split_n_blocks(magma_groups, names, tp_size, magma_options)

    dp_group = groups["intra_dp_cp_group"]
    if config.use_distributed_optimizer:
        split_group, replica_group = (tp_dp_group if tp_size > 1 else dp_group), dp_group
    else:
        split_group, replica_group = tp_group, None
    exchange = [g for g in dict.fromkeys((split_group, replica_group)) if g is not None]
    if not config.use_distributed_optimizer and tp_size == 1:
        exchange = []
    inner = Magma(
        magma_groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
        weight_decay=config.weight_decay, process_group=exchange or None, **magma_options,
    )
    wrapper = _wrap(inner, config, model_chunks, buffers, groups, tp_group)
    tp_rank = torch.distributed.get_rank(tp_group)
    slices = {p: TensorParallelSlice(_partition_dim(p), tp_rank, tp_size) for p in names}
    for model_param, tensor, start, stop in _held_tensors(wrapper):
        declare_piece(tensor, **piece_arguments(indices[model_param], tuple(model_param.shape), start, stop,
                                                slices[model_param], split_group=split_group,
                                                replica_group=replica_group))
    if sparse_param_gather:
        group_of = {p: i for i, group in enumerate(magma_groups) for p in group["params"]}
        wrapper.enable_sparse_param_gather(indices, slices, group_of)
    return ChainedOptimizer([wrapper])


def param_sync_bytes(optimizer) -> SyncBytes:
    """Bytes this rank sent and received in the last step's parameter all-gather, and what a
    dense gather moves, over the parts of a Megatron optimizer; zeros for parts without a sparse
    gather (host values: reading them does not synchronise). Under ``overlap_param_gather`` a
    step's gathers run in the next forward pass: the sum of each bucket group's latest gather."""
    total = SyncBytes()
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(part, MagmaDistributedOptimizer):
            total += part.param_sync_bytes
    return total


def magma_optimizers(optimizer) -> list[Magma]:
    """The Magma instances inside a Megatron optimizer (a ``ChainedOptimizer`` or one part)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [part.optimizer for part in parts if isinstance(part.optimizer, Magma)]


# ---------------------------------------------------------------------------- building


def _refuse_unsupported(config: OptimizerConfig, model_chunks: list, magma_options: dict) -> None:
    if not isinstance(config, OptimizerConfig):
        raise TypeError(f"config must be a megatron.core.optimizer.OptimizerConfig, got {type(config).__name__}")
    if not isinstance(model_chunks, (list, tuple)) or not model_chunks:
        raise TypeError("model_chunks must be a non-empty list of Megatron model chunks")
    if len(model_chunks) > 1 or parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("pipeline parallelism is not supported by magma_ext.megatron yet: run with "
                         "pipeline_model_parallel_size=1 and one model chunk")
    ddp_config = getattr(model_chunks[0], "ddp_config", None)
    refusals = {
        "use_megatron_fsdp": "Megatron-FSDP (use torch FSDP2 with magma_ext.Magma instead)",
        "num_distributed_optimizer_instances": "several distributed-optimizer instances",
    }
    if ddp_config is not None and getattr(ddp_config, "use_megatron_fsdp", False):
        raise ValueError(f"model_chunks: {refusals['use_megatron_fsdp']} is not supported")
    if ddp_config is not None and getattr(ddp_config, "num_distributed_optimizer_instances", 1) > 1:
        raise ValueError(f"model_chunks: {refusals['num_distributed_optimizer_instances']} are not supported")
    for flag, what in (("use_precision_aware_optimizer", "the precision-aware optimizer"),
                       ("optimizer_cpu_offload", "optimizer CPU offloading"),
                       ("overlap_param_gather_with_optimizer_step", "overlap_param_gather_with_optimizer_step"),
                       ("use_layer_wise_distributed_optimizer", "the layer-wise distributed optimizer")):
        if getattr(config, flag, False):
            raise ValueError(f"config.{flag}: {what} is not supported with Magma")
    if not getattr(config, "decoupled_weight_decay", True):
        raise ValueError("config.decoupled_weight_decay=False: Magma's weight decay is decoupled (AdamW-style)")
    for key in ("lr", "betas", "eps", "weight_decay", "process_group", "params"):
        if key in magma_options:
            raise TypeError(f"{key} comes from config (or the model), not from a keyword")


def _tensor_parallel_groups(pg_collection):
    if pg_collection is not None and hasattr(pg_collection, "tp"):
        return pg_collection.tp, pg_collection.tp_dp_cp
    return (parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True))


def _split_groups(param_groups: list[dict], names: dict, is_masked, config: OptimizerConfig) -> list[dict]:
    """Each Megatron group as a masked and a dense group, both kept when empty (every rank then
    has the same groups). The masked one has ``"optimizer": "magma"``, which Megatron's checkpoint
    loading uses, with the override keys, to tell groups apart."""
    split = []
    for group in param_groups:
        chosen = [p for p in group["params"] if is_masked(names[p], p)]
        dense = [p for p in group["params"] if not is_masked(names[p], p)]
        common = {**group, "weight_decay": config.weight_decay * group.get("wd_mult", 1.0)}
        split.append({**common, "params": chosen, "optimizer": MAGMA_GROUP})
        split.append({**common, "params": dense, "magma": False, "block": "tensor"})  # unmasked: one block
    return split


def _partition_dim(param) -> int | None:
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def _refuse_split_n_blocks(groups: list[dict], names: dict, tp_size: int, magma_options: dict) -> None:
    block = magma_options.get("block", "tensor")
    if tp_size == 1 or isinstance(block, str):
        return
    for group in groups:
        if group.get("optimizer") != MAGMA_GROUP:
            continue
        for p in group["params"]:
            if _partition_dim(p) == 1:
                raise ValueError(
                    f"block={block!r}: {names[p]} is a row-parallel weight split across "
                    f"{tp_size} tensor-parallel ranks, whose N-element blocks would cut across the "
                    "slices; use block='row' or 'tensor', or leave it unmasked (masked=...)"
                )


def _grad_scaler(config: OptimizerConfig):
    if config.loss_scale:
        return ConstantGradScaler(config.loss_scale)
    if config.fp16:
        return DynamicGradScaler(
            initial_scale=config.initial_loss_scale, min_scale=config.min_loss_scale, growth_factor=2.0,
            backoff_factor=0.5, growth_interval=config.loss_scale_window, hysteresis=config.hysteresis)
    return None


def _init_state(optimizer, config=None) -> None:
    """Megatron's ``init_state_fn``: Magma's full state for every tensor that has none."""
    optimizer.init_state()


def _wrap(inner: Magma, config: OptimizerConfig, model_chunks: list, buffers, groups: dict, tp_group):
    """The wrapper ``get_megatron_optimizer`` would put around its Adam, as its Magma subclass."""
    if config.fp16 or config.bf16 or config.use_distributed_optimizer:
        scaler = _grad_scaler(config)
        if config.use_distributed_optimizer:
            wrapper = MagmaDistributedOptimizer(
                inner, config, scaler, _init_state, model_chunks=model_chunks, per_model_buffers=buffers,
                data_parallel_group=groups["intra_dp_cp_group"],
                data_parallel_group_gloo=groups["intra_dp_cp_group_gloo"],
                data_parallel_group_idx=torch.distributed.get_rank(groups["mp_group"]),
                distributed_optimizer_instance_id=0,
            )
            wrapper.grad_stats_parallel_group = groups["intra_dist_opt_group"]
        else:
            wrapper = MagmaFloat16Optimizer(inner, config, scaler, _init_state)
            wrapper.grad_stats_parallel_group = groups["mp_group"]
    else:
        wrapper = MagmaFP32Optimizer(inner, config, _init_state)
        wrapper.grad_stats_parallel_group = groups["mp_group"]
    wrapper.tp_group = tp_group
    wrapper.expert_tp_group = tp_group
    return wrapper


def _held_tensors(wrapper):
    """(model parameter, the tensor Magma holds for it, start, stop): the element range of the
    flattened model parameter that tensor is."""
    if isinstance(wrapper, DistributedOptimizer):
        pairs = []
        for models16, shards16, models32, shards32 in zip(
                wrapper.model_float16_groups, wrapper.shard_fp32_from_float16_groups,
                wrapper.model_fp32_groups, wrapper.shard_fp32_groups):
            pairs += list(zip(models16, shards16)) + list(zip(models32, shards32))
        for model_param, shard in pairs:
            span = wrapper._get_model_param_range_map(model_param)["param"]
            yield model_param, shard, span.start, span.end
        return
    if isinstance(wrapper, Float16OptimizerWithFloat16Params):
        pairs = []
        for models16, mains, fp32 in zip(wrapper.float16_groups, wrapper.fp32_from_float16_groups,
                                         wrapper.fp32_from_fp32_groups):
            pairs += list(zip(models16, mains)) + [(p, p) for p in fp32]
    else:
        pairs = [(p, p) for group in wrapper.optimizer.param_groups for p in group["params"]]
    for model_param, tensor in pairs:
        yield model_param, tensor, 0, model_param.numel()


# ---------------------------------------------------------------------------- checkpoints


def _steps_taken(magma: Magma) -> int:
    """The step count of Magma's state (0 before the first step); one host read."""
    for state in magma.state.values():
        if "step" in state:
            return int(state["step"].item())
    return 0


class MagmaDistributedOptimizer(CarriesMagmaScores, ShardStateFilter, DistributedOptimizer):
    """Megatron's ``DistributedOptimizer`` around Magma; its per-shard state files hold
    ``exp_avg``/``exp_avg_sq`` (and the fp32 main parameters) only. With
    :meth:`enable_sparse_param_gather` its parameter all-gather moves only what changed."""

    sparse_gather: SparseGather | None = None
    bucket_group_syncs: list[BucketGroupSync] = []  # under overlap_param_gather, one per bucket group
    steps_taken: int = 0  # inner steps taken, known on the host (Megatron skips on the host)

    @property
    def param_sync_bytes(self) -> SyncBytes:
        """Bytes of the last parameter sync (see :func:`param_sync_bytes`)."""
        if self.bucket_group_syncs:
            total = SyncBytes()
            for sync in self.bucket_group_syncs:
                total += sync.last
            return total
        return getattr(self, "_last_sync", SyncBytes())

    def enable_sparse_param_gather(self, indices: dict, slices: dict, group_of: dict) -> None:
        """Gather only changed elements from now on. ``indices``, ``slices``, ``group_of``: each
        model parameter's tensor index, tensor-parallel slice and parameter group (every
        parameter of the model: a bucket holds parameters of which this rank has no shard)."""
        blocks = [group["block"] for group in self.optimizer.param_groups]
        buckets, group = buckets_of_chunks(self.model_chunks, indices, slices, group_of, blocks)
        group = group if group is not None else self.data_parallel_group
        overlapped = self.ddp_config.overlap_param_gather
        bucket_groups, parts = bucket_group_parts(self.model_chunks)
        self.sparse_gather = SparseGather(buckets, group, torch.distributed.get_rank(group),
                                          torch.distributed.get_world_size(group), parts if overlapped else None)
        self.steps_taken = _steps_taken(self.optimizer)
        self._step_rules = self.mask_rules()
        if overlapped:
            self.bucket_group_syncs = [
                BucketGroupSync(bucket_group, self.sparse_gather, part, lambda: self._step_rules,
                                lambda: self.steps_taken)
                for part, bucket_group in enumerate(bucket_groups)]
            for sync in self.bucket_group_syncs:
                sync.install()

    def mask_rules(self) -> dict[int, MaskRule]:
        """Each parameter group's mask rule, from its current options."""
        return {i: MaskRule.of_group(group) for i, group in enumerate(self.optimizer.param_groups)}

    def step_with_ready_grads(self) -> bool:
        self.steps_taken += 1  # called only for a step that runs (Megatron skips overflows before)
        self._step_rules = self.mask_rules()  # what the (possibly later) gathers of this step use
        return super().step_with_ready_grads()

    def start_param_sync_for_bucket_group_subset(self) -> None:
        if self.bucket_group_syncs:  # each bucket group's start_param_sync is already sparse
            super().start_param_sync_for_bucket_group_subset()
            return
        rules = self._step_rules if self.sparse_gather is not None else {}
        if not any(rule.masked for rule in rules.values()):  # nothing masked: Megatron's own gather
            super().start_param_sync_for_bucket_group_subset()
            if self.sparse_gather is not None:
                self._last_sync = self.sparse_gather.dense_bytes().moved_densely()
            return
        self._last_sync = self.sparse_gather.sync(rules, self.steps_taken)
        for chunk in self.model_chunks:
            for bucket_group in chunk.bucket_groups:
                bucket_group.param_gather_dispatched = True

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.steps_taken = _steps_taken(self.optimizer)
        for sync in self.bucket_group_syncs:
            sync.synced_step = None  # the next gather of each bucket group is a dense one


class MagmaFloat16Optimizer(CarriesMagmaScores, Float16OptimizerWithFloat16Params):
    """Megatron's ``Float16OptimizerWithFloat16Params`` around Magma."""


class MagmaFP32Optimizer(CarriesMagmaScores, FP32Optimizer):
    """Megatron's ``FP32Optimizer`` around Magma."""
