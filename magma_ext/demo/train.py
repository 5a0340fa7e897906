"""The training loop of the demo, and the two optimizers it compares.

:func:`train` builds a fresh model from a seed, trains it with whatever optimizer the
factory returns under a linear-warmup + cosine-decay schedule, evaluates it periodically
and returns its curves and metrics. Everything that is not the optimizer (init, data order,
schedule, clipping, evaluation) depends only on the arguments, so two calls that differ
only in ``optimizer_factory`` are a fair comparison.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from .. import Magma, decay_groups, param_groups

from . import data as data_lib
from .model import Llama, LlamaConfig

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]

# Betas shared by both optimizers: the usual choice for language-model pre-training.
BETAS = (0.9, 0.95)


# Default peak learning rates, one per optimizer: Magma writes about a quarter of the dense
# update on average (a block is kept with probability 0.5 and scaled by a score near 0.5), so
# sharing AdamW's rate would handicap it. The values are the best of each optimizer's grid at
# the smallest size of the convergence study (benchmarks/results/convergence.md, "10M" row of
# its Results table; records in benchmarks/results/convergence/conv_10m*_h100_2026-11-23.json:
# AdamW 1e-3, mean final val ppl 3.4330 over 2 seeds; Magma-Adam 2e-3, 3.4919), the size
# closest to the demo's default 0.9M-parameter model. At 50M the best were 5e-4 and 1e-3.
# (That study's Magma runs also masked the LM head, as param_groups did before issue 9.)
ADAMW_LR = 1e-3
MAGMA_LR = 2e-3


def adamw_factory(lr: float = ADAMW_LR, weight_decay: float = 0.1) -> OptimizerFactory:
    """``torch.optim.AdamW`` over ``magma_ext.decay_groups``: it decays exactly what
    ``magma_ext.param_groups`` decays for Magma."""
    def make(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=BETAS)
    return make


def magma_factory(lr: float = MAGMA_LR, weight_decay: float = 0.1, **magma_kwargs) -> OptimizerFactory:
    """``magma_ext.Magma`` (default base="adam", mask="magma") over ``magma_ext.param_groups``
    (attention and MLP weights masked; LM head, embedding and norms not);
    ``magma_kwargs`` (keep_prob, seed, ...) go to the constructor."""
    def make(model: nn.Module) -> torch.optim.Optimizer:
        return Magma(param_groups(model, weight_decay=weight_decay), lr=lr, betas=BETAS, **magma_kwargs)
    return make


# final_train_loss is the mean train loss of this many last steps.
TRAIN_LOSS_WINDOW = 10


def timed_steps(steps: int) -> range:
    """The steps (1-based) that ms_per_step and tokens/s average: all but the first (which
    also pays for lazy initialisation), or the only one."""
    return range(2 if steps > 1 else 1, steps + 1)


def _mean_step_seconds(step_times: list[float]) -> float:
    timed = step_times[timed_steps(len(step_times))[0] - 1:]
    return sum(timed) / len(timed)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return nullcontext()
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")


@torch.no_grad()
def evaluate(model: nn.Module, val_set: list[tuple[torch.Tensor, torch.Tensor]], autocast) -> float:
    """Mean cross-entropy (nats per byte) over the fixed validation batches."""
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in val_set:
        with autocast:
            total += model(inputs, targets).item() * targets.numel()
        count += targets.numel()
    model.train()
    return total / count


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model_cfg: LlamaConfig, optimizer_factory: OptimizerFactory,
          train_data: torch.Tensor, val_data: torch.Tensor, *,
          steps: int, batch_size: int, seq_len: int,
          warmup_steps: int | None = None, grad_clip: float = 1.0,
          eval_every: int = 25, eval_batches: int = 4,
          seed: int = 0, device: str | torch.device = "cpu", dtype: str = "float32",
          name: str = "", progress: bool = True) -> dict:
    """Train a fresh :class:`Llama` and return its curves and metrics.

    Returns a dict with ``train_loss`` ([step, loss] per step), ``val_loss`` ([step, loss]
    at step 0, every ``eval_every`` steps and the last step), ``final_train_loss`` (mean of
    the last :data:`TRAIN_LOSS_WINDOW` steps, as one step is noisy), ``final_val_loss``,
    ``final_val_ppl`` (per byte), ``ms_per_step`` and ``tokens_per_s`` (over the steps
    :func:`timed_steps` names, evaluation excluded), ``wall_s`` (the whole call) and
    ``peak_mem_bytes`` (CUDA only, else None). The progress lines show the same tokens/s,
    over the steps so far, so that the last one agrees with ``tokens_per_s``.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    device = torch.device(device)
    wall_start = time.perf_counter()
    torch.manual_seed(seed)
    model = Llama(model_cfg).to(device)
    optimizer = optimizer_factory(model)
    warmup_steps = max(1, steps // 10) if warmup_steps is None else max(1, warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, steps, warmup_steps))
    autocast = _autocast(device, dtype)
    train_iter = data_lib.batches(train_data, batch_size, seq_len, seed=seed, device=device)
    val_set = data_lib.eval_batches(val_data, batch_size, seq_len, eval_batches, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    train_curve, val_curve, step_times = [], [], []
    val_curve.append([0, evaluate(model, val_set, autocast)])
    tokens_per_step = batch_size * seq_len
    for step in range(1, steps + 1):
        inputs, targets = next(train_iter)
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss = model(inputs, targets)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss_value = loss.item()  # also waits for the device, so the timing below is honest
        step_times.append(time.perf_counter() - t0)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"{name or 'run'}: loss became {loss_value} at step {step}")
        train_curve.append([step, loss_value])

        evaluated = step % eval_every == 0 or step == steps
        if evaluated:
            val_curve.append([step, evaluate(model, val_set, autocast)])
        if progress:
            _print_progress(name, step, steps, loss_value, val_curve[-1][1],
                            tokens_per_step / _mean_step_seconds(step_times), evaluated)

    ms_per_step = 1000.0 * _mean_step_seconds(step_times)
    last = [loss for _, loss in train_curve[-TRAIN_LOSS_WINDOW:]]
    final_val = val_curve[-1][1]
    return {
        "name": name,
        "train_loss": train_curve,
        "val_loss": val_curve,
        "final_train_loss": sum(last) / len(last),
        "final_val_loss": final_val,
        "final_val_ppl": math.exp(final_val),
        "ms_per_step": ms_per_step,
        "tokens_per_s": tokens_per_step / (ms_per_step / 1000.0),
        "wall_s": time.perf_counter() - wall_start,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "num_parameters": model.num_parameters(),
    }


def _print_progress(name: str, step: int, steps: int, loss: float, val_loss: float,
                    tokens_per_s: float, evaluated: bool) -> None:
    """One progress line, rewritten in place on a terminal and kept after each evaluation;
    when stdout is not a terminal (a log file), only the lines after evaluations. ``loss`` is
    this step's, ``val_loss`` the last evaluation's, ``tokens_per_s`` the mean so far."""
    line = (f"[{name}] step {step:>{len(str(steps))}}/{steps}  loss {loss:.4f}  "
            f"val {val_loss:.4f}  {tokens_per_s:,.0f} tok/s (mean so far)")
    if sys.stdout.isatty():
        print("\r" + line.ljust(79), end="\n" if evaluated else "", flush=True)
    elif evaluated:
        print(line, flush=True)
