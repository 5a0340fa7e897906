"""The plan: which runs a study has, how they split into shards, which of them --resume leaves
out, and what they are estimated to cost."""

from __future__ import annotations

from dataclasses import dataclass, field

from .definition import INVOCATION_OVERHEAD_S, OPTIMIZERS, THROUGHPUT_DEFAULTS, Recipe, Size, quick_lrs
from .records import run_id


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
        return run_id(self.size, self.optimizer, self.lr, self.seed)


@dataclass
class Cell:
    """All runs of one (size, optimizer) pair; a cell is never split across shards."""

    size: Size
    spec: Recipe
    lrs: tuple[float, ...]
    runs: list[RunSpec] = field(default_factory=list)

    @property
    def estimate_s(self) -> float:
        return len(self.runs) * self.size.estimate_s(self.spec.name)


def make_cells(sizes: list[Size], specs: list[Recipe], quick: bool) -> list[Cell]:
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


def not_finished(runs: list[RunSpec], finished: list[dict]) -> list[RunSpec]:
    """The runs that no earlier record finished (a best-lr run counts by size, optimizer, seed)."""
    done = {r["id"] for r in finished}
    done_best = {(r["size"], r["optimizer"], r["seed"]) for r in finished if r["stage"] == "best_lr"}
    return [run for run in runs if run.run_id not in done
            and not (run.stage == "best_lr" and (run.size, run.optimizer, run.seed) in done_best)]


def best_lr(records: list[dict], size: str, optimizer: str, seed: int) -> float | None:
    """The learning rate of the lowest final validation loss among finished sweep runs: where
    a best-lr run goes."""
    done = [r for r in records if r["size"] == size and r["optimizer"] == optimizer and r["seed"] == seed
            and r["stage"] == "sweep" and r["status"] == "ok"]
    return min(done, key=lambda r: r["final_val_loss"])["lr"] if done else None


def plan_lines(shards: list[list[Cell]], sizes_by_name: dict[str, Size], finished: list[dict]) -> list[str]:
    """The run list of every shard with its estimated time (``--plan``)."""
    from magma_ext.demo import Llama  # the parameter counts; the rest of the plan needs no torch

    lines = []
    total = 0.0
    for i, cells in enumerate(shards, 1):
        runs = not_finished(shard_runs(cells), finished)
        seconds = sum(sizes_by_name[r.size].estimate_s(r.optimizer) for r in runs) + INVOCATION_OVERHEAD_S
        total += seconds
        lines.append(f"shard {i}/{len(shards)}: {len(runs)} runs, estimated {seconds:.0f} s ({seconds / 60:.1f} min) "
                     f"on an H100, {INVOCATION_OVERHEAD_S:.0f} s start-up included")
        for cell in cells:
            lines.append(f"  {cell.size.name:>4} {cell.spec.name:<14} {len(cell.runs)} runs x "
                         f"{cell.size.estimate_s(cell.spec.name):.1f} s")
        for run in runs:
            lr = "best lr of seed 0" if run.lr is None else f"lr {run.lr:g}"
            lines.append(f"    {run.run_id:<40} {run.stage:<8} {lr}")
    count = sum(len(not_finished(shard_runs(c), finished)) for c in shards)
    lines.append(f"total: {count} runs, estimated {total:.0f} s ({total / 60:.1f} min)"
                 + (f"; {len(finished)} finished runs from --resume left out" if finished else ""))
    for size in sizes_by_name.values():
        steps = THROUGHPUT_DEFAULTS["warmup_steps"] + THROUGHPUT_DEFAULTS["timed_steps"]
        seconds = THROUGHPUT_DEFAULTS["repeats"] * sum(
            steps * size.step_estimate_ms(name) / 1000 + size.setup_s * 2
            for name in OPTIMIZERS) + INVOCATION_OVERHEAD_S
        lines.append(f"--mode throughput --size {size.name} (all optimizers, default rounds): about {seconds:.0f} s")
    for size in sizes_by_name.values():
        params = Llama(size.model_config()).num_parameters()
        lines.append(f"size {size.name}: {params / 1e6:.2f}M parameters, {size.steps} steps x {size.batch_size} x "
                     f"{size.seq_len} = {size.tokens / 1e6:.2f}M tokens per run, eval every {size.eval_every} steps "
                     f"on {size.eval_batches} batches")
    return lines
