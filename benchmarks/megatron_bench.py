"""Benchmark megatron-core's GPTModel with Megatron's Adam and with Magma, in one process.

One process per GPU under ``torchrun``; from the repository root::

    torchrun --nproc-per-node 2 benchmarks/megatron_bench.py --tp 2
    torchrun --nproc-per-node 2 benchmarks/megatron_bench.py --dp 2 --distributed-optimizer
    torchrun --nproc-per-node 2 benchmarks/megatron_bench.py --dp 2 --fp16 --table megatron_bench.md
    torchrun --nproc-per-node 2 benchmarks/megatron_bench.py --dp 2 --distributed-optimizer \
        --param-gather both --keep-prob 0.5 --layout-json layout.json

Needs Python >= 3.12, a CUDA build of torch, ``megatron-core==0.19.2`` and this package
(``magma_ext``, with ``magma_ext.megatron``). Transformer Engine and apex are not used: the
model is built from megatron-core's local spec with sequence-parallel torch LayerNorms
(``benchmarks/megatron_model.py``; sequence parallelism is on when ``--tp`` > 1) and Megatron
falls back to ``torch.optim.AdamW`` for Adam, run ``fused=True`` by default (``--adam-impl``; TE's
FusedAdam, what Megatron users run, is one kernel too) or with torch's default foreach
implementation. (``examples/megatron_gpt.py`` is the short example of the same integration.)

What it does, per run (``--optimizer both``: Adam first, then Magma, in one process;
``--param-gather both`` adds a third run, "Magma+sparse"; ``--magma-first`` puts the Magma
runs before Adam; ``--rounds N`` repeats them N times, the order reversed every other round,
and reports medians over the rounds with each round's ratios):

- builds a ``GPTModel`` (learned positions, LayerNorm, GELU MLP, untied output layer, no
  dropout) over a 256-byte vocabulary, initialised on the CPU from ``--seed`` (so identically
  on every rank and for every run; later runs also reload the first run's initial weights
  and say whether they matched), moves it to the GPU and casts it to bf16/fp16 with
  ``Float16Module``, and wraps it in Megatron's ``DistributedDataParallel``;
- builds the optimizer: ``get_megatron_optimizer`` (Adam, lr ``--lr``) or
  ``magma_ext.megatron.get_megatron_magma_optimizer`` (lr ``--magma-lr``). Both sit in
  Megatron's wrappers (Magma's in subclasses of them): ``Float16OptimizerWithFloat16Params``
  (fp32 main copies of the bf16/fp16 parameters) or, with ``--distributed-optimizer``,
  ``DistributedOptimizer`` (fp32 main shards), inside a ``ChainedOptimizer``. With
  ``--param-gather sparse`` the Magma run (labelled "Magma+sparse") passes
  ``sparse_param_gather=True``: the distributed optimizer's parameter all-gather after each
  step moves only the blocks Magma kept (``magma_ext.megatron.sparse_gather``); ``both`` runs
  Magma with Megatron's dense all-gather and then again with the sparse one;
- trains ``--steps`` iterations of ``--dp`` x ``--micro-batch`` windows of ``--seq-len`` + 1
  bytes, cut from the byte corpus of ``python -m magma_ext.demo`` (the running Python's
  standard library) in a seeded order shared by all runs; TP ranks of a DP rank read the
  same windows. The learning rate follows ``OptimizerParamScheduler``: linear warm-up over
  10% of the steps, then cosine decay to a tenth of the peak; weight decay 0.1 on matrices,
  betas (0.9, 0.95), gradient clipping at 1.0, dynamic loss scaling under ``--fp16``.

It prints, on rank 0, a table of the final training loss (mean of the last 10 steps over
the DP ranks), tokens/s and the median iteration, optimizer-step (Megatron's wrapper) and
inner-optimizer-step times, all measured with CUDA events on rank 0 after
``--warmup-steps`` iterations (``benchmarks/megatron_bench_report.py``); ``--table PATH`` also
writes it as Markdown. With ``--distributed-optimizer`` the table also gives the median time of
the parameter all-gather (CUDA events around each part's
``start_param_sync_for_bucket_group_subset``) and the bytes rank 0 sent and received in it per
step (``magma_ext.megatron.param_sync_bytes``; Adam's and a dense-gather Magma run's are the
dense all-gather's), each against the dense gather. ``--layout-json PATH`` writes the sparse
gather's bucket layout record (``benchmarks/sparse_gather_record.py``), which
``python benchmarks/sparse_gather_projection.py PATH`` projects to other DP sizes and
``benchmarks/sparse_gather_bench.py PATH`` replays route by route. ``--overlap-param-gather``
turns on Megatron's ``overlap_grad_reduce`` and ``overlap_param_gather``: each bucket group's
parameter all-gather (sparse or dense) then runs from the next forward pass's pre-hooks, so it
has no time column of its own; tokens/s shows what it costs.
"""

