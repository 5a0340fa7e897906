"""Megatron-core's optimizer stack with Magma as the inner optimizer.

:func:`get_megatron_magma_optimizer` builds what ``megatron.core.optimizer.get_megatron_optimizer``
builds for ``optimizer="adam"`` (the same parameter groups, grad scaler, wrapper classes and
``ChainedOptimizer``: one part for the dense parameters and, with MoE, one for the expert
parameters over the expert data-parallel group), with a :class:`magma_ext.Magma` inside each
part, and declares every tensor a wrapper hands Magma as a piece of its logical tensor
(``magma_ext.megatron.layout``) under the identity of its global name
(``magma_ext.megatron.global_names``), so that masks and scores are those of one process on every
TP/DP/PP/EP layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import (
    ChainedOptimizer,
    DistributedOptimizer,
    FP32Optimizer,
    Float16OptimizerWithFloat16Params,
    OptimizerConfig,
    _get_megatron_optimizer_based_on_param_groups,
    _get_param_groups_and_buffers,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron.core.process_groups_config import ProcessGroupCollection

from ..names import name_index
from ..optimizer import Magma
from ..pieces import declare_piece
from ..state import MOMENT_DTYPE_OPTIONS
from . import internals
from .allow_list import DDP_CONFIG, OPTIMIZER_CONFIG, check_config
from .global_names import global_parameter_names
from .layout import TensorParallelSlice, is_paper_masked, piece_arguments
from .overlapped_sync import BucketGroupSync
from .scores import POSITIONS_UNKNOWN, CarriesMagmaScores, ShardStateFilter
from .buckets import bucket_group_parts, buckets_of_chunks
from .changed_ranges import MaskRule
from .sparse_gather import SparseGather, refuse_unsupported_sparse_gather
from .sync_bytes import SyncBytes

__all__ = ["get_megatron_magma_optimizer", "magma_optimizers", "param_sync_bytes"]

MAGMA_GROUP = "magma"  # the "optimizer" key of masked groups, which keeps them apart from dense ones
DENSE, EXPERT = "dense", "expert"  # the parts of the ChainedOptimizer


def get_megatron_magma_optimizer(
    config: OptimizerConfig,
    model_chunks: list,
    config_overrides=None,
    use_gloo_process_groups: bool = True,
    pg_collection=None,
    dump_param_to_param_group_map: str | None = None,
    *,
    masked=None,
    sparse_param_gather: bool = False,
    **magma_options,
) -> ChainedOptimizer:
    """Megatron-core's optimizer for ``model_chunks`` with Magma inside.

    Takes ``get_megatron_optimizer``'s parameters, by the same names and in the same order, so
    it can stand in for it (``magma_ext.megatron.training`` installs it in Megatron-LM's loop).

    Args:
        config: Megatron's ``OptimizerConfig``, with ``optimizer="adam"``. Magma takes ``lr``,
            ``weight_decay``, ``adam_beta1``/``adam_beta2`` and ``adam_eps`` from it;
            ``fp16``/``bf16``, ``use_distributed_optimizer``, ``clip_grad`` and the loss-scale
            settings choose and configure the wrapper, as ``get_megatron_optimizer`` does. Every
            field is checked against ``magma_ext.megatron.allow_list.OPTIMIZER_CONFIG``.
        model_chunks: the model chunks (one per virtual pipeline stage), each wrapped in
            Megatron's ``DistributedDataParallel``, whose ``ddp_config`` is checked against
            ``magma_ext.megatron.allow_list.DDP_CONFIG``.
        config_overrides, use_gloo_process_groups, pg_collection: as for
            ``get_megatron_optimizer`` (default overrides: no weight decay for biases and 1-D
            parameters).
        dump_param_to_param_group_map: as for ``get_megatron_optimizer``: a path where
            ``{global parameter name: parameter group}`` is saved with
            ``torch.distributed.checkpoint`` (groups numbered over the parts, each Megatron group
            as its masked and its dense group).
        masked: ``masked(name, param) -> bool`` chooses the masked parameters (``name``: the
            global name, see ``magma_ext.megatron.global_names``); default: the attention and MLP
            weights (experts included, routers not), as the paper does. The others run the dense
            base optimizer (``"magma": False``).
        sparse_param_gather: with the distributed optimizer, make its parameter all-gather
            after each step move only the elements that changed (the kept blocks of masked
            tensors and all of the others; ``magma_ext.megatron.sparse_gather``); under
            ``overlap_param_gather``, each bucket group's gather launched from the forward
            pre-hooks (``magma_ext.megatron.overlapped_sync``). Bytes moved:
            :func:`param_sync_bytes`.
        **magma_options: Magma's own keywords (``keep_prob``, ``block``, ``seed``, ``tau``,
            ``score_ema``, ``base``, ``mask``, ``fused``, ``exp_avg_dtype``, ``exp_avg_sq_dtype``;
            not its master weights: Megatron's float32 main parameters are what Magma steps).

    Returns:
        a ``ChainedOptimizer`` of a dense part and, with expert parameters, an expert part:
        each a ``DistributedOptimizer``, ``Float16OptimizerWithFloat16Params`` or
        ``FP32Optimizer`` (subclasses that carry Magma's scores in checkpoints: see
        ``magma_ext.megatron.scores``).

    Raises:
        TypeError: ``config`` or ``model_chunks`` of the wrong type, a keyword Magma takes from
            the config, or Magma's ``master_weights``/``store_param_remainders``.
        ValueError: a config field or value outside the allow-lists (named), expert tensor
            parallelism > 1, tensor parallelism with groups that are not TP x DP (several
            distributed-optimizer instances with TP > 1), an expert parameter that holds several
            experts, ``block=N`` with a masked row-parallel weight under tensor parallelism,
            bfloat16 moments (``exp_avg_dtype``/``exp_avg_sq_dtype``) with any row-parallel weight
            under tensor parallelism, ``sparse_param_gather`` without the distributed optimizer,
            or a bad Magma option.
        magma_ext.megatron.internals.UnsupportedMegatron: a megatron-core before 0.19, or one whose
            private functions or distributed-optimizer layout are not the ones this module reads.
    """
    version = internals.megatron_version()
    _check_release(version)
    _check_arguments(config, model_chunks, magma_options)
    check_config(config, OPTIMIZER_CONFIG, "config", version)
    ddp_config = getattr(model_chunks[0], "ddp_config", None)
    if ddp_config is not None:
        check_config(ddp_config, DDP_CONFIG, "model_chunks[0].ddp_config", version)
    refuse_unsupported_sparse_gather(sparse_param_gather, config.use_distributed_optimizer, ddp_config)
    if config_overrides is None:
        config_overrides = get_standard_config_overrides(config)
    groups = ProcessGroupCollection.setup_process_groups_for_optimizer(
        pg_collection, model_chunks, use_gloo_process_groups)
    names = global_parameter_names(model_chunks)
    indices = {p: name_index(name) for p, name in names.items()}
    is_masked = masked or (lambda name, p: is_paper_masked(name, p.dim()))
    tensor_parallel = _TensorParallelGroups.of(pg_collection)
    build = dict(config=config, model_chunks=model_chunks, config_overrides=config_overrides, names=names,
                 indices=indices, is_masked=is_masked, version=version, magma_options=magma_options,
                 sparse_param_gather=sparse_param_gather, tensor_parallel=tensor_parallel)
    parts = [_build_part(_dense_groups(groups, tensor_parallel, config), **build)]
    expert = _expert_groups(groups, tensor_parallel, config, use_gloo_process_groups)
    expert_part = _build_part(expert, **build)
    if expert_part is not None:
        parts.append(expert_part)
    legacy = _legacy_tensor_indices(model_chunks, indices, pg_collection)
    for part in parts:
        part.legacy_tensor_indices = legacy
        part.legacy_refusal = POSITIONS_UNKNOWN if legacy is None else None
    if dump_param_to_param_group_map is not None:
        _dump_param_groups(parts, names, dump_param_to_param_group_map)
    return ChainedOptimizer(parts)


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


# ---------------------------------------------------------------------------- checks


_release_checked: set[str] = set()


def _check_release(version: str) -> None:
    """:func:`internals.check_release` once per process and version."""
    if version in _release_checked:
        return
    functions = {
        "_get_param_groups_and_buffers": _get_param_groups_and_buffers,
        "DistributedOptimizer.__init__": DistributedOptimizer.__init__,
        "Float16OptimizerWithFloat16Params.__init__": Float16OptimizerWithFloat16Params.__init__,
        "FP32Optimizer.__init__": FP32Optimizer.__init__,
        "ProcessGroupCollection.setup_process_groups_for_optimizer":
            ProcessGroupCollection.setup_process_groups_for_optimizer,
    }
    for method in ("_get_main_param_and_optimizer_states", "_set_main_param_and_optimizer_states",
                   "_get_model_param_range_map", "start_param_sync_for_bucket_group_subset"):
        functions[f"DistributedOptimizer.{method}"] = getattr(DistributedOptimizer, method, None)
    internals.check_release(version, functions, _get_megatron_optimizer_based_on_param_groups,
                            get_megatron_magma_optimizer, get_megatron_optimizer)
    _release_checked.add(version)


def _check_arguments(config, model_chunks, magma_options: dict) -> None:
    if not isinstance(config, OptimizerConfig):
        raise TypeError(f"config must be a megatron.core.optimizer.OptimizerConfig, got {type(config).__name__}")
    if not isinstance(model_chunks, (list, tuple)) or not model_chunks:
        raise TypeError("model_chunks must be a non-empty list of Megatron model chunks")
    for key in ("lr", "betas", "eps", "weight_decay", "process_group", "params"):
        if key in magma_options:
            raise TypeError(f"{key} comes from config (or the model), not from a keyword")
    for key in ("master_weights", "store_param_remainders"):
        if key in magma_options:
            raise TypeError(f"{key}: Megatron keeps float32 main parameters of its own and Magma "
                            "steps those; leave Magma's master weights off")


# ---------------------------------------------------------------------------- process groups


@dataclass(frozen=True)
class _TensorParallelGroups:
    """The tensor-parallel groups: dense (``tp``), dense with data parallelism and context
    parallelism (``tp_dp_cp``), and the experts' (``expert_tp``, None where not set up)."""

    tp: object
    tp_dp_cp: object
    expert_tp: object

    @classmethod
    def of(cls, pg_collection) -> _TensorParallelGroups:
        """From ``pg_collection`` where it has them, else from ``parallel_state``, as
        ``get_megatron_optimizer`` takes them."""
        found = vars(pg_collection) if pg_collection is not None else {}
        tp = found.get("tp") or parallel_state.get_tensor_model_parallel_group()
        tp_dp_cp = found.get("tp_dp_cp") or parallel_state.get_tensor_and_data_parallel_group(
            with_context_parallel=True)
        expert_tp = found.get("expt_tp") or parallel_state.get_expert_tensor_parallel_group(check_initialized=False)
        return cls(tp, tp_dp_cp, expert_tp)


@dataclass(frozen=True)
class _PartGroups:
    """Where one part of the ChainedOptimizer lives (the dense or the expert parameters).

    ``split`` holds every piece of a tensor-parallel-split tensor, ``replica`` the pieces of a
    TP-replicated one (None: each such tensor is whole on its rank); ``exchange``: the groups
    Magma exchanges block sums over.
    """

    kind: str
    tensor_parallel: object
    split: object
    replica: object
    exchange: tuple
    data_parallel: object
    data_parallel_gloo: object
    data_parallel_idx: int
    grad_stats: object
    instance_id: int


def _instance_id(groups: dict) -> int:
    """This rank's distributed-optimizer instance (Megatron's ``distributed_optimizer_instance_id``)."""
    inter = groups.get("inter_dist_opt_group")
    full = groups.get("dp_cp_group")
    if inter is None or full is None:
        return 0
    if torch.distributed.get_world_size(full) > torch.distributed.get_world_size(groups["intra_dp_cp_group"]):
        return torch.distributed.get_rank(inter)
    return 0


def _dense_groups(groups: dict, tensor_parallel: _TensorParallelGroups, config: OptimizerConfig) -> _PartGroups:
    tp_group, tp_dp_group = tensor_parallel.tp, tensor_parallel.tp_dp_cp
    tp_size = torch.distributed.get_world_size(tp_group)
    dp = groups["intra_dp_cp_group"]
    if config.use_distributed_optimizer:
        split, replica = (tp_dp_group if tp_size > 1 else dp), dp
        dp_size = torch.distributed.get_world_size(dp)
        if tp_size > 1 and torch.distributed.get_world_size(tp_dp_group) != tp_size * dp_size:
            raise ValueError(
                f"model_chunks: the tensor-and-data-parallel group has {torch.distributed.get_world_size(tp_dp_group)} "
                f"ranks, not tensor parallelism {tp_size} x the distributed optimizer's {dp_size} data-parallel ranks "
                "(several distributed-optimizer instances, or GTP remat): no group holds exactly the pieces of a "
                "tensor-parallel weight; use num_distributed_optimizer_instances=1 with tensor parallelism")
    else:
        split, replica = tp_group, None
    exchange = tuple(g for g in dict.fromkeys((split, replica)) if g is not None)
    if not config.use_distributed_optimizer and tp_size == 1:
        exchange = ()
    mp = groups["mp_group"]
    return _PartGroups(DENSE, tp_group, split, replica, exchange, dp, groups["intra_dp_cp_group_gloo"],
                       torch.distributed.get_rank(mp),
                       groups["intra_dist_opt_group"] if config.use_distributed_optimizer else mp,
                       _instance_id(groups))


def _expert_groups(groups: dict, tensor_parallel: _TensorParallelGroups, config: OptimizerConfig,
                   use_gloo: bool) -> _PartGroups:
    dp = groups["intra_expt_dp_group"]
    mp = groups.get("expt_tp_pp_with_egtp_remat_group")
    if mp is None:
        mp = groups["expt_tp_pp_group"]
    split = replica = dp if config.use_distributed_optimizer else None
    return _PartGroups(EXPERT, tensor_parallel.expert_tp, split, replica, (dp,) if config.use_distributed_optimizer else (),
                       dp, groups["intra_expt_dp_group_gloo"] if use_gloo else None, torch.distributed.get_rank(mp),
                       groups["intra_dist_opt_group"] if config.use_distributed_optimizer else mp,
                       _instance_id(groups))


def _group_size(group) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)


