"""Train megatron-core's GPTModel with Megatron's Adam and with Magma, and compare them.

One process per GPU under ``torchrun``; from the repository root::

    torchrun --nproc-per-node 2 examples/megatron_gpt.py --tp 2
    torchrun --nproc-per-node 2 examples/megatron_gpt.py --dp 2 --distributed-optimizer
    torchrun --nproc-per-node 2 examples/megatron_gpt.py --dp 2 --fp16 --table megatron_gpt.md
    torchrun --nproc-per-node 2 examples/megatron_gpt.py --dp 2 --distributed-optimizer \
        --param-gather both --keep-prob 0.5 --layout-json layout.json

Needs Python >= 3.12, a CUDA build of torch, ``megatron-core==0.19.2`` and this package
(``magma_ext``, with ``magma_ext.megatron``). Transformer Engine and apex are not used: the
model is built from ``get_gpt_layer_local_spec()`` (Megatron-core's own modules) and Megatron
falls back to ``torch.optim.AdamW`` for Adam. Sequence parallelism is on when ``--tp`` > 1,
with torch LayerNorms marked for it (``SequenceParallelLayerNorm``: the local spec's own norm
refuses it without apex).

What it does, per run (``--optimizer both``: Adam first, then Magma, in one process;
``--param-gather both`` adds a third run, "Magma+sparse"; ``--magma-first`` puts the Magma
runs before Adam):

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
``--warmup-steps`` iterations; ``--table PATH`` also writes it as Markdown. With
``--distributed-optimizer`` the table also gives the median time of the parameter all-gather
(CUDA events around each part's ``start_param_sync_for_bucket_group_subset``) and the bytes
rank 0 sent and received in it per step (``magma_ext.megatron.param_sync_bytes``; Adam's and
a dense-gather Magma run's are the dense all-gather's), each against the dense gather.
``--layout-json PATH`` writes the sparse gather's bucket layout record
(``magma_ext.megatron.param_layout_record``), which
``python benchmarks/sparse_gather_projection.py PATH`` projects to other DP sizes.
``--overlap-param-gather`` turns on Megatron's ``overlap_grad_reduce`` and
``overlap_param_gather``: each bucket group's parameter all-gather (sparse or dense) then runs
from the next forward pass's pre-hooks, so it has no time column of its own; tokens/s shows
what it costs.
"""

from __future__ import annotations

import os

# NVLink multicast (NVLS) off, before torch.distributed or NCCL starts: it is not usable on
# every machine and a failed multicast set-up can hang the first collective.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse
import copy
import gc
import json
import shlex
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

try:
    from magma_ext.demo.data import batches, load_corpus
except ImportError:  # a checkout that is not installed: use the package next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from magma_ext.demo.data import batches, load_corpus
from magma_ext.megatron.sparse_gather import SyncBytes  # no megatron-core import

import megatron.core
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

