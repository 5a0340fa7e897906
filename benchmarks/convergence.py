"""Convergence study: six optimizers, a learning-rate sweep each, on byte-level Llama models.

Usage (from the repository root)::

    python benchmarks/convergence.py --plan --num-shards 3            # the run list, estimated times
    python benchmarks/convergence.py --shard 1 --num-shards 3 --out '' --bundle shard1.json --time-budget-s 500
    python benchmarks/convergence.py --mode throughput --out '' --bundle throughput.json
    python benchmarks/convergence.py report --inputs shard1.json shard2.json shard3.json throughput.json
    python benchmarks/convergence.py --sizes 10M --resume shard1.json --bundle more.json   # the rest
    python benchmarks/convergence.py --quick --out /tmp/conv_smoke    # a CPU smoke test

The whole study (78 runs, ~19 min of H100 time by the estimates) fits three calls of under
nine minutes: ``--num-shards 3``, each shard with ``--time-budget-s``, the throughput mode
beside the shortest shard. Shards must be run with the same flags apart from ``--shard``.
``--resume`` takes earlier bundles and leaves out the runs they finished, so a study cut short
by a device limit goes on where it stopped.

Models, data and training loop are the demo's (``magma_ext.demo``): Llama-style decoders of
about 10M and 50M parameters on the bytes of the Python standard library (or ``--data``), a
fixed train/validation split, linear warm-up and cosine decay, gradient clipping at 1.0,
bfloat16 autocast on CUDA. Every run of a model size gets the same token budget, the same
initialisation and the same data order for a given seed; only the optimizer and its learning
rate differ. Each run becomes one JSON record (curves, final validation perplexity, wall time,
peak memory); ``report`` (``plot_convergence.py``) turns the records into plots and a page.

Design: the 10M model gets the full sweep (4 learning rates x 2 seeds per optimizer); the 50M
model gets the sweep with seed 0 and then a second seed at the learning rate that seed 0 found
best. A (size, optimizer) pair is a *cell*; a cell's runs never leave its shard, so the
best-learning-rate run always finds its sweep. ``--mode throughput`` times whole training
steps and the optimizer step alone for every optimizer in one process.
"""

from __future__ import annotations

import time

_PROCESS_START = time.monotonic()  # before the torch import, which --time-budget-s must count

import argparse  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, installed or not

from magma_ext import Magma, has_cuda_extension, param_groups  # noqa: E402
from magma_ext.demo import Llama, LlamaConfig, batches, load_corpus, train  # noqa: E402
from magma_ext.demo.train import BETAS, decay_split  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "convergence"
DEFAULT_PAGE = REPO / "benchmarks" / "results" / "convergence.md"
# The whole standard library of CPython 3.11/3.12 (~30 MB of *.py): no run sees a byte twice.
DEFAULT_MAX_BYTES = 48 * 2**20
WEIGHT_DECAY = 0.1
KEEP_PROB = 0.5
# Muon's AdamW part (embedding, LM head, norms) runs at this fraction of Muon's learning rate,
# so one sweep moves both: Muon's 0.02 pairs with 2e-3, a point of AdamW's own grid.
MUON_ADAMW_LR_RATIO = 0.1
THROUGHPUT_DEFAULTS = {"warmup_steps": 10, "timed_steps": 30, "repeats": 5}
# Seconds per invocation outside the runs (imports, CUDA start, reading the corpus).
INVOCATION_OVERHEAD_S = 10.0


# ---------------------------------------------------------------------------- model sizes


@dataclass(frozen=True)
class Size:
    """A model size and its training budget.

    ``sweep_seeds`` run at every learning rate; ``best_lr_seeds`` run afterwards at the
    learning rate whose ``sweep_seeds[0]`` run reached the lowest validation loss.
    ``step_ms``/``eval_batch_ms`` are measured H100 costs (bf16 autocast, eager) that only
    feed the time estimates of ``--plan`` and ``--time-budget-s``.
    """

    name: str
    dim: int
    layers: int
    heads: int
    steps: int
    batch_size: int = 32
    seq_len: int = 256
    eval_batches: int = 20
    evals: int = 10  # evaluations after step 0, evenly spaced
    sweep_seeds: tuple[int, ...] = (0, 1)
    best_lr_seeds: tuple[int, ...] = ()
    step_ms: dict = field(default_factory=dict, compare=False)
    eval_batch_ms: float = 0.0
    setup_s: float = 0.5

    def model_config(self) -> LlamaConfig:
        return LlamaConfig(dim=self.dim, n_layers=self.layers, n_heads=self.heads, max_seq_len=self.seq_len)

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // self.evals)

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    def estimate_s(self, optimizer: str) -> float:
        """Estimated wall seconds of one run (training, evaluations, set-up)."""
        ms = self.step_ms.get(optimizer, self.step_ms.get("AdamW", 10.0))
        evaluations = self.steps // self.eval_every + 2
        eval_s = evaluations * self.eval_batches * self.eval_batch_ms / 1000
        return self.setup_s + self.steps * ms / 1000 + eval_s