# ---------------------------------------------------------------------------- building


def _build_part(where: _PartGroups, *, config, model_chunks, config_overrides, names, indices, is_masked, version,
                magma_options, sparse_param_gather, tensor_parallel: _TensorParallelGroups):
    """One part of the ChainedOptimizer: Megatron's groups of ``where.kind``'s parameters, Magma
    over them, Megatron's wrapper around it, every held tensor declared; None for the expert
    part of a model without experts."""
    expert = where.kind == EXPERT
    param_groups, buffers = _get_param_groups_and_buffers(
        model_chunks, model_chunk_offset=0, config=config, config_overrides=config_overrides,
        filter_fn=(lambda g: g["is_expert_parallel"]) if expert else (lambda g: not g["is_expert_parallel"]),
        buffer_name="expert_parallel_buffers" if expert else "buffers")
    if expert and not param_groups:
        return None
    tp_size = _group_size(where.tensor_parallel)
    if expert and tp_size > 1:
        raise ValueError(f"model_chunks: expert tensor parallelism {tp_size}: the pieces of an expert weight split "
                         "across expert tensor-parallel and expert data-parallel ranks share no process group; set "
                         "expert_tensor_parallel_size=1")
    magma_groups = _split_groups(param_groups, names, is_masked, config)
    if not config.use_distributed_optimizer:
        # every rank holds every parameter, so dropping empty groups keeps them alike on all
        # ranks, and Megatron's Float16 checkpoints cannot merge an empty group's list
        magma_groups = [group for group in magma_groups if group["params"]]
    _refuse_row_parallel_slices(magma_groups, names, tp_size, magma_options)
    inner = None
    if magma_groups:
        inner = Magma(magma_groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                      weight_decay=config.weight_decay, process_group=list(where.exchange) or None, **magma_options)
    wrapper = _wrap(inner, config, model_chunks, buffers, where, tensor_parallel)
    if inner is None:  # no parameters of this part on this rank: a stub, as Megatron builds one
        return wrapper
    tp_rank = torch.distributed.get_rank(where.tensor_parallel) if where.tensor_parallel is not None else 0
    slices = {p: TensorParallelSlice(_partition_dim(p), tp_rank, tp_size) for p in names}
    held = list(_held_tensors(wrapper))
    _check_built(wrapper, held, version, sparse_param_gather)
    for model_param, tensor, start, stop in held:
        declare_piece(tensor, **piece_arguments(indices[model_param], tuple(model_param.shape), start, stop,
                                                slices[model_param], split_group=where.split,
                                                replica_group=where.replica))
    if sparse_param_gather:
        group_of = {p: i for i, group in enumerate(magma_groups) for p in group["params"]}
        wrapper.enable_sparse_param_gather(indices, slices, group_of)
    return wrapper


