"""The optimizers and learning-rate schedule of benchmarks/megatron_bench.py's runs."""

from __future__ import annotations

import argparse

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron_bench_cli import is_magma, is_sparse
from megatron_model import model_dtype

from magma_ext.megatron import get_megatron_magma_optimizer


def peak_lr(name: str, args: argparse.Namespace) -> float:
    """``--magma-lr`` for the Magma runs, ``--lr`` for Adam's."""
    return args.magma_lr if is_magma(name) else args.lr


def build_optimizer_config(name: str, args: argparse.Namespace) -> OptimizerConfig:
    """The same Megatron config for every run but its peak lr: weight decay 0.1, betas (0.9, 0.95),
    clipping at 1.0, dynamic loss scaling under fp16."""
    lr = peak_lr(name, args)
    return OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=lr / 10,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_eps=1e-8,
        bf16=args.dtype == "bf16",
        fp16=args.dtype == "fp16",
        params_dtype=model_dtype(args),
        use_distributed_optimizer=args.distributed_optimizer,
        clip_grad=1.0,
        loss_scale=None,  # fp16: dynamic loss scaling; bf16: no scaler
        initial_loss_scale=2**16,
    )


def build_optimizer(name: str, args: argparse.Namespace, model: DistributedDataParallel):
    """Megatron's ChainedOptimizer around its Adam (``--adam-impl``) or Magma (Magma+sparse: with
    the sparse parameter gather)."""
    config = build_optimizer_config(name, args)
    if name == "adam":
        optimizer = get_megatron_optimizer(config, [model])
        use_adam_impl(optimizer, args.adam_impl)
        return optimizer
    return get_megatron_magma_optimizer(config, [model], keep_prob=args.keep_prob,
                                        block=args.block, seed=args.seed, sparse_param_gather=is_sparse(name))


def use_adam_impl(optimizer, impl: str) -> None:
    """Run each ``torch.optim.AdamW`` inside Megatron's ``optimizer`` (what it builds without TE
    or apex) as ``impl``, "fused" or "foreach": each parameter group's flag, which AdamW reads
    at every step (and checks for fused when it first creates state). Another Adam (TE's or
    apex's FusedAdam, already fused) is refused for "foreach"."""
    for part in optimizer.chained_optimizers:
        inner = getattr(part, "optimizer", None)
        if inner is None:
            continue
        if not isinstance(inner, torch.optim.AdamW):
            if impl == "foreach":
                raise SystemExit(f"--adam-impl foreach: Megatron's Adam here is {type(inner).__module__}."
                                 f"{type(inner).__qualname__}, not torch.optim.AdamW")
            continue
        for group in inner.param_groups:
            group["fused"], group["foreach"] = impl == "fused", impl == "foreach"


def build_scheduler(optimizer, name: str, args: argparse.Namespace) -> OptimizerParamScheduler:
    """Linear warm-up over 10% of the steps from 0, cosine decay to lr/10, constant decay."""
    lr = peak_lr(name, args)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=lr / 10,
        lr_warmup_steps=int(0.1 * args.steps),
        lr_decay_steps=args.steps,
        lr_decay_style="cosine",
        start_wd=0.1,
        end_wd=0.1,
        wd_incr_steps=args.steps,
        wd_incr_style="constant",
    )


def describe_optimizer(optimizer) -> str:
    parts = [f"{type(part).__name__}({type(part.optimizer).__module__}.{type(part.optimizer).__qualname__})"
             for part in optimizer.chained_optimizers if getattr(part, "optimizer", None) is not None]
    return f"{type(optimizer).__name__}[{', '.join(parts)}]"


def inner_class_name(optimizer) -> str:
    """The inner optimizers' class names, a torch AdamW's with its implementation ("AdamW (fused)")."""
    names = {_inner_name(part.optimizer) for part in optimizer.chained_optimizers
             if getattr(part, "optimizer", None) is not None}
    return "+".join(sorted(names)) or "none"


def _inner_name(inner) -> str:
    if isinstance(inner, torch.optim.AdamW) and inner.param_groups:
        group = inner.param_groups[0]
        impl = "fused" if group.get("fused") else "foreach" if group.get("foreach") else "default"
        return f"{type(inner).__name__} ({impl})"
    return type(inner).__name__