# Step costs measured on an H100 (2026-11, torch 2.11, this script's first pilot): the demo's
# loop waits for every step's loss, and at these widths the step is bound by the host launching
# kernels, so the 10M model steps only ~1.8x faster than the 50M one and torch's Muon (one
# Newton-Schulz loop per matrix) costs ~20-40 ms more per step.
SIZES = {
    "10M": Size("10M", dim=384, layers=6, heads=6, steps=300, sweep_seeds=(0, 1),
                step_ms={"AdamW": 25.0, "RMSProp": 24.0, "SkipUpdate": 22.0, "Magma-Adam": 28.0,
                         "Magma-RMSProp": 28.0, "Muon": 45.0}, eval_batch_ms=8.0),
    "50M": Size("50M", dim=640, layers=10, heads=10, steps=300, sweep_seeds=(0,), best_lr_seeds=(1,),
                step_ms={"AdamW": 45.0, "RMSProp": 46.0, "SkipUpdate": 42.0, "Magma-Adam": 45.0,
                         "Magma-RMSProp": 47.0, "Muon": 82.0}, eval_batch_ms=14.0),
}
QUICK_SIZE = Size("tiny", dim=64, layers=2, heads=2, steps=30, batch_size=8, seq_len=64, eval_batches=2,
                  evals=3, sweep_seeds=(0,), best_lr_seeds=(1,), step_ms={"AdamW": 30.0}, eval_batch_ms=5.0)