def _check_built(wrapper, held: list, version: str, sparse_param_gather: bool) -> None:
    """The built wrapper holds the tensors the integration reads from it (see
    :mod:`magma_ext.megatron.internals`)."""
    if isinstance(wrapper, DistributedOptimizer):
        bucket_groups = None
        if sparse_param_gather:
            bucket_groups = [g for chunk in wrapper.model_chunks for g in getattr(chunk, wrapper.bucket_attribute)]
        internals.check_distributed_optimizer(wrapper, [(p, t) for p, t, _, _ in held], version, bucket_groups)
        return
    inner = {id(p) for group in wrapper.optimizer.param_groups for p in group["params"]}
    if any(id(tensor) not in inner for _, tensor, _, _ in held) or len(held) != len(inner):
        raise internals.UnsupportedMegatron(
            f"megatron-core {version}: {type(wrapper).__name__}'s main parameters are not its inner optimizer's "
            "parameters; this is not the wrapper magma_ext.megatron was written for (megatron-core 0.19)")


def _legacy_tensor_indices(model_chunks: list, indices: dict, pg_collection) -> list[int] | None:
    """The name index of each position in the first chunk's ``named_parameters()``: the tensor
    indices of checkpoints written before names, which numbered tensors so. Only where those
    positions are the ones such a checkpoint used: one chunk, pipeline and expert parallelism 1."""
    if pg_collection is not None and hasattr(pg_collection, "pp"):
        pp, ep = _group_size(pg_collection.pp), _group_size(getattr(pg_collection, "ep", None))
    else:
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        ep = parallel_state.get_expert_model_parallel_world_size()
    if len(model_chunks) > 1 or pp > 1 or ep > 1:
        return None
    return [indices[p] for _, p in model_chunks[0].named_parameters()]