from __future__ import annotations

import os

# NVLink multicast (NVLS) off, before torch.distributed or NCCL starts: it is not usable on
# every machine and a failed multicast set-up can hang the first collective.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

# first: it puts the checkout on sys.path where magma_ext is not installed
from sparse_gather_record import record_of_optimizer  # noqa: E402

import megatron.core  # noqa: E402
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron_bench_cli import LABELS, is_magma, parse_args, run_order  # noqa: E402
from megatron_bench_optimizers import build_optimizer, build_scheduler, describe_optimizer, inner_class_name  # noqa: E402
from megatron_bench_report import (  # noqa: E402
    LOSS_WINDOW,
    RunResult,
    describe_setup,
    format_table,
    markdown_report,
    median_over_rounds,
    rounds_table,
    write_layout,
)
from megatron_bench_timing import EventTimer, median_after_warmup, time_inner_steps, time_param_syncs  # noqa: E402
from megatron_model import build_model, build_transformer_config, count_parameters, restore, snapshot, wrap_ddp  # noqa: E402

from magma_ext.demo.data import batches, load_corpus  # noqa: E402
from magma_ext.megatron import param_sync_bytes  # noqa: E402
from magma_ext.megatron.sync_bytes import SyncBytes  # noqa: E402


# --------------------------------------------------------------------------------------------
# Parallel set-up
# --------------------------------------------------------------------------------------------

@dataclass
class Parallel:
    """This process's place in Megatron's TP x DP layout (pipeline parallelism 1)."""

    rank: int
    world: int
    tp: int
    dp: int
    dp_rank: int
    dp_group: torch.distributed.ProcessGroup
    tp_group: torch.distributed.ProcessGroup
    sequence_parallel: bool