VOCAB_SIZE = 256  # byte-level tokens
LABELS = {"adam": "Adam", "magma": "Magma", "magma+sparse": "Magma+sparse"}
LOSS_WINDOW = 10  # the final loss is the mean over this many last steps


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parse_block(text: str) -> str | int:
    """Magma's masking unit: ``tensor``, ``row`` or a chunk size N >= 1."""
    if text in ("tensor", "row"):
        return text
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'tensor', 'row' or an integer >= 1, got {text!r}")
    if size < 1:
        raise argparse.ArgumentTypeError(f"a block of {size} elements: it must be at least 1")
    return size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--dp", type=int, default=None,
                   help="data-parallel size; must equal world size / --tp (the default)")
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="shard the optimizer over DP ranks with Megatron's DistributedOptimizer")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="dtype", action="store_const", const="bf16",
                           help="bf16 model, fp32 main parameters (the default)")
    precision.add_argument("--fp16", dest="dtype", action="store_const", const="fp16",
                           help="fp16 model, fp32 main parameters, dynamic loss scaling")
    p.set_defaults(dtype="bf16")
    p.add_argument("--optimizer", choices=("magma", "adam", "both"), default="both",
                   help="both: Adam, then Magma, from the same initial weights and data order")
    p.add_argument("--magma-first", action="store_true", help="with --optimizer both: run Magma (both Magma "
                   "runs with --param-gather both) before Adam")
    p.add_argument("--param-gather", choices=("dense", "sparse", "both"), default="dense",
                   help="the distributed optimizer's parameter all-gather in the Magma run: dense (Megatron's), "
                        "sparse (only the kept blocks: sparse_param_gather=True) or both (two Magma runs)")
    p.add_argument("--overlap-param-gather", action="store_true",
                   help="Megatron's overlap_grad_reduce and overlap_param_gather: each bucket group's parameter "
                        "all-gather runs from the next forward pass's pre-hooks (no param-sync time column: the "
                        "gather is inside the forward)")
    p.add_argument("--layout-json", default=None,
                   help="write the sparse gather's bucket layout record as JSON to this file "
                        "(for benchmarks/sparse_gather_projection.py)")
    p.add_argument("--keep-prob", type=float, default=0.5, help="Magma: probability of keeping a block")
    p.add_argument("--block", type=parse_block, default="tensor", help="Magma: tensor, row or N elements")
    p.add_argument("--seed", type=int, default=1234, help="weights, data order and Magma's masks")
    p.add_argument("--steps", type=int, default=100, help="training iterations per optimizer")
    p.add_argument("--warmup-steps", type=int, default=10, help="first iterations left out of the timings")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512, help="tokens (bytes) per sequence")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per DP rank per iteration")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's peak learning rate")
    p.add_argument("--magma-lr", type=float, default=2e-3, help="Magma's peak learning rate")
    p.add_argument("--table", default=None, help="also write the results as Markdown to this file")
    p.add_argument("--log-every", type=int, default=10, help="iterations between progress lines")
    args = p.parse_args(argv)

    if "WORLD_SIZE" not in os.environ:
        p.error("run me under torchrun, e.g. torchrun --nproc-per-node 2 examples/megatron_gpt.py --tp 2")
    world = int(os.environ["WORLD_SIZE"])
    if args.tp < 1 or world % args.tp:
        p.error(f"--tp {args.tp} does not divide the world size {world}")
    if args.dp is None:
        args.dp = world // args.tp
    if args.dp != world // args.tp:
        p.error(f"--dp {args.dp} does not match the world size: {world} ranks / --tp {args.tp} "
                f"= {world // args.tp} data-parallel ranks (pipeline parallelism is 1 here)")
    for name in ("steps", "layers", "hidden", "heads", "seq_len", "micro_batch", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.warmup_steps < args.steps:
        p.error(f"--warmup-steps {args.warmup_steps} must be in [0, --steps {args.steps})")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    if args.heads % args.tp or VOCAB_SIZE % args.tp:
        p.error(f"--tp {args.tp} must divide --heads {args.heads} and the vocabulary ({VOCAB_SIZE})")
    if not 0.0 < args.keep_prob <= 1.0:
        p.error(f"--keep-prob {args.keep_prob} is not in (0, 1]: at 0 Magma would change no masked weight")
    if args.lr <= 0 or args.magma_lr <= 0:
        p.error("--lr and --magma-lr must be positive")
    if args.param_gather != "dense" and not args.distributed_optimizer:
        p.error(f"--param-gather {args.param_gather} needs --distributed-optimizer: the sparse gather replaces "
                "the distributed optimizer's parameter all-gather")
    if args.param_gather != "dense" and args.optimizer == "adam":
        p.error(f"--param-gather {args.param_gather} needs a Magma run (--optimizer magma or both)")
    if args.overlap_param_gather and not args.distributed_optimizer:
        p.error("--overlap-param-gather needs --distributed-optimizer (without it there is no parameter all-gather)")
    if args.layout_json and args.param_gather == "dense":
        p.error("--layout-json records the sparse gather's layout: it needs --param-gather sparse or both")
    return args


def run_names(args: argparse.Namespace) -> list[str]:
    """The runs, in order: Adam, then Magma with the dense and/or the sparse parameter gather
    (``--magma-first``: the Magma runs first)."""
    adam = ["adam"] if args.optimizer in ("adam", "both") else []
    magma = [] if args.optimizer == "adam" else {
        "dense": ["magma"], "sparse": ["magma+sparse"], "both": ["magma", "magma+sparse"]}[args.param_gather]
    return magma + adam if args.magma_first else adam + magma


def is_magma(name: str) -> bool:
    return name != "adam"


def is_sparse(name: str) -> bool:
    """Whether the run's parameter all-gather moves only the kept blocks."""
    return name == "magma+sparse"


# --------------------------------------------------------------------------------------------
# Parallel set-up
# --------------------------------------------------------------------------------------------

@dataclass
class Parallel:
    rank: int
    world: int
    tp: int
    dp: int
    dp_rank: int
    dp_group: torch.distributed.ProcessGroup
    tp_group: torch.distributed.ProcessGroup
    sequence_parallel: bool


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """torch's LayerNorm marked for Megatron's sequence parallelism, as apex's FusedLayerNorm
    marks itself: its grads are all-reduced over tensor-parallel ranks by finalize_model_grads.
    (The local spec's own torch norm refuses sequence parallelism.)"""

    def __init__(self, config, hidden_size, eps=1e-5, **unused):
        super().__init__(hidden_size, eps=eps)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


def block_spec(num_layers: int) -> TransformerBlockSubmodules:
    """The local spec's layers with norms that run sequence-parallel."""
    layer = get_gpt_layer_local_spec()
    layer.submodules.input_layernorm = SequenceParallelLayerNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=SequenceParallelLayerNorm)