def _dump_param_groups(parts: list, names: dict, path: str) -> None:
    """``get_megatron_optimizer``'s ``dump_param_to_param_group_map``: ``{global name: group}``,
    groups numbered over the parts, saved with ``torch.distributed.checkpoint``."""
    mapping, group_id = {}, 0
    for part in parts:
        for group in (part.optimizer.param_groups if part.optimizer is not None else []):
            for p in group["params"]:
                mapping[names[_model_param_of(part, p)]] = group_id
            group_id += 1
    torch.distributed.checkpoint.save(state_dict=mapping, checkpoint_id=path)


def _model_param_of(part, tensor):
    """The model parameter whose tensor ``tensor`` (a shard or a main copy) is in ``part``."""
    found = getattr(part, "_model_param_of_tensor", None)
    if found is None:
        found = part._model_param_of_tensor = {id(t): p for p, t, _, _ in _held_tensors(part)}
    return found[id(tensor)]


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


def _refuse_row_parallel_slices(groups: list[dict], names: dict, tp_size: int, magma_options: dict) -> None:
    """What a row-parallel weight split across tensor-parallel ranks (column slices) cannot take,
    refused at construction rather than at Magma's first step: N-element blocks where it is
    masked (they would cut across the slices) and bfloat16 moments (their stochastic rounding is
    keyed by the logical element index, which a column slice lacks: docs/ALGORITHM.md section 6)."""
    if tp_size == 1:
        return
    block = magma_options.get("block", "tensor")
    rounded = [option for option in MOMENT_DTYPE_OPTIONS.values()
               if magma_options.get(option, torch.float32) != torch.float32]
    for group in groups:
        for p in group["params"]:
            if _partition_dim(p) != 1:
                continue
            split = f"{names[p]} is a row-parallel weight split across {tp_size} tensor-parallel ranks"
            if not isinstance(block, str) and group.get("optimizer") == MAGMA_GROUP:
                raise ValueError(f"block={block!r}: {split}, whose N-element blocks would cut across the "
                                 "slices; use block='row' or 'tensor', or leave it unmasked (masked=...)")
            if rounded:
                raise ValueError(f"{rounded[0]}={magma_options[rounded[0]]}: {split} (column slices), whose "
                                 "elements cannot key the stochastic rounding of bfloat16 moments; keep float32 "
                                 "moments, or tensor parallelism 1")


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


