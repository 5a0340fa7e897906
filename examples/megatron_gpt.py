"""Train a small megatron-core GPT with Magma, save a distributed checkpoint and resume from it.

One process per GPU under ``torchrun``, from the repository root::

    torchrun --nproc-per-node 2 examples/megatron_gpt.py                          # data parallel
    torchrun --nproc-per-node 2 examples/megatron_gpt.py --distributed-optimizer  # sharded optimizer
    torchrun --nproc-per-node 2 examples/megatron_gpt.py --tp 2                   # tensor parallel

Needs a CUDA build of torch, megatron-core (tested with 0.19.2; no Transformer Engine or apex:
the model uses megatron-core's local layer spec) and magma_ext.

Magma enters Megatron in one call: ``get_megatron_magma_optimizer`` takes the ``OptimizerConfig``
that ``get_megatron_optimizer`` takes and returns the same ``ChainedOptimizer`` around the same
wrapper (mixed precision or the distributed optimizer), with Magma inside. Megatron's training
step, loss scaling, gradient clipping, learning-rate schedule and distributed checkpoints work
as they do with Adam.

The script trains ``--steps`` steps on bytes of Python's standard library (the corpus of
``python -m magma_ext.demo``) and saves a checkpoint halfway. It then builds a fresh model and
optimizer, loads the checkpoint and trains the second half again: the resumed run repeats the
uninterrupted one, masks included (a mask depends only on the seed, the tensor, the block and
the step). Timings and comparisons with Adam: ``benchmarks/megatron_bench.py``.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from itertools import islice

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from magma_ext.demo.data import batches, load_corpus
from magma_ext.megatron import get_megatron_magma_optimizer

VOCAB_SIZE = 256  # bytes
LR, MIN_LR = 2e-3, 2e-4
CHECKPOINT_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}  # loadable at another DP size


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (the other ranks: data parallel)")
    p.add_argument("--distributed-optimizer", action="store_true", help="shard the optimizer over DP ranks")
    p.add_argument("--sparse-param-gather", action="store_true",
                   help="with --distributed-optimizer: all-gather only the parameters Magma changed")
    p.add_argument("--keep-prob", type=float, default=0.5, help="Magma: probability of updating a block")
    p.add_argument("--steps", type=int, default=40, help="training steps; the checkpoint is saved after half")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per data-parallel rank and step")
    p.add_argument("--checkpoint-dir", default="magma_megatron_gpt_checkpoint")
    p.add_argument("--seed", type=int, default=1234, help="weights, data order and Magma's masks")
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be at least 2 (a checkpoint is saved halfway)")
    if args.sparse_param_gather and not args.distributed_optimizer:
        p.error("--sparse-param-gather needs --distributed-optimizer")
    return args


def build(args: argparse.Namespace):
    """GPTModel in bf16 inside Megatron's DDP, Magma inside Megatron's optimizer, and the schedule."""
    torch.manual_seed(args.seed)  # the CPU initialisation: the same weights on every rank
    config = TransformerConfig(
        num_layers=4, hidden_size=256, num_attention_heads=8, tensor_model_parallel_size=args.tp,
        use_cpu_initialization=True, bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
        hidden_dropout=0.0, attention_dropout=0.0)
    gpt = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB_SIZE,
                   max_sequence_length=args.seq_len)
    for param in gpt.parameters():  # as Megatron's get_model does
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    gpt.cuda()
    model = DistributedDataParallel(
        config=config, module=Float16Module(config, gpt),
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                 use_distributed_optimizer=args.distributed_optimizer))

    optimizer_config = OptimizerConfig(
        optimizer="adam", lr=LR, min_lr=MIN_LR, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
        bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=args.distributed_optimizer, clip_grad=1.0)
    # Where Megatron's own Adam is get_megatron_optimizer(optimizer_config, [model]):
    optimizer = get_megatron_magma_optimizer(optimizer_config, [model], keep_prob=args.keep_prob, seed=args.seed,
                                             sparse_param_gather=args.sparse_param_gather)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=args.steps // 10,
        lr_decay_steps=args.steps, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1, wd_incr_steps=args.steps,
        wd_incr_style="constant")
    # what Megatron's training loop hangs on the config: the loss scale and the gradient reduction
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    return gpt, model, optimizer, scheduler


def data(train_bytes: torch.Tensor, args: argparse.Namespace, first_step: int):
    """This DP rank's rows of each step's global batch, from ``first_step`` on (the same batches on
    every TP rank of a DP rank, and for a resumed run)."""
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    rows = slice(dp_rank * args.micro_batch, (dp_rank + 1) * args.micro_batch)
    for inputs, targets in islice(batches(train_bytes, dp * args.micro_batch, args.seq_len, seed=args.seed),
                                  first_step, None):
        yield inputs[rows].cuda(), targets[rows].cuda()


def forward_step(positions: torch.Tensor, data_iterator, model):
    tokens, labels = next(data_iterator)
    per_token_loss = model(tokens, positions, None, labels=labels)  # None: the causal mask

    def loss_func(output: torch.Tensor):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach().clone()}  # the schedule scales the loss in place

    return per_token_loss, loss_func


def train(args, model, optimizer, scheduler, batches_from_step, first_step: int, last_step: int) -> list[float]:
    """Steps ``first_step`` to ``last_step - 1``; returns each step's loss, averaged over DP ranks."""
    forward_backward = get_forward_backward_func()
    positions = torch.arange(args.seq_len, device="cuda").unsqueeze(0).expand(args.micro_batch, -1)
    losses = []
    for step in range(first_step, last_step):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(
            forward_step_func=partial(forward_step, positions), data_iterator=batches_from_step, model=[model],
            num_microbatches=1, seq_length=args.seq_len, micro_batch_size=args.micro_batch, forward_only=False)
        update_successful, grad_norm, _ = optimizer.step()
        if update_successful:
            scheduler.step(increment=1)
        loss = reduced[0]["lm loss"].clone()
        torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        losses.append(loss.item() / parallel_state.get_data_parallel_world_size())
        if torch.distributed.get_rank() == 0 and (step + 1) % 10 == 0:
            norm = "skipped" if grad_norm is None else f"{float(grad_norm):.3f}"
            print(f"step {step + 1:>4}  loss {losses[-1]:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"grad norm {norm}", flush=True)
    return losses


def checkpoint(gpt, optimizer, scheduler, step: int, is_loading: bool) -> dict:
    """What Megatron's distributed checkpoint holds: sharded model and optimizer states (Magma's
    scores included), and the schedule and step as common state."""
    model_state = gpt.sharded_state_dict()
    return {"model": model_state,
            "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=CHECKPOINT_FORMAT),
            "scheduler": scheduler.state_dict(), "step": step}


def save(directory: str, gpt, optimizer, scheduler, step: int) -> None:
    if torch.distributed.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(checkpoint(gpt, optimizer, scheduler, step, is_loading=False), directory)


def load(directory: str, gpt, optimizer, scheduler) -> int:
    """Load the checkpoint into a freshly built model, optimizer and schedule; returns its step."""
    loaded = dist_checkpointing.load(checkpoint(gpt, optimizer, scheduler, 0, is_loading=True), directory)
    gpt.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    return loaded["step"]


def main() -> None:
    args = parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    train_bytes, _ = load_corpus()
    half, rank = args.steps // 2, torch.distributed.get_rank()

    gpt, model, optimizer, scheduler = build(args)
    train(args, model, optimizer, scheduler, data(train_bytes, args, 0), 0, half)
    save(args.checkpoint_dir, gpt, optimizer, scheduler, half)
    if rank == 0:
        print(f"saved step {half} to {args.checkpoint_dir}; training on", flush=True)
    uninterrupted = train(args, model, optimizer, scheduler, data(train_bytes, args, half), half, args.steps)
    del gpt, model, optimizer, scheduler

    gpt, model, optimizer, scheduler = build(args)
    step = load(args.checkpoint_dir, gpt, optimizer, scheduler)
    if rank == 0:
        print(f"resumed a fresh model and optimizer from step {step}", flush=True)
    resumed = train(args, model, optimizer, scheduler, data(train_bytes, args, step), step, args.steps)
    if rank == 0:
        gap = max(abs(a - b) for a, b in zip(uninterrupted, resumed))
        print(f"steps {step + 1}-{args.steps}: final loss {uninterrupted[-1]:.4f} uninterrupted, "
              f"{resumed[-1]:.4f} resumed; largest loss difference {gap:.2e}")

    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