def setup_parallel(args: argparse.Namespace) -> Parallel:
    """One GPU per process, NCCL, then Megatron's TP x DP groups (PP = 1) and RNG trackers."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp,
                                             pipeline_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    return Parallel(
        rank=torch.distributed.get_rank(),
        world=torch.distributed.get_world_size(),
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_group=parallel_state.get_data_parallel_group(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        sequence_parallel=args.tp > 1,  # parse_args checked that --tp divides --seq-len
    )


def teardown_parallel() -> None:
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def print0(ctx: Parallel, *values) -> None:
    if ctx.rank == 0:
        print(*values, flush=True)


# --------------------------------------------------------------------------------------------
# Data and forward step
# --------------------------------------------------------------------------------------------

def micro_batches(train_data: torch.Tensor, args: argparse.Namespace, ctx: Parallel):
    """This DP rank's (tokens, labels) per iteration, on the GPU.

    Every rank draws the same global batch of dp x micro-batch windows from the demo's
    seeded window generator and keeps its DP rank's rows, so TP ranks of a DP rank read the
    same data and every run reads the same sequence of batches.
    """
    rows = slice(ctx.dp_rank * args.micro_batch, (ctx.dp_rank + 1) * args.micro_batch)
    for inputs, targets in batches(train_data, ctx.dp * args.micro_batch, args.seq_len, seed=args.seed):
        yield (inputs[rows].contiguous().pin_memory().cuda(non_blocking=True),
               targets[rows].contiguous().pin_memory().cuda(non_blocking=True))


def loss_func(per_token_loss: torch.Tensor):
    """Mean token cross-entropy; the dict is what forward_backward_func returns to us."""
    loss = per_token_loss.float().mean()
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(position_ids: torch.Tensor, data_iterator, model):
    tokens, labels = next(data_iterator)
    # attention_mask=None: the local attention builds the causal mask itself.
    per_token_loss = model(tokens, position_ids, None, labels=labels)
    return per_token_loss, loss_func


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def dp_mean(values: torch.Tensor, ctx: Parallel) -> torch.Tensor:
    out = values.clone()
    torch.distributed.all_reduce(out, group=ctx.dp_group)
    return out / ctx.dp


def train_one(name: str, args: argparse.Namespace, ctx: Parallel, train_data: torch.Tensor,
              initial_state: dict | None) -> tuple[RunResult, dict]:
    """Train one optimizer from the initial weights; return its results and those weights."""
    config = build_transformer_config(args, ctx)
    model = build_model(config, args)
    parameters = count_parameters(model, ctx)
    if initial_state is None:
        print0(ctx, f"GPTModel: {parameters[0]:,} parameters ({parameters[1]:,} on rank 0)")
        initial_state = snapshot(model)
    elif not restore(model, initial_state):
        print(f"rank {ctx.rank}: note: rebuilding with seed {args.seed} gave other weights than the "
              "first run; the first run's initial weights were loaded instead", flush=True)
    model = wrap_ddp(config, model, args)
    optimizer = build_optimizer(name, args, model)
    print0(ctx, f"{LABELS[name]}: {describe_optimizer(optimizer)}")
    scheduler = build_scheduler(optimizer, name, args)

    # What Megatron's training loop hangs on the config (training.py: grad_scale_func for the
    # fp16 loss scale; finalize_model_grads, which the schedule then calls after backward).
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads

    run = run_iterations(name, args, ctx, model, optimizer, scheduler, micro_batches(train_data, args, ctx))
    result = summarize(name, args, ctx, optimizer, run, parameters)
    if args.layout_json and is_magma(name):
        result.layout = record_of_optimizer(optimizer)  # host data; None without a sparse gather
    del optimizer, scheduler, model, config, run
    gc.collect()
    torch.cuda.empty_cache()
    return result, initial_state


@dataclass
class Measured:
    """What one run's training loop measured, read after its last iteration."""

    losses: torch.Tensor  # per iteration, this DP rank's loss, on the GPU
    iteration: EventTimer
    wrapper_step: EventTimer
    inner_step: EventTimer
    param_sync: EventTimer
    skipped_steps: int
    sync_bytes: SyncBytes  # summed over the steps after warm-up that ran (Magma runs only)
    sync_steps: int


def sync_bytes_reader(name: str, args: argparse.Namespace):
    """``param_sync_bytes`` for a Magma run with the distributed optimizer (host values: reading
    them does not synchronise), else None (Adam's dense figure is taken from a Magma run)."""
    if not (is_magma(name) and args.distributed_optimizer):
        return None
    return param_sync_bytes


def run_iterations(name: str, args: argparse.Namespace, ctx: Parallel, model: DistributedDataParallel,
                   optimizer, scheduler: OptimizerParamScheduler, data) -> Measured:
    """The training loop of Megatron's train_step, with CUDA events and no per-step host reads."""
    forward_backward = get_forward_backward_func()
    position_ids = torch.arange(args.seq_len, device="cuda").unsqueeze(0).expand(args.micro_batch, -1)
    step_func = partial(forward_step, position_ids)
    run = Measured(losses=torch.zeros(args.steps, dtype=torch.float32, device="cuda"),
                   iteration=EventTimer(), wrapper_step=EventTimer(), inner_step=EventTimer(),
                   param_sync=EventTimer(), skipped_steps=0, sync_bytes=SyncBytes(), sync_steps=0)
    time_inner_steps(optimizer, run.inner_step)
    time_param_syncs(optimizer, run.param_sync)
    read_sync_bytes = sync_bytes_reader(name, args)
    for it in range(args.steps):
        for timer in (run.iteration, run.wrapper_step, run.inner_step, run.param_sync):
            timer.next_iteration()
        iteration_start = run.iteration.start()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(forward_step_func=step_func, data_iterator=data, model=[model],
                                   num_microbatches=1, seq_length=args.seq_len,
                                   micro_batch_size=args.micro_batch, decoder_seq_length=args.seq_len,
                                   forward_only=False)
        run.losses[it].copy_(reduced[0]["lm loss"])
        step_start = run.wrapper_step.start()
        update_successful, grad_norm, _ = optimizer.step()
        run.wrapper_step.stop(step_start)
        if update_successful:  # as Megatron's train_step: a skipped (fp16 overflow) step keeps the lr
            scheduler.step(increment=1)
            if read_sync_bytes is not None and it >= args.warmup_steps:  # a skipped step syncs nothing
                run.sync_bytes += read_sync_bytes(optimizer)
                run.sync_steps += 1
        else:
            run.skipped_steps += 1
        run.iteration.stop(iteration_start)
        if (it + 1) % args.log_every == 0 or it + 1 == args.steps:
            log_progress(name, it, args, ctx, run.losses, optimizer, grad_norm)
    return run