# ---------------------------------------------------------------------------- optimizers


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` for the hidden 2-D matrices and AdamW for every other parameter,
    as one optimizer.

    Its ``param_groups`` are the inner optimizers' own group dicts, so an LR scheduler that
    scales this optimizer's groups scales both inner optimizers (each from its own base lr).
    """

    def __init__(self, muon_params: list[torch.Tensor], adamw_groups: list[dict], *, lr: float,
                 adamw_lr: float, weight_decay: float, adamw_fused: bool | None):
        self.muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=adamw_lr, betas=BETAS, fused=adamw_fused)
        self.optimizers = (self.muon, self.adamw)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss


def muon_split(model: nn.Module) -> tuple[list[torch.Tensor], list[dict]]:
    """(Muon's parameters, AdamW's groups): Muon takes the 2-D weights of the hidden
    ``nn.Linear`` layers; the embedding, the LM head and the norms go to AdamW with the
    demo's decay rule."""
    head = getattr(model, "lm_head", None)
    hidden = [m.weight for m in model.modules()
              if isinstance(m, nn.Linear) and m is not head and m.weight.ndim == 2]
    hidden_ids = {id(p) for p in hidden}
    adamw_groups = []
    for group in decay_split(model, WEIGHT_DECAY):
        rest = [p for p in group["params"] if id(p) not in hidden_ids]
        if rest:
            adamw_groups.append({**group, "params": rest})
    return hidden, adamw_groups


def magma_fused_flag(device: torch.device) -> bool | None:
    """``fused=True`` on CUDA when the extension is built (fail rather than fall back
    silently), else None: the reference path."""
    return True if device.type == "cuda" and has_cuda_extension() else None


def build_adamw(model, lr, seed, device):
    return torch.optim.AdamW(decay_split(model, WEIGHT_DECAY), lr=lr, betas=BETAS,
                             fused=True if device.type == "cuda" else None)


def _magma(base: str, mask: str):
    def build(model, lr, seed, device):
        return Magma(param_groups(model, weight_decay=WEIGHT_DECAY), lr=lr, betas=BETAS, base=base,
                     mask=mask, keep_prob=KEEP_PROB, seed=seed, fused=magma_fused_flag(device))
    return build


def build_muon(model, lr, seed, device):
    if not hasattr(torch.optim, "Muon"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.optim.Muon")
    hidden, adamw_groups = muon_split(model)
    return MuonWithAdamW(hidden, adamw_groups, lr=lr, adamw_lr=lr * MUON_ADAMW_LR_RATIO,
                         weight_decay=WEIGHT_DECAY, adamw_fused=True if device.type == "cuda" else None)


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer of the study: its learning-rate grid and how to build it for a model."""

    name: str
    lrs: tuple[float, ...]
    description: str
    build: Callable[[nn.Module, float, int, torch.device], torch.optim.Optimizer]
    uses_magma: bool = False


# Grids are powers of two apart. A pilot on the 10M model (600 steps, seed 0) found AdamW best
# at 1e-3 and RMSProp at 5e-4, both degrading fast above, and Muon best at 0.02; the grids put
# those optima on their second or third point. Magma applies about keep_prob * s ~ 1/4 of its
# base optimizer's update, so its grids sit 2-4x higher than its base's; SkipUpdate's kept
# updates are 1/keep_prob = 2x larger, so it shares RMSProp's grid.
OPTIMIZERS = {spec.name: spec for spec in (
    OptimizerSpec("AdamW", (2.5e-4, 5e-4, 1e-3, 2e-3),
                  "torch.optim.AdamW (fused=True on CUDA)", build_adamw),
    OptimizerSpec("RMSProp", (1.25e-4, 2.5e-4, 5e-4, 1e-3),
                  'magma_ext.Magma(base="rmsprop", mask="none"): dense RMSProp with bias-corrected v',
                  _magma("rmsprop", "none"), uses_magma=True),
    OptimizerSpec("SkipUpdate", (1.25e-4, 2.5e-4, 5e-4, 1e-3),
                  f'magma_ext.Magma(base="rmsprop", mask="skip", keep_prob={KEEP_PROB})',
                  _magma("rmsprop", "skip"), uses_magma=True),
    OptimizerSpec("Magma-Adam", (1e-3, 2e-3, 4e-3, 8e-3),
                  f'magma_ext.Magma(base="adam", mask="magma", keep_prob={KEEP_PROB})',
                  _magma("adam", "magma"), uses_magma=True),
    OptimizerSpec("Magma-RMSProp", (2.5e-4, 5e-4, 1e-3, 2e-3),
                  f'magma_ext.Magma(base="rmsprop", mask="magma", keep_prob={KEEP_PROB})',
                  _magma("rmsprop", "magma"), uses_magma=True),
    OptimizerSpec("Muon", (5e-3, 1e-2, 2e-2, 4e-2),
                  "torch.optim.Muon (hidden 2-D weights; momentum 0.95, Nesterov, 5 Newton-Schulz steps) "
                  f"+ AdamW at {MUON_ADAMW_LR_RATIO} x lr for embedding, LM head and norms",
                  build_muon),
)}
QUICK_OPTIMIZERS = ("AdamW", "Magma-Adam", "Muon")
QUICK_LRS = 2  # the middle two of each grid


def quick_lrs(spec: OptimizerSpec) -> tuple[float, ...]:
    middle = len(spec.lrs) // 2
    return spec.lrs[middle - QUICK_LRS // 2: middle - QUICK_LRS // 2 + QUICK_LRS]


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RunSpec:
    """One training run; ``lr`` None means "the best of this cell's seed-0 sweep"."""

    size: str
    optimizer: str
    lr: float | None
    seed: int
    stage: str  # "sweep" or "best_lr"

    @property
    def run_id(self) -> str:
        lr = "best" if self.lr is None else f"{self.lr:g}"
        return f"{self.size}__{self.optimizer}__lr{lr}__seed{self.seed}"


@dataclass
class Cell:
    """All runs of one (size, optimizer) pair; a cell is never split across shards."""

    size: Size
    spec: OptimizerSpec
    lrs: tuple[float, ...]
    runs: list[RunSpec] = field(default_factory=list)

    @property
    def estimate_s(self) -> float:
        return len(self.runs) * self.size.estimate_s(self.spec.name)


def make_cells(sizes: list[Size], specs: list[OptimizerSpec], quick: bool) -> list[Cell]:
    cells = []
    for size in sizes:
        for spec in specs:
            lrs = quick_lrs(spec) if quick else spec.lrs
            cell = Cell(size, spec, lrs)
            cell.runs = [RunSpec(size.name, spec.name, lr, seed, "sweep")
                         for seed in size.sweep_seeds for lr in lrs]
            cell.runs += [RunSpec(size.name, spec.name, None, seed, "best_lr") for seed in size.best_lr_seeds]
            cells.append(cell)
    return cells


def assign_shards(cells: list[Cell], num_shards: int) -> list[list[Cell]]:
    """Cells to shards, longest first onto the least loaded shard (deterministic)."""
    shards: list[list[Cell]] = [[] for _ in range(num_shards)]
    loads = [0.0] * num_shards
    for cell in sorted(cells, key=lambda c: -c.estimate_s):
        i = loads.index(min(loads))
        shards[i].append(cell)
        loads[i] += cell.estimate_s
    return shards


def shard_runs(cells: list[Cell]) -> list[RunSpec]:
    """A shard's runs in the order that loses least when a time budget cuts the tail: every
    cell's first-seed sweep, then the other sweep seeds, then the best-lr seeds."""
    def phase(run: RunSpec, size: Size) -> int:
        if run.stage == "best_lr":
            return 2
        return 0 if run.seed == size.sweep_seeds[0] else 1
    ordered = [(phase(run, cell.size), i, j, run)
               for i, cell in enumerate(cells) for j, run in enumerate(cell.runs)]
    return [run for *_, run in sorted(ordered, key=lambda t: t[:3])]


def print_plan(shards: list[list[Cell]], sizes_by_name: dict[str, Size], finished: list[dict]) -> None:
    total = 0.0
    for i, cells in enumerate(shards, 1):
        runs = not_finished(shard_runs(cells), finished)
        seconds = sum(sizes_by_name[r.size].estimate_s(r.optimizer) for r in runs) + INVOCATION_OVERHEAD_S
        total += seconds
        print(f"shard {i}/{len(shards)}: {len(runs)} runs, estimated {seconds:.0f} s ({seconds / 60:.1f} min) "
              f"on an H100, {INVOCATION_OVERHEAD_S:.0f} s start-up included")
        for cell in cells:
            print(f"  {cell.size.name:>4} {cell.spec.name:<14} {len(cell.runs)} runs x "
                  f"{cell.size.estimate_s(cell.spec.name):.1f} s")
        for run in runs:
            lr = "best lr of seed 0" if run.lr is None else f"lr {run.lr:g}"
            print(f"    {run.run_id:<40} {run.stage:<8} {lr}")
    count = sum(len(not_finished(shard_runs(c), finished)) for c in shards)
    print(f"total: {count} runs, estimated {total:.0f} s ({total / 60:.1f} min)"
          + (f"; {len(finished)} finished runs from --resume left out" if finished else ""))
    for size in sizes_by_name.values():
        steps = THROUGHPUT_DEFAULTS["warmup_steps"] + THROUGHPUT_DEFAULTS["timed_steps"]
        seconds = THROUGHPUT_DEFAULTS["repeats"] * sum(
            steps * size.step_ms.get(name, size.step_ms.get("AdamW", 10.0)) / 1000 + size.setup_s * 2
            for name in OPTIMIZERS) + INVOCATION_OVERHEAD_S
        print(f"--mode throughput --size {size.name} (all optimizers, default rounds): about {seconds:.0f} s")
    for size in sizes_by_name.values():
        params = Llama(size.model_config()).num_parameters()
        print(f"size {size.name}: {params / 1e6:.2f}M parameters, {size.steps} steps x {size.batch_size} x "
              f"{size.seq_len} = {size.tokens / 1e6:.2f}M tokens per run, eval every {size.eval_every} steps "
              f"on {size.eval_batches} batches")


# ---------------------------------------------------------------------------- environment


def environment(device: torch.device) -> dict:
    """Where and with what the runs ran."""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": str(device), "device_name": device_name, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "magma_cuda_extension": has_cuda_extension(), "git_commit": commit,
    }


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], Path.cwd())] + sys.argv[1:])


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def describe_data(path: str | None, train_data: torch.Tensor, val_data: torch.Tensor, max_bytes: int) -> dict:
    source = path or f"Python {platform.python_version()} standard library (*.py)"
    return {"source": source, "max_bytes": max_bytes, "train_bytes": len(train_data), "val_bytes": len(val_data),
            "val_sha1": hashlib.sha1(val_data.numpy().tobytes()).hexdigest()[:12]}


class RecordWriter:
    """Writes each record to ``out_dir`` (if any) and rewrites the one ``bundle`` file after
    every record, so a run killed midway still leaves everything finished so far."""

    def __init__(self, out_dir: Path | None, bundle: Path | None, meta: dict):
        self.out_dir, self.bundle = out_dir, bundle
        self.contents = {"kind": "bundle", "meta": meta, "runs": [], "throughput": [], "skipped": []}
        for path in (out_dir, bundle.parent if bundle else None):
            if path is not None:
                path.mkdir(parents=True, exist_ok=True)
        if out_dir is not None:  # the set-up the report describes, beside the per-run files
            shard = f"shard{meta['shard']}of{meta['num_shards']}" if meta["mode"] == "sweep" else meta["mode"]
            _write_json(out_dir / f"meta__{shard}.json", {"kind": "meta", "meta": meta})
        self.flush()

    def add(self, section: str, record: dict, filename: str | None = None) -> None:
        self.contents[section].append(record)
        if self.out_dir is not None and filename:
            _write_json(self.out_dir / filename, record)
        self.flush()

    def flush(self) -> None:
        if self.bundle is not None:
            _write_json(self.bundle, self.contents)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)


def _round_curve(curve: list[list[float]]) -> list[list[float]]:
    return [[int(step), round(float(loss), 5)] for step, loss in curve]


# ---------------------------------------------------------------------------- the sweep


def run_one(run: RunSpec, lr: float, size: Size, spec: OptimizerSpec, data, device, dtype: str) -> dict:
    """Train one run with the demo's loop; a divergence or an error becomes the record's status."""
    train_data, val_data = data
    factory = lambda model: spec.build(model, lr, run.seed, device)  # noqa: E731
    record = {"kind": "run", "id": f"{size.name}__{spec.name}__lr{lr:g}__seed{run.seed}", "size": size.name,
              "optimizer": spec.name, "lr": lr, "seed": run.seed, "stage": run.stage, "steps": size.steps,
              "batch_size": size.batch_size, "seq_len": size.seq_len, "tokens": size.tokens,
              "eval_every": size.eval_every, "eval_batches": size.eval_batches, "model": size.model_config().to_dict(), "dtype": dtype,
              "optimizer_description": spec.description,
              "magma_fused": bool(spec.uses_magma and magma_fused_flag(device)), "status": "ok", "error": None}
    start = time.perf_counter()
    try:
        result = train(size.model_config(), factory, train_data, val_data, steps=size.steps,
                       batch_size=size.batch_size, seq_len=size.seq_len, eval_every=size.eval_every,
                       eval_batches=size.eval_batches, seed=run.seed, device=device, dtype=dtype,
                       name=run.run_id, progress=False)
    except FloatingPointError as exc:  # the demo's loop stops at a non-finite loss
        record.update(status="diverged", error=str(exc), wall_s=time.perf_counter() - start)
        return record
    except Exception as exc:  # noqa: BLE001 -- one broken run must not lose the others
        record.update(status="error", error=f"{type(exc).__name__}: {exc}", wall_s=time.perf_counter() - start)
        return record
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record.update({key: result[key] for key in ("final_train_loss", "final_val_loss", "final_val_ppl",
                                                 "ms_per_step", "tokens_per_s", "wall_s", "peak_mem_bytes",
                                                 "num_parameters")})
    record["train_loss"] = _round_curve(result["train_loss"])
    record["val_loss"] = _round_curve(result["val_loss"])
    return record


def best_lr(records: list[dict], size: str, optimizer: str, seed: int) -> float | None:
    """The learning rate of the lowest final validation loss among finished sweep runs."""
    done = [r for r in records if r["size"] == size and r["optimizer"] == optimizer and r["seed"] == seed
            and r["stage"] == "sweep" and r["status"] == "ok"]
    return min(done, key=lambda r: r["final_val_loss"])["lr"] if done else None


def load_finished(paths: list[Path]) -> list[dict]:
    """The finished ("ok") run records of earlier bundles, for --resume."""
    records = []
    for path in paths:
        records += [r for r in json.loads(path.read_text())["runs"] if r["status"] == "ok"]
    return records


def not_finished(runs: list[RunSpec], finished: list[dict]) -> list[RunSpec]:
    """The runs that no earlier record finished (a best-lr run counts by size, optimizer, seed)."""
    done = {r["id"] for r in finished}
    done_best = {(r["size"], r["optimizer"], r["seed"]) for r in finished if r["stage"] == "best_lr"}
    return [run for run in runs if run.run_id not in done
            and not (run.stage == "best_lr" and (run.size, run.optimizer, run.seed) in done_best)]


def run_sweep(args, sizes: list[Size], specs: list[OptimizerSpec], device: torch.device) -> int:
    shards = assign_shards(make_cells(sizes, specs, args.quick), args.num_shards)
    finished = load_finished(args.resume)
    runs = not_finished(shard_runs(shards[args.shard - 1]), finished)
    sizes_by_name = {s.name: s for s in sizes}
    train_data, val_data = load_corpus(args.data, max_bytes=args.max_bytes)
    meta = {"command": command_line(), "date": now_utc(), "mode": "sweep", "shard": args.shard,
            "num_shards": args.num_shards, "quick": args.quick, "time_budget_s": args.time_budget_s,
            "env": environment(device), "data": describe_data(args.data, train_data, val_data, args.max_bytes),
            "sizes": {s.name: {**s.model_config().to_dict(), "steps": s.steps, "batch_size": s.batch_size,
                               "seq_len": s.seq_len, "tokens": s.tokens, "sweep_seeds": list(s.sweep_seeds),
                               "best_lr_seeds": list(s.best_lr_seeds)} for s in sizes},
            "optimizers": {s.name: {"lrs": list(quick_lrs(s) if args.quick else s.lrs),
                                    "description": s.description} for s in specs},
            "weight_decay": WEIGHT_DECAY, "betas": list(BETAS), "muon_adamw_lr_ratio": MUON_ADAMW_LR_RATIO,
            "planned_runs": [r.run_id for r in runs], "resumed_from": [str(p) for p in args.resume]}
    writer = RecordWriter(args.out, args.bundle, meta)
    env = meta["env"]
    print(f"shard {args.shard}/{args.num_shards}: {len(runs)} runs on {env['device_name']} ({args.dtype}); "
          f"data {meta['data']['source']}: {meta['data']['train_bytes']:,} train / "
          f"{meta['data']['val_bytes']:,} val bytes; Magma CUDA extension "
          f"{'loaded' if env['magma_cuda_extension'] else 'NOT loaded: Magma runs on the reference path'}",
          flush=True)

    failures = 0
    for n, run in enumerate(runs, 1):
        size, spec = sizes_by_name[run.size], OPTIMIZERS[run.optimizer]
        lr = run.lr if run.lr is not None else best_lr(finished + writer.contents["runs"], run.size,
                                                       run.optimizer, size.sweep_seeds[0])
        skip_reason = None
        if lr is None:
            skip_reason = "no finished seed-0 sweep run to take the best learning rate from"
        elif args.time_budget_s is not None:
            done = [r["wall_s"] for r in writer.contents["runs"]
                    if r["size"] == run.size and r["optimizer"] == run.optimizer and r["status"] == "ok"]
            expected = max([size.estimate_s(run.optimizer)] + done)
            elapsed = time.monotonic() - _PROCESS_START
            if elapsed + expected > args.time_budget_s:
                skip_reason = (f"time budget: {elapsed:.0f} s elapsed + {expected:.0f} s expected "
                               f"> {args.time_budget_s:.0f} s")
        if skip_reason:
            print(f"[{n}/{len(runs)}] {run.run_id}: skipped ({skip_reason})", flush=True)
            writer.add("skipped", {"id": run.run_id, "reason": skip_reason})
            continue
        record = run_one(run, lr, size, spec, (train_data, val_data), device, args.dtype)
        record.update(command=meta["command"], date=now_utc(), env=env, data=meta["data"])
        writer.add("runs", record, f"{record['id']}.json")
        failures += record["status"] == "error"
        outcome = (f"val ppl {record['final_val_ppl']:.4f}" if record["status"] == "ok"
                   else f"{record['status'].upper()}: {record['error']}")
        memory = f", peak {record['peak_mem_bytes'] / 2**20:,.0f} MiB" if record.get("peak_mem_bytes") else ""
        print(f"[{n}/{len(runs)}] {run.size} {run.optimizer} lr {lr:g} seed {run.seed}: {outcome}  "
              f"({record['wall_s']:.1f} s{memory}; {time.monotonic() - _PROCESS_START:.0f} s elapsed)", flush=True)
    print(f"done: {len(writer.contents['runs'])} runs, {len(writer.contents['skipped'])} skipped, "
          f"{failures} errors; {time.monotonic() - _PROCESS_START:.0f} s"
          + (f"; bundle {args.bundle}" if args.bundle else ""))
    return 1 if failures else 0


# ---------------------------------------------------------------------------- throughput


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (inner optimizers' too)."""
    total = 0
    for opt in getattr(optimizer, "optimizers", (optimizer,)):
        for state in opt.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def time_window(size: Size, spec: OptimizerSpec, device: torch.device, dtype: str, train_data,
                warmup: int, timed: int) -> dict:
    """One fresh model and optimizer: ``warmup`` steps, then ``timed`` whole training steps
    (forward, backward, clipping, optimizer) timed together and each optimizer step alone
    (CUDA events on a GPU); the peak memory counts from before the model was built."""
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = Llama(size.model_config()).to(device)
    optimizer = spec.build(model, spec.lrs[len(spec.lrs) // 2], 0, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    # A few fixed batches already on the device: the step is timed, not the data pipeline.
    data_iter = batches(train_data, size.batch_size, size.seq_len, seed=0, device=device)
    fixed = [next(data_iter) for _ in range(4)]
    opt_ms, events = [], []

    def step(i: int, timing: bool) -> None:
        inputs, targets = fixed[i % len(fixed)]
        with autocast:
            loss = model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if timing and cuda:
            pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            pair[0].record()
            optimizer.step()
            pair[1].record()
            events.append(pair)
        elif timing:
            t0 = time.perf_counter()
            optimizer.step()
            opt_ms.append((time.perf_counter() - t0) * 1000)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for i in range(warmup):
        step(i, timing=False)
    sync()
    t0 = time.perf_counter()
    for i in range(timed):
        step(i, timing=True)
    sync()
    window = time.perf_counter() - t0
    opt_ms += [a.elapsed_time(b) for a, b in events]
    result = {"window_s": window, "opt_ms": opt_ms, "state_bytes": state_bytes(optimizer),
              "num_parameters": model.num_parameters(),
              "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if cuda else None}
    del model, optimizer, fixed
    return result


def run_throughput(args, specs: list[OptimizerSpec], device: torch.device) -> int:
    """Every optimizer's windows in turn, round after round, so that drifts of the machine
    (clocks, other load) spread over all optimizers instead of favouring one."""
    size = QUICK_SIZE if args.quick else SIZES[args.size]
    train_data, val_data = load_corpus(args.data, max_bytes=args.max_bytes)
    meta = {"command": command_line(), "date": now_utc(), "mode": "throughput", "quick": args.quick,
            "env": environment(device), "data": describe_data(args.data, train_data, val_data, args.max_bytes)}
    writer = RecordWriter(args.out, args.bundle, meta)
    print(f"throughput: {size.name} model, batch {size.batch_size} x {size.seq_len}, {args.dtype}, "
          f"{args.repeats} rounds of {args.warmup_steps} warm-up + {args.timed_steps} timed steps per optimizer, "
          f"on {meta['env']['device_name']}", flush=True)
    windows: dict[str, list[dict]] = {spec.name: [] for spec in specs}
    errors: dict[str, str] = {}
    for _ in range(args.repeats):
        for spec in specs:
            if spec.name in errors:
                continue
            try:
                windows[spec.name].append(time_window(size, spec, device, args.dtype, train_data,
                                                      args.warmup_steps, args.timed_steps))
            except Exception as exc:  # noqa: BLE001 -- keep the other rows
                errors[spec.name] = f"{type(exc).__name__}: {exc}"
                print(f"{spec.name}: ERROR {errors[spec.name]}", flush=True)
    tokens = args.timed_steps * size.batch_size * size.seq_len
    for spec in specs:
        if spec.name in errors:
            continue
        runs = windows[spec.name]
        window = statistics.median(r["window_s"] for r in runs)
        opt_ms = [ms for r in runs for ms in r["opt_ms"]]
        peaks = [r["peak_mem_bytes"] for r in runs if r["peak_mem_bytes"] is not None]
        record = {"kind": "throughput", "size": size.name, "optimizer": spec.name, "description": spec.description,
                  "magma_fused": bool(spec.uses_magma and magma_fused_flag(device)), "dtype": args.dtype,
                  "batch_size": size.batch_size, "seq_len": size.seq_len, "num_parameters": runs[0]["num_parameters"],
                  "warmup_steps": args.warmup_steps, "timed_steps": args.timed_steps, "repeats": len(runs),
                  "tokens_per_s": tokens / window, "step_ms": 1000 * window / args.timed_steps,
                  "step_ms_windows": [1000 * r["window_s"] / args.timed_steps for r in runs],
                  "opt_step_ms_median": statistics.median(opt_ms), "opt_step_ms_min": min(opt_ms),
                  "opt_step_timer": "cuda events" if device.type == "cuda" else "perf_counter",
                  "state_bytes": runs[0]["state_bytes"], "peak_mem_bytes": max(peaks) if peaks else None,
                  "command": meta["command"], "date": now_utc(), "env": meta["env"]}
        writer.add("throughput", record, f"throughput__{size.name}__{spec.name}.json")
        memory = f"  peak {record['peak_mem_bytes'] / 2**20:,.0f} MiB" if record["peak_mem_bytes"] else ""
        print(f"{spec.name:<14} {record['tokens_per_s']:>12,.0f} tok/s  step {record['step_ms']:.2f} ms  "
              f"optimizer {record['opt_step_ms_median']:.3f} ms  state {record['state_bytes'] / 2**20:,.1f} MiB"
              f"{memory}", flush=True)
    return 1 if errors else 0


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="`python benchmarks/convergence.py report --help` describes the report subcommand.")
    p.add_argument("--mode", choices=("sweep", "throughput"), default="sweep")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: a tiny model, {QUICK_SIZE.steps} steps, {', '.join(QUICK_OPTIMIZERS)} "
                        f"x {QUICK_LRS} learning rates, float32")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated model sizes: " + ", ".join(SIZES))
    p.add_argument("--optimizers", default=None,
                   help="comma-separated, default all: " + ", ".join(OPTIMIZERS))
    p.add_argument("--shard", type=int, default=1, help="which shard to run, 1-based")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--plan", action="store_true", help="print the run list and time estimates, run nothing")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="skip runs that would end after this many seconds since the process started")
    p.add_argument("--steps", type=int, default=None, help="override every size's steps (experiments)")
    p.add_argument("--data", default=None, help="text file or folder to train on instead of the Python stdlib")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="corpus size cap")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="autocast dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="folder for one JSON per run; '' writes none (use --bundle)")
    p.add_argument("--bundle", default=None, help="also write every record of this invocation into this one file")
    p.add_argument("--resume", default="",
                   help="comma-separated bundles of earlier invocations: their finished runs are not run "
                        "again (and count for best-lr runs)")
    g = p.add_argument_group("--mode throughput")
    g.add_argument("--size", default="50M", choices=tuple(SIZES), help="model size to time")
    g.add_argument("--warmup-steps", type=int, default=THROUGHPUT_DEFAULTS["warmup_steps"])
    g.add_argument("--timed-steps", type=int, default=THROUGHPUT_DEFAULTS["timed_steps"])
    g.add_argument("--repeats", type=int, default=THROUGHPUT_DEFAULTS["repeats"],
                   help="rounds over all optimizers (median window reported)")
    args = p.parse_args(argv)
    if not 1 <= args.shard <= args.num_shards:
        p.error(f"--shard must be in 1..{args.num_shards}, got {args.shard}")
    names = QUICK_OPTIMIZERS if args.quick and args.optimizers is None else (
        args.optimizers.split(",") if args.optimizers else tuple(OPTIMIZERS))
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        p.error(f"unknown optimizer(s) {unknown}; choose from {', '.join(OPTIMIZERS)}")
    args.optimizer_names = list(names)
    sizes = args.sizes.split(",")
    if not set(sizes) <= set(SIZES):
        p.error(f"unknown size(s) {sorted(set(sizes) - set(SIZES))}; choose from {', '.join(SIZES)}")
    args.size_names = sizes
    args.out = Path(args.out) if args.out else None
    args.bundle = Path(args.bundle) if args.bundle else None
    args.resume = [Path(p) for p in args.resume.split(",") if p]
    missing = [str(p) for p in args.resume if not p.is_file()]
    if missing:
        p.error(f"--resume: no such file(s) {missing}")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from plot_convergence import main as report_main
        return report_main(argv[1:])
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    sizes = [QUICK_SIZE] if args.quick else [SIZES[name] for name in args.size_names]
    if args.steps is not None:
        sizes = [replace(s, steps=args.steps) for s in sizes]
    specs = [OPTIMIZERS[name] for name in args.optimizer_names]
    if args.plan:
        print_plan(assign_shards(make_cells(sizes, specs, args.quick), args.num_shards), {s.name: s for s in sizes},
                   load_finished(args.resume))
        return 0
    if args.mode == "throughput":
        return run_throughput(args, specs, device)
    return run_sweep(args, sizes, specs, device)


if __name__ == "__main__":
    sys.exit(main())
