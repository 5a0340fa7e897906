"""The GPTModel of benchmarks/megatron_bench.py, built from megatron-core's own modules.

:func:`block_spec` (also used by tests/megatron_gpt_runs.py) is megatron-core's local GPT
layer spec with norms that run sequence-parallel without apex or Transformer Engine: the local
spec's own torch norm refuses ``sequence_parallel``, while a LayerNorm whose parameters carry
``sequence_parallel = True`` (as apex's FusedLayerNorm marks its own) works, Megatron's
``finalize_model_grads`` then all-reducing their gradients over the tensor-parallel ranks. The
other functions build the benchmark's model from its arguments (``megatron_bench_cli``) and its
parallel set-up (``ctx``: ``megatron_bench.Parallel``).
"""

from __future__ import annotations

import argparse
import copy

import torch
from megatron.core import tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron_bench_cli import VOCAB_SIZE


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """torch's LayerNorm marked for Megatron's sequence parallelism (when the config has it on)."""

    def __init__(self, config, hidden_size, eps=1e-5, **unused):
        super().__init__(hidden_size, eps=eps)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


def block_spec(config, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """The layers of the local spec this pipeline stage (virtual stage ``vp_stage``) builds, and the
    final norm, with sequence-parallel norms; MoE layers of ``SequentialMLP`` experts where
    ``config.num_moe_experts`` is set."""
    layer = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    layer.submodules.input_layernorm = SequenceParallelLayerNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * layers, layer_norm=SequenceParallelLayerNorm)


def model_dtype(args: argparse.Namespace) -> torch.dtype:
    """The model's parameter dtype (``--bf16`` or ``--fp16``)."""
    return torch.bfloat16 if args.dtype == "bf16" else torch.float16


def build_transformer_config(args: argparse.Namespace, ctx) -> TransformerConfig:
    """A fresh config per run: the training loop hangs per-run hooks on it (grad_scale_func...)."""
    dtype = model_dtype(args)
    return TransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        tensor_model_parallel_size=ctx.tp,
        pipeline_model_parallel_size=1,
        sequence_parallel=ctx.sequence_parallel,
        transformer_impl="local",
        # cpu: the same weights on every rank and for any TP size; gpu: faster (one GPU: the
        # same weights for every run of the process, from the reseeded CUDA generator)
        use_cpu_initialization=args.init == "cpu",
        bf16=args.dtype == "bf16",
        fp16=args.dtype == "fp16",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        hidden_dropout=0.0,  # no dropout: the two runs differ only by their optimizer
        attention_dropout=0.0,
    )


def seed_everything(seed: int) -> None:
    """CPU generator (the CPU initialisation) and Megatron's CUDA RNG trackers."""
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_model(config: TransformerConfig, args: argparse.Namespace) -> Float16Module:
    """GPTModel from the local spec on the GPU (initialised on the CPU or the GPU, ``--init``), cast to
    bf16/fp16 as Megatron's get_model does."""
    seed_everything(args.seed)
    model = GPTModel(config=config, transformer_layer_spec=block_spec(config),
                     vocab_size=VOCAB_SIZE, max_sequence_length=args.seq_len)
    for param in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    model.cuda(torch.cuda.current_device())
    return Float16Module(config, model)


def snapshot(module: torch.nn.Module) -> dict:
    """A CPU copy of the module's state_dict."""
    return {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else copy.deepcopy(v)
            for k, v in module.state_dict().items()}


def restore(module: torch.nn.Module, state: dict) -> bool:
    """Load ``state`` into ``module``; return whether the module already held exactly it."""
    current = module.state_dict()
    same = current.keys() == state.keys() and all(
        torch.equal(current[k].detach().cpu(), v) for k, v in state.items() if torch.is_tensor(v))
    module.load_state_dict(state, strict=True)
    return same


def count_parameters(model: torch.nn.Module, ctx) -> tuple[int, int]:
    """(parameters of the whole model, parameters held by this rank)."""
    split = sum(p.numel() for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    local = sum(p.numel() for p in model.parameters())
    total_split = torch.tensor(split, dtype=torch.int64, device="cuda")
    torch.distributed.all_reduce(total_split, group=ctx.tp_group)
    return int(total_split.item()) + (local - split), local


def wrap_ddp(config: TransformerConfig, model: Float16Module, args: argparse.Namespace) -> DistributedDataParallel:
    """Megatron's DDP around ``model``: fp32 gradient reduction, the distributed optimizer's
    buffers with ``--distributed-optimizer``, overlapped reduction and gather with
    ``--overlap-param-gather``."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_param_gather,
        use_distributed_optimizer=args.distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
