"""The training loop of the study: one run, as fast as one process can make it.

Model, initialisation and schedule are the demo's (``magma_ext.demo``: :class:`Llama`,
``lr_multiplier``), so a run differs from the demo's loop only in what makes it fast and in
how it reads data:

- ``torch.compile`` of the model and bfloat16 autocast on CUDA (eager float32 on CPU);
- no host sync per step: each step's loss stays on the device until an evaluation reads the
  losses since the last one (that is also where a non-finite loss is noticed);
- the training split lives on the device and a step's windows are gathered there, in a seeded
  random order without replacement (no byte is read twice; :func:`.corpus.check_fits`), or,
  where the size allows more passes than one and the corpus is short, in a new random order
  for each further pass;
- the learning rate is set in the optimizer's groups before each step (no scheduler object),
  so a checkpoint holds only the model, the optimizer and the step.

A run saves a checkpoint at every evaluation and when ``stop_at`` (a ``time.time()``) has
passed, and goes on from the checkpoint of the same run, if there is one, when started again:
a run longer than one device call finishes over several calls of one warm machine. The curves
and the timing of the earlier calls travel in the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from magma_ext.demo import Llama
from magma_ext.demo.train import lr_multiplier

from . import corpus as corpus_lib
from .definition import Recipe, Size
from .optimizers import build

GRAD_CLIP = 1.0
# Steps of each call excluded from the tokens/s figure: torch.compile and the allocator warm up.
WARM_STEPS = 10


class Diverged(FloatingPointError):
    """A training or validation loss became non-finite."""


@dataclass
class RunJob:
    """Everything one run needs besides its data. ``data_sha1`` (the corpus's content SHA-1)
    keeps a checkpoint from being taken up on other data of the same length."""

    run_id: str
    size: Size
    lr: float
    seed: int
    weight_decay: float
    data_sha1: str | None = None
    dtype: str = "float32"
    compile: str = "none"
    checkpoint_dir: str | None = None
    stop_at: float | None = None  # time.time() after which the run checkpoints and stops


def load_split(path: str, device: torch.device) -> torch.Tensor:
    """A split of the corpus (raw bytes) as a uint8 tensor on ``device``."""
    size = os.path.getsize(path)
    return torch.from_file(path, shared=False, size=size, dtype=torch.uint8).to(device)


def gather(data: torch.Tensor, starts: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets of the windows that start at ``starts`` (on the device)."""
    chunk = data[starts[:, None] + offsets].long()
    return chunk[:, :-1], chunk[:, 1:]


def eval_windows(val: torch.Tensor, size: Size, batches: int) -> list[torch.Tensor]:
    """``batches`` fixed batches of window starts spread evenly over the validation split (they
    overlap only where the split is shorter than the windows)."""
    count = batches * size.batch_size
    last = len(val) - size.seq_len - 1
    if last < 0:
        raise ValueError(f"the validation split has {len(val)} bytes, fewer than seq_len + 1 = {size.seq_len + 1}")
    # Computed on the host in float64: the same windows on every device.
    starts = torch.linspace(0, last, count, dtype=torch.float64).long().to(val.device)
    return list(starts.split(size.batch_size))


# Fields of a Size that only feed the plan's estimates: a new measurement of them between two calls
# must not throw away a run's checkpoint.
ESTIMATE_FIELDS = ("tokens_per_s", "setup_s")


def checkpoint_key(job: RunJob, recipe: Recipe) -> str:
    """What a checkpoint must match to be taken up: the run, its size as it trains (not the
    estimates of :data:`ESTIMATE_FIELDS`), its recipe, its data."""
    size = {k: v for k, v in asdict(job.size).items() if k not in ESTIMATE_FIELDS}
    what = {"run": job.run_id, "size": size, "lr": job.lr, "seed": job.seed,
            "weight_decay": job.weight_decay, "recipe": [recipe.description, dict(recipe.options)], "dtype": job.dtype,
            "data": job.data_sha1}
    return hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()


def checkpoint_path(checkpoint_dir: str, run_id: str) -> Path:
    """Where a run keeps its checkpoint."""
    return Path(checkpoint_dir) / f"{run_id}.pt"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _curve(losses: list[float], points: int) -> list[list[float]]:
    """[last step, mean loss] over windows of the per-step losses (every step when ``points`` is 0)."""
    width = max(1, len(losses) // points) if points else 1
    return [[min(i + width, len(losses)), sum(losses[i:i + width]) / len(losses[i:i + width])]
            for i in range(0, len(losses), width)]


class Timing:
    """Seconds of training steps (outside the first :data:`WARM_STEPS` of each call and outside
    evaluations), of evaluations, and of the warm-up steps; carried across calls."""

    def __init__(self, saved: dict | None = None):
        saved = saved or {}
        self.train_s = saved.get("train_s", 0.0)
        self.timed_steps = saved.get("timed_steps", 0)
        self.eval_s = saved.get("eval_s", 0.0)
        self.warmup_s = saved.get("warmup_s", 0.0)
        self.wall_s = saved.get("wall_s", 0.0)
        self.mark: tuple[float, int] | None = None

    def start_segment(self, step: int) -> None:
        self.mark = (time.perf_counter(), step)

    def end_segment(self, step: int) -> None:
        """Close the segment that ended at ``step`` (after a device sync)."""
        if self.mark is not None:
            self.train_s += time.perf_counter() - self.mark[0]
            self.timed_steps += step - self.mark[1]
        self.mark = None

    def state(self) -> dict:
        return {"train_s": self.train_s, "timed_steps": self.timed_steps, "eval_s": self.eval_s,
                "warmup_s": self.warmup_s, "wall_s": self.wall_s}


def order_sha1(order: torch.Tensor) -> str:
    """SHA-1 of a run's window order (int64, little-endian): runs that record the same one read
    the same windows in the same order."""
    return hashlib.sha1(order.to(torch.int64).numpy().astype("<i8").tobytes()).hexdigest()


def window_order(windows: int, needed: int, seed: int) -> torch.Tensor:
    """The first ``needed`` training windows a run reads, as indices into the ``windows`` of its
    split: a seeded random order without replacement, then, if ``needed`` exceeds ``windows``,
    another random order of every window for each further pass. The same seed gives the same
    order on every device, and a first pass's order does not depend on the passes after it."""
    generator = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(windows, generator=generator) for _ in range(math.ceil(needed / windows))]
    return torch.cat(orders)[:needed]


def train_run(job: RunJob, recipe: Recipe, train_data: torch.Tensor, val_data: torch.Tensor,
              device: torch.device, log=print) -> dict:
    """Train one run, or go on with it from its checkpoint; see the module's docstring.

    Returns the result fields of a run record; ``stopped_at`` is set (and the final fields are
    not) when the run stopped at ``job.stop_at`` before its last step. Raises :class:`Diverged`.
    """
    call_start = time.perf_counter()
    size = job.size
    steps, batch, seq = size.steps, size.batch_size, size.seq_len
    torch.manual_seed(job.seed)
    model = Llama(size.model_config()).to(device)
    optimizer = build(recipe, model, job.lr, job.seed, device, job.weight_decay)
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    warmup = max(1, steps // 10)

    key = checkpoint_key(job, recipe)
    ckpt_path = checkpoint_path(job.checkpoint_dir, job.run_id) if job.checkpoint_dir else None
    step, losses, val_curve, resumed_at, saved_timing = 0, [], [], [], None
    if ckpt_path is not None and ckpt_path.is_file():
        saved = torch.load(ckpt_path, map_location=device, weights_only=False)
        if saved.get("key") == key:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            step, losses, val_curve = saved["step"], saved["losses"], saved["val_loss"]
            resumed_at, saved_timing = saved["resumed_at"] + [saved["step"]], saved["timing"]
            log(f"{job.run_id}: going on from the checkpoint at step {step}")
        else:
            log(f"{job.run_id}: the checkpoint {ckpt_path} is of another set-up; starting afresh")
    timing = Timing(saved_timing)

    net = model if job.compile == "none" else torch.compile(
        model, mode=None if job.compile == "default" else job.compile)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if job.dtype == "bfloat16" else nullcontext()
    windows, passes = corpus_lib.windows(len(train_data), seq), corpus_lib.passes(len(train_data), size)
    if passes > size.max_passes:
        raise ValueError(f"{job.run_id}: the training split holds {windows:,} windows, the run reads "
                         f"{steps * batch:,}: more than {size.max_passes} pass(es) (see corpus.check_fits)")
    order = window_order(windows, steps * batch, job.seed)
    starts = (order * seq).to(device)
    offsets = torch.arange(seq + 1, device=device)
    periodic = eval_windows(val_data, size, size.eval_batches)
    final = eval_windows(val_data, size, size.final_eval_batches or size.eval_batches)
    step_losses = torch.zeros(steps, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    @torch.no_grad()
    def evaluate(batches: list[torch.Tensor]) -> float:
        # No model.eval(): the model has no dropout or batch norm, and switching modes would
        # cost the compiled model another graph.
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for window_starts in batches:
            inputs, targets = gather(val_data, window_starts, offsets)
            with autocast:
                total += net(inputs, targets).float()
        value = (total / len(batches)).item()
        timing.eval_s += time.perf_counter() - t0
        if not math.isfinite(value):
            raise Diverged(f"{job.run_id}: validation loss became {value} at step {step}")
        return value

    def read_losses(first: int, last: int) -> None:
        """Move the losses of steps ``first+1..last`` to the host; stop at a non-finite one."""
        new = step_losses[first:last].tolist()
        bad = next((i for i, v in enumerate(new) if not math.isfinite(v)), None)
        if bad is not None:
            raise Diverged(f"{job.run_id}: loss became {new[bad]} at step {first + bad + 1}")
        losses.extend(new)

    def save(done: int) -> None:
        if ckpt_path is None:
            return
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save({"key": key, "step": done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "losses": losses, "val_loss": val_curve, "resumed_at": resumed_at,
                    "timing": {**timing.state(), "wall_s": timing.wall_s + time.perf_counter() - call_start}},
                   tmp)
        os.replace(tmp, ckpt_path)

    if step == 0:
        val_curve.append([0, evaluate(periodic)])
    read_from, warm_until, stopped_at = step, step + WARM_STEPS, None
    warm_start = time.perf_counter()
    for step in range(step, steps):
        for group, peak in zip(optimizer.param_groups, peak_lrs):
            group["lr"] = peak * lr_multiplier(step, steps, warmup)
        inputs, targets = gather(train_data, starts[step * batch:(step + 1) * batch], offsets)
        with autocast:
            loss = net(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)  # the norm stays on the device: no sync
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_losses[step] = loss.detach()
        done = step + 1

        if done == warm_until:
            _sync(device)
            timing.warmup_s += time.perf_counter() - warm_start
            timing.start_segment(done)
        last = done == steps
        evaluating = done % size.eval_every == 0 or last
        stopping = not last and job.stop_at is not None and time.time() >= job.stop_at
        if evaluating or stopping:
            _sync(device)
            timing.end_segment(done)
            read_losses(read_from, done)
            read_from = done
            if evaluating:
                val_curve.append([done, evaluate(final if last else periodic)])
            if not last:
                save(done)
            if stopping:
                stopped_at = done
                break
            if done >= warm_until:
                timing.start_segment(done)

    timing.wall_s += time.perf_counter() - call_start
    result = {"resumed_at": resumed_at, "train_time_s": timing.train_s, "eval_time_s": timing.eval_s,
              "warmup_s": timing.warmup_s, "timed_steps": timing.timed_steps, "wall_s": timing.wall_s,
              "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
              "num_parameters": model.num_parameters(), "stopped_at": stopped_at}
    if stopped_at is not None:
        return result
    tokens_per_step = batch * seq
    ms_per_step = 1000 * timing.train_s / timing.timed_steps if timing.timed_steps else None
    tail = losses[-max(10, steps // max(1, size.train_points)):]
    result.update({
        "final_train_loss": sum(tail) / len(tail), "final_val_loss": val_curve[-1][1],
        "final_val_ppl": math.exp(val_curve[-1][1]), "ms_per_step": ms_per_step,
        "tokens_per_s": tokens_per_step * 1000 / ms_per_step if ms_per_step else None,
        "train_loss": _curve(losses, size.train_points), "val_loss": val_curve, "passes": passes,
        "window_order_sha1": order_sha1(order),
    })
    if ckpt_path is not None:
        ckpt_path.unlink(missing_ok=True)
    return result