def setup_parallel(args: argparse.Namespace) -> Parallel:
    """One GPU per process, NCCL, then Megatron's TP x DP groups (PP = 1) and RNG trackers."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp,
                                             pipeline_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    sequence_parallel = args.tp > 1
    if sequence_parallel and args.seq_len % args.tp:
        raise ValueError(f"sequence parallelism splits --seq-len {args.seq_len} over --tp {args.tp} ranks")
    return Parallel(
        rank=torch.distributed.get_rank(),
        world=torch.distributed.get_world_size(),
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_group=parallel_state.get_data_parallel_group(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        sequence_parallel=sequence_parallel,
    )


def teardown_parallel() -> None:
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def print0(ctx: Parallel, *values) -> None:
    if ctx.rank == 0:
        print(*values, flush=True)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def model_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.dtype == "bf16" else torch.float16


def build_transformer_config(args: argparse.Namespace, ctx: Parallel) -> TransformerConfig:
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
        use_cpu_initialization=True,  # same weights on every rank and for any TP size
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
    """GPTModel from the local spec on the GPU, cast to bf16/fp16 as Megatron's get_model does."""
    seed_everything(args.seed)
    model = GPTModel(config=config, transformer_layer_spec=block_spec(args.layers),
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


def count_parameters(model: torch.nn.Module, ctx: Parallel) -> tuple[int, int]:
    """(parameters of the whole model, parameters held by this rank)."""
    split = sum(p.numel() for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    local = sum(p.numel() for p in model.parameters())
    total_split = torch.tensor(split, dtype=torch.int64, device="cuda")
    torch.distributed.all_reduce(total_split, group=ctx.tp_group)
    return int(total_split.item()) + (local - split), local


def wrap_ddp(config: TransformerConfig, model: Float16Module, args: argparse.Namespace) -> DistributedDataParallel:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_param_gather,
        use_distributed_optimizer=args.distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


# --------------------------------------------------------------------------------------------
# Optimizers and schedule
# --------------------------------------------------------------------------------------------

def peak_lr(name: str, args: argparse.Namespace) -> float:
    return args.magma_lr if is_magma(name) else args.lr


def build_optimizer_config(name: str, args: argparse.Namespace) -> OptimizerConfig:
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
    """Megatron's ChainedOptimizer around AdamW (Adam) or Magma (Magma+sparse: with the sparse
    parameter gather)."""
    config = build_optimizer_config(name, args)
    if name == "adam":
        return get_megatron_optimizer(config, [model])
    from magma_ext.megatron import get_megatron_magma_optimizer

    return get_megatron_magma_optimizer(config, [model], keep_prob=args.keep_prob,
                                        block=args.block, seed=args.seed, sparse_param_gather=is_sparse(name))


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
    names = {type(part.optimizer).__name__ for part in optimizer.chained_optimizers
             if getattr(part, "optimizer", None) is not None}
    return "+".join(sorted(names)) or "none"


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

class EventTimer:
    """CUDA events around calls, grouped by iteration; read once, after the last iteration."""

    def __init__(self):
        self.iterations: list[list[tuple[torch.cuda.Event, torch.cuda.Event]]] = []

    def next_iteration(self) -> None:
        self.iterations.append([])

    def start(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, start: torch.cuda.Event) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.iterations[-1].append((start, end))

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = self.start()
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(start)
        return timed

    def milliseconds(self) -> list[float | None]:
        """Per iteration, the summed time of its calls (None where nothing was called)."""
        torch.cuda.synchronize()
        return [sum(s.elapsed_time(e) for s, e in calls) if calls else None for calls in self.iterations]


def time_inner_steps(optimizer, timer: EventTimer) -> None:
    """Put CUDA events around each inner optimizer's step() (Megatron calls it with no arguments)."""
    for part in optimizer.chained_optimizers:
        inner = getattr(part, "optimizer", None)
        if inner is not None:
            inner.step = timer.wrap(inner.step)


def time_param_syncs(optimizer, timer: EventTimer) -> None:
    """Put CUDA events around each distributed-optimizer part's parameter all-gather: Megatron's
    step_with_ready_grads launches it through the part's start_param_sync_for_bucket_group_subset()
    (wrapped on the instance, so the call finds the timed one; other wrappers have no such method)."""
    for part in optimizer.chained_optimizers:
        launch = getattr(part, "start_param_sync_for_bucket_group_subset", None)
        if launch is not None:
            part.start_param_sync_for_bucket_group_subset = timer.wrap(launch)


def median_after_warmup(values: list[float | None], warmup: int) -> float | None:
    kept = [v for v in values[warmup:] if v is not None]
    return statistics.median(kept) if kept else None


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

@dataclass
class RunResult:
    name: str
    inner: str
    wrapper: str
    final_loss: float
    tokens_per_s: float
    iteration_ms: float
    wrapper_step_ms: float
    inner_step_ms: float | None
    skipped_steps: int
    parameters: tuple[int, int]  # (whole model, this rank)
    param_sync_ms: float | None  # the distributed optimizer's parameter all-gather (None without it)
    sync_bytes: float | None  # sent + received per step by rank 0, as param_sync_bytes reports it
    dense_bytes: float | None  # the same for a dense all-gather (None: nothing reported, see summarize)
    layout: dict | None = None  # param_layout_record, kept for --layout-json


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
        from magma_ext.megatron import param_layout_record

        result.layout = param_layout_record(optimizer)  # host data; None without a sparse gather
    del optimizer, scheduler, model, config, run
    gc.collect()
    torch.cuda.empty_cache()
    return result, initial_state


@dataclass
class Measured:
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
    from magma_ext.megatron import param_sync_bytes

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


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.3f}" if value is not None and base else "—"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _mib(value: float | None) -> str:
    return "dense" if value is None else f"{value / 2**20:,.1f} MiB"


def param_sync_cells(r: RunResult, results: list[RunResult]) -> str:
    """The parameter-sync columns of one row: its median time, that over the dense-gather Magma
    run's (Adam's without one), its bytes per step and those over the dense gather's. A run that
    reported no bytes (Adam, a dense-gather Magma run) moves the dense figure, which a Magma run
    reported; "dense" where none did."""
    if r.param_sync_ms is None:
        return "| — | — | — | — |"
    by_name = {x.name: x for x in results}
    base = by_name.get("magma") or by_name.get("adam")
    if r.sync_bytes is not None:
        moved, versus = _mib(r.sync_bytes), _ratio(r.sync_bytes, r.dense_bytes)
    else:
        moved, versus = _mib(next((x.dense_bytes for x in results if x.dense_bytes), None)), "1.000"
    timed = _ratio(r.param_sync_ms, base and base.param_sync_ms)
    return f"| {_ms(r.param_sync_ms)} | {timed} | {moved} | {versus} |"


def format_table(results: list[RunResult]) -> str:
    """The comparison as a Markdown table; ratios are to the Adam row when there is one. With
    the distributed optimizer, four parameter-sync columns follow (:func:`param_sync_cells`)."""
    adam = next((r for r in results if r.name == "adam"), None)
    sync = any(r.param_sync_ms is not None for r in results)
    lines = [
        "| run | optimizer | final loss | tokens/s | vs Adam | iteration ms | wrapper step ms "
        "| inner step ms | inner step vs Adam |"
        + (" param sync ms | param sync vs dense | sync bytes/step | bytes vs dense |" if sync else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" * 4 if sync else ""),
    ]
    for r in results:
        lines.append(
            f"| {LABELS[r.name]} | {r.inner} | {r.final_loss:.4f} | {r.tokens_per_s:,.0f} "
            f"| {_ratio(r.tokens_per_s, adam and adam.tokens_per_s)} | {_ms(r.iteration_ms)} "
            f"| {_ms(r.wrapper_step_ms)} | {_ms(r.inner_step_ms)} "
            f"| {_ratio(r.inner_step_ms, adam and adam.inner_step_ms)} "
            + (param_sync_cells(r, results) if sync else "|"))
    return "\n".join(lines)


def describe_setup(args: argparse.Namespace, ctx: Parallel, results: list[RunResult]) -> list[str]:
    total, per_rank = results[0].parameters
    wrapper = results[0].wrapper
    skipped = ", ".join(f"{LABELS[r.name]} {r.skipped_steps}" for r in results)
    return [
        f"- model: GPTModel (local spec), {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
        f"vocab {VOCAB_SIZE}, seq {args.seq_len}: {total:,} parameters ({per_rank:,} on rank 0); {args.dtype}",
        f"- parallelism: tp {ctx.tp}, dp {ctx.dp}, sequence parallel {'on' if ctx.sequence_parallel else 'off'}, "
        f"distributed optimizer {'on' if args.distributed_optimizer else 'off'} (wrapper {wrapper})"
        + (f", parameter gather {args.param_gather}" if args.distributed_optimizer else "")
        + (", overlap_grad_reduce and overlap_param_gather on" if args.overlap_param_gather else ""),
        f"- Magma: keep_prob {args.keep_prob:g}, block {args.block}, seed {args.seed}, lr {args.magma_lr:g}; "
        f"Adam: lr {args.lr:g}; both: betas (0.9, 0.95), weight decay 0.1, clip 1.0, "
        f"warm-up {int(0.1 * args.steps)} steps then cosine to lr/10",
        f"- {args.steps} steps of {ctx.dp} x {args.micro_batch} x {args.seq_len} tokens; timings: medians of "
        f"rank 0 over steps {args.warmup_steps + 1}-{args.steps} (sync bytes: rank 0's mean over those "
        f"steps); final loss: mean of the last "
        f"{min(LOSS_WINDOW, args.steps)} steps over DP ranks; skipped (overflow) steps: {skipped}",
    ]


def markdown_report(args: argparse.Namespace, ctx: Parallel, results: list[RunResult]) -> str:
    command = f"torchrun --nproc-per-node {ctx.world} " + shlex.join(sys.argv)
    lines = [
        "# megatron-core GPTModel: Magma vs Adam",
        "",
        f"- device: {ctx.world} x {torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"megatron-core {megatron.core.__version__}; date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        *describe_setup(args, ctx, results),
        f"- command: `{command}`",
        "",
        format_table(results),
        "",
        "Iteration: CUDA events around zero_grad, forward-backward (Megatron's schedule, with the DP "
        "gradient reduction), optimizer step and scheduler step. Wrapper step: around Megatron's "
        "`optimizer.step()` (grad copy, unscale, clipping, the inner step, copy back to the model and, "
        "with the distributed optimizer, the parameter all-gather). Inner step: around the inner "
        "optimizer's own `step()`. tokens/s: global tokens per iteration / median iteration.",
    ]
    if any(r.param_sync_ms is not None for r in results):
        lines[-1] += (
            " Param sync: around each distributed-optimizer part's `start_param_sync_for_bucket_group_subset()`, "
            "the parameter all-gather after the inner step (Megatron's dense all-gather of every bucket, or "
            "with Magma+sparse one all-gather per dtype of the kept blocks' elements, packed and padded to "
            "the largest rank's count, with its host-side layout); param sync vs dense: over the median of "
            "the Magma run with the dense gather (over Adam's without one). Sync bytes/step: bytes rank 0 "
            "sent plus received in that sync per step (`magma_ext.megatron.param_sync_bytes`), mean over "
            "the timed steps that ran (an fp16 overflow step syncs nothing); Adam and a dense-gather Magma run move the dense figure. Bytes vs dense: "
            "mean sent + received over the mean a dense all-gather of the same buckets moves (bucket and "
            "packing padding included).")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def write_layout(path: str, results: list[RunResult]) -> None:
    """--layout-json: the Magma+sparse run's bucket layout record, else that of the one run with one."""
    recorded = [r for r in results if r.layout is not None]
    chosen = next((r for r in recorded if is_sparse(r.name)), recorded[0] if recorded else None)
    if chosen is None:
        print(f"note: no run has a sparse parameter gather: {path} not written", flush=True)
        return
    Path(path).write_text(json.dumps(chosen.layout))
    print(f"wrote {path} ({LABELS[chosen.name]}'s bucket layout; project it with "
          f"python benchmarks/sparse_gather_projection.py {path})", flush=True)


def main(argv: list[str] | None = None) -> list[RunResult]:
    args = parse_args(argv)
    ctx = setup_parallel(args)
    train_data, _ = load_corpus()
    print0(ctx, f"data: {len(train_data):,} training bytes of the demo corpus; tp {ctx.tp}, dp {ctx.dp}, "
                f"{args.dtype}, distributed optimizer {'on' if args.distributed_optimizer else 'off'}")
    names = run_names(args)

    results, initial_state = [], None
    for name in names:
        result, initial_state = train_one(name, args, ctx, train_data, initial_state)
        results.append(result)

    if ctx.rank == 0:
        print()
        print("\n".join(describe_setup(args, ctx, results)))
        print()
        print(format_table(results), flush=True)
        if args.table:
            Path(args.table).write_text(markdown_report(args, ctx, results))
            print(f"wrote {args.table}", flush=True)
        if args.layout_json:
            write_layout(args.layout_json, results)
    teardown_parallel()
    return results


if __name__ == "__main__":
    main()
