"""The Megatron settings magma_ext.megatron knows to be safe, field by field.

Every field of Megatron's ``OptimizerConfig`` and of the model chunks' ``DistributedDataParallelConfig``
is either in :data:`OPTIMIZER_CONFIG` / :data:`DDP_CONFIG` with the values this integration takes
(:data:`ANY`, or a tuple of the allowed values), or it is a field this integration has not
reviewed (added by a megatron-core newer than 0.19.2): that one is accepted only at its
dataclass default, which is the behaviour of the releases reviewed. Anything else is refused by
:func:`check_config`, naming the field, its value, what is allowed and the megatron-core version.

Why a field takes any value:

- Magma or the wrapper reads it as Adam's stack does: the learning rates and weight decay
  (Megatron's scheduler writes them into the parameter groups), the betas and eps, the
  precisions and loss scaling, clipping and the grad-norm skip, the distributed optimizer and
  its overlapped gather, timers and logging.
- It acts only under a setting refused here: the knobs of other optimizers (``optimizer`` must
  be ``"adam"``, whose hyperparameters Magma takes), of CPU offloading, of the
  precision-aware optimizer, of FP8 parameters (refused through the DDP config's
  ``fp8_param_gather``), and of Megatron-FSDP (refused through ``use_megatron_fsdp``).
- It changes how gradients are computed or reduced before the optimizer sees them (bucket
  sizes, fp32 reduction, averaging in the collective, NaN checks): Magma reads the reduced
  gradient as Adam does.

No megatron-core import: fields are read with :func:`dataclasses.fields`.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ANY", "OPTIMIZER_CONFIG", "DDP_CONFIG", "check_config"]

ANY = object()  # any value
_FLOAT32 = "torch.float32"  # compared by str(): no torch import needed to read the table

# the knobs of optimizers other than Adam: they act only with config.optimizer != "adam"
_OTHER_OPTIMIZERS = (
    "sgd_momentum", "muon_momentum", "muon_split_qkv", "muon_use_nesterov", "muon_nesterov", "muon_scale_mode",
    "muon_fp32_matmul_prec", "muon_coefficient_type", "muon_num_ns_steps", "muon_tp_mode", "muon_extra_scale_factor",
    "muon_scalar_optimizer", "lion_beta1", "lion_beta2", "soap_shampoo_beta", "soap_precondition_frequency",
    "soap_use_kl_shampoo", "adaptive_muon_moment2_method", "adaptive_muon_beta2", "adaptive_muon_eps",
)
_CPU_OFFLOAD_KNOBS = ("optimizer_offload_fraction", "use_torch_optimizer_for_cpu_offload",
                      "overlap_cpu_optimizer_d2h_h2d", "pin_cpu_grads", "pin_cpu_params")

OPTIMIZER_CONFIG: dict[str, object] = {
    # read by Magma or by the wrapper, as Adam's stack reads them
    **dict.fromkeys(("lr", "min_lr", "decoupled_lr", "decoupled_min_lr", "weight_decay", "apply_wd_to_qk_layernorm",
                     "fp16", "bf16", "params_dtype", "loss_scale", "initial_loss_scale", "min_loss_scale",
                     "loss_scale_window", "hysteresis", "adam_beta1", "adam_beta2", "adam_eps",
                     "use_distributed_optimizer", "overlap_param_gather", "clip_grad", "grad_norm_skip_threshold",
                     "log_num_zeros_in_grad", "barrier_with_L1_time", "timers", "config_logger_dir"), ANY),
    # acting only under settings refused below or in the DDP config
    **dict.fromkeys(_OTHER_OPTIMIZERS + _CPU_OFFLOAD_KNOBS + ("fp8_recipe", "store_param_remainders"), ANY),
    # fixed
    "optimizer": ("adam",),  # Magma replaces Adam and takes Adam's hyperparameters
    "decoupled_weight_decay": (True,),  # Magma's weight decay is decoupled (AdamW's)
    "use_precision_aware_optimizer": (False,),  # TE's FusedAdam state dtypes and master weights
    "main_grads_dtype": (_FLOAT32,),
    "main_params_dtype": (_FLOAT32,),
    "exp_avg_dtype": (_FLOAT32,),
    "exp_avg_sq_dtype": (_FLOAT32,),
    "optimizer_cpu_offload": (False,),  # HybridDeviceOptimizer builds its own inner optimizers
    "use_layer_wise_distributed_optimizer": (False,),  # whole parameters per rank, Megatron's emerging optimizers
    "overlap_param_gather_with_optimizer_step": (False,),  # untested with Magma
    "reuse_grad_buf_for_mxfp8_param_ag": (False,),  # FP8 parameters
    # Megatron captures the whole optimizer.step() once and replays it: the scheduler's lr and
    # weight decay reach Magma as host floats in param_groups (a replay repeats the captured
    # ones), and the wrapper's host step count drives the sparse gather's plans and the host
    # mask draws, which a replay does not run
    "optimizer_cuda_graph": (False,),
}

_FSDP_ONLY = ("data_parallel_sharding_strategy", "suggested_communication_unit_size", "preserve_fp32_weights",
              "keep_fp8_transpose_cache", "fsdp_double_buffer", "fsdp_db_use_persist_buf_on_alloc_fail",
              "fsdp_all_gather_in_start_param_sync", "outer_dp_sharding_strategy", "fsdp_manual_registration",
              "megatron_fsdp_main_params_dtype", "megatron_fsdp_main_grads_dtype", "megatron_fsdp_grad_comm_dtype",
              "megatron_fsdp_use_decoupled_grad", "megatron_fsdp_cuda_graph_mode",
              "megatron_fsdp_enable_fine_grained_param_gather", "megatron_fsdp_max_pool_double_buffer")

DDP_CONFIG: dict[str, object] = {
    # gradients: computed and reduced before the optimizer reads them
    **dict.fromkeys(("grad_reduce_in_fp32", "overlap_grad_reduce", "check_for_nan_in_grad", "check_for_large_grads",
                     "bucket_size", "num_buckets", "pad_buckets_for_high_nccl_busbw",
                     "reduce_scatter_with_fp32_accumulation", "param_name_patterns_for_fp32_local_accumulation",
                     "average_in_collective", "gradient_reduce_div_fusion", "delay_wgrad_compute",
                     "disable_symmetric_registration", "nccl_ub"), ANY),
    # the distributed optimizer and its parameter gather (tested with Magma)
    **dict.fromkeys(("use_distributed_optimizer", "overlap_param_gather", "align_param_gather",
                     "num_distributed_optimizer_instances"), ANY),
    # acting only under Megatron-FSDP, refused below
    **dict.fromkeys(_FSDP_ONLY, ANY),
    "use_megatron_fsdp": (False,),  # use torch FSDP2 with magma_ext.Magma instead
    "use_custom_fsdp": (False,),
    "fp8_param_gather": (False,),  # quantized parameter buffers
    "fp4_param_gather": (False,),
    "reuse_grad_buf_for_mxfp8_param_ag": (False,),
}


def _same(value, allowed) -> bool:
    if isinstance(allowed, str):  # a dtype, by name
        return str(value) == allowed
    return type(value) is type(allowed) and value == allowed


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def check_config(config, table: dict[str, object], where: str, version: str) -> None:
    """Raise ValueError unless every field of the dataclass ``config`` is allowed by ``table``
    (see the module's description); ``where`` names the config in the message (e.g.
    ``"config"``), ``version`` the megatron-core release.

    Raises TypeError when ``config`` is not a dataclass instance.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"{where} must be a dataclass instance (Megatron's config), got {type(config).__name__}")
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        allowed = table.get(field.name)
        if allowed is ANY:
            continue
        if allowed is None:
            default = _default(field)
            if default is not dataclasses.MISSING and _same(value, default):
                continue
            raise ValueError(
                f"{where}.{field.name}={value!r}: a setting of megatron-core {version} that magma_ext.megatron has "
                f"not reviewed (reviewed: megatron-core 0.16.1 to 0.19.2); it is accepted only at its default "
                f"{default!r}")
        if not any(_same(value, choice) for choice in allowed):
            shown = " or ".join(repr(choice) for choice in allowed)
            raise ValueError(f"{where}.{field.name}={value!r} is not supported by magma_ext.megatron (megatron-core "
                             f"{version}): it must be {shown}")