def _wrap(inner: Magma | None, config: OptimizerConfig, model_chunks: list, buffers, where: _PartGroups,
          tensor_parallel: _TensorParallelGroups):
    """The wrapper ``_get_megatron_optimizer_based_on_param_groups`` would put around its Adam, as
    its Magma subclass (megatron-core 0.19's wrapping; ``internals`` checks that it still is)."""
    init_state = _init_state if inner is not None else None
    if config.fp16 or config.bf16 or config.use_distributed_optimizer:
        scaler = _grad_scaler(config)
        if config.use_distributed_optimizer:
            wrapper = MagmaDistributedOptimizer(
                inner, config, scaler, init_state, model_chunks=model_chunks, per_model_buffers=buffers,
                data_parallel_group=where.data_parallel, data_parallel_group_gloo=where.data_parallel_gloo,
                data_parallel_group_idx=where.data_parallel_idx, distributed_optimizer_instance_id=where.instance_id,
            )
            wrapper.bucket_attribute = "expert_parallel_bucket_groups" if where.kind == EXPERT else "bucket_groups"
        else:
            wrapper = MagmaFloat16Optimizer(inner, config, scaler, init_state)
    else:
        wrapper = MagmaFP32Optimizer(inner, config, init_state)
    wrapper.grad_stats_parallel_group = where.grad_stats
    wrapper.tp_group = tensor_parallel.tp
    wrapper.expert_tp_group = tensor_parallel.expert_tp if tensor_parallel.expert_tp is not None else tensor_parallel.tp
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
        groups = wrapper.optimizer.param_groups if wrapper.optimizer is not None else []
        pairs = [(p, p) for group in groups for p in group["params"]]
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
    bucket_attribute = "bucket_groups"  # the chunks' bucket groups of this part's parameters (the experts'
                                        # part: "expert_parallel_bucket_groups")

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
        buckets, group = buckets_of_chunks(self.model_chunks, indices, slices, group_of, blocks, self.bucket_attribute)
        group = group if group is not None else self.data_parallel_group
        overlapped = self.ddp_config.overlap_param_gather
        bucket_groups, parts = bucket_group_parts(self.model_chunks, self.bucket_attribute)
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
            for bucket_group in getattr(chunk, self.bucket_attribute):
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