def summarize(name: str, args: argparse.Namespace, ctx: Parallel, optimizer, run: Measured,
              parameters: tuple[int, int]) -> RunResult:
    """Medians after the warm-up steps (this rank's events), the DP-mean final loss and this
    rank's mean parameter-sync bytes per step. A run whose param_sync_bytes reported no dense
    bytes (Magma with Megatron's own gather, if the optimizer leaves its figures at zero)
    keeps None: the table shows the dense figure for it, as for Adam."""
    iteration_ms = median_after_warmup(run.iteration.milliseconds(), args.warmup_steps)
    moved, steps = run.sync_bytes, run.sync_steps
    reported = steps > 0 and moved.dense_sent + moved.dense_received > 0
    return RunResult(
        name=name,
        inner=inner_class_name(optimizer),
        wrapper=type(optimizer.chained_optimizers[0]).__name__,
        final_loss=dp_mean(run.losses, ctx)[-LOSS_WINDOW:].mean().item(),
        tokens_per_s=ctx.dp * args.micro_batch * args.seq_len / (iteration_ms / 1e3),
        iteration_ms=iteration_ms,
        wrapper_step_ms=median_after_warmup(run.wrapper_step.milliseconds(), args.warmup_steps),
        inner_step_ms=median_after_warmup(run.inner_step.milliseconds(), args.warmup_steps),
        skipped_steps=run.skipped_steps,
        parameters=parameters,
        param_sync_ms=median_after_warmup(run.param_sync.milliseconds(), args.warmup_steps),
        sync_bytes=(moved.sent + moved.received) / steps if reported else None,
        dense_bytes=(moved.dense_sent + moved.dense_received) / steps if reported else None,
    )


def log_progress(name: str, it: int, args: argparse.Namespace, ctx: Parallel, losses: torch.Tensor,
                 optimizer, grad_norm) -> None:
    """One line on rank 0 (a DP all-reduce on every rank: the only per-log host sync we add)."""
    loss = dp_mean(losses[it], ctx).item()
    lr = optimizer.param_groups[0]["lr"]
    norm = "skipped" if grad_norm is None else f"{float(grad_norm):.3f}"
    scale = f"  loss scale {optimizer.get_loss_scale().item():g}" if args.dtype == "fp16" else ""
    print0(ctx, f"{LABELS[name]:>12} step {it + 1:>5}/{args.steps}  loss {loss:.4f}  "
                f"lr {float(lr):.3e}  grad norm {norm}{scale}")


def main(argv: list[str] | None = None) -> list[RunResult]:
    args = parse_args(argv, description=__doc__.splitlines()[0])
    ctx = setup_parallel(args)
    train_data, _ = load_corpus()
    print0(ctx, f"data: {len(train_data):,} training bytes of the demo corpus; tp {ctx.tp}, dp {ctx.dp}, "
                f"{args.dtype}, distributed optimizer {'on' if args.distributed_optimizer else 'off'}")
    rounds, initial_state = [], None
    for order in run_order(args):
        rounds.append([])
        for name in order:
            result, initial_state = train_one(name, args, ctx, train_data, initial_state)
            rounds[-1].append(result)
    results = median_over_rounds(rounds)

    if ctx.rank == 0:
        print()
        print("\n".join(describe_setup(args, results)))
        print()
        print(format_table(results), flush=True)
        if len(rounds) > 1:
            print()
            print(rounds_table(rounds), flush=True)
        if args.table:
            device = f"{ctx.world} x {torch.cuda.get_device_name()}"
            versions = f"torch {torch.__version__}; megatron-core {megatron.core.__version__}"
            Path(args.table).write_text(markdown_report(args, results, device, versions, rounds))
            print(f"wrote {args.table}", flush=True)
        if args.layout_json:
            write_layout(args.layout_json, results)
    teardown_parallel()
    return results


if __name__ == "__main__":
    main()
