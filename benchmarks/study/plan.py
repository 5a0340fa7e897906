"""The plan: which runs an edition's tiers hold, in which order they run, how they split into
shards, which of them --resume leaves out, how a best-lr or transfer run finds its learning
rate, and what the runs are estimated to cost."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace

from .definition import INVOCATION_OVERHEAD_S, MEASURED_SIDE_BY_SIDE, MEASURED_TOKENS_PER_S, Edition, Recipe, Size, Tier
from .records import run_id

# A device call runs at most 10 minutes; what it can give to runs, start-up and copies aside.
DEVICE_CALL_S = 540
# GPU memory of one H100 as the device tool lends it, for the side-by-side memory estimate.
GPU_MEMORY_BYTES = 78 * 2**30
# CUDA context, allocator slack and torch.compile's workspace of one process, roughly.
PROCESS_OVERHEAD_BYTES = 2 * 2**30
# Bytes of saved activations per token, layer and model dimension under bf16 autocast with a
# fused attention kernel (the usual estimate for a pre-norm transformer block: 34).
ACTIVATION_BYTES_PER_TOKEN_LAYER_DIM = 34
# Finished straight runs that replace an estimate of a run's wall seconds with their median.
MEASURED_WALLS = 3


@dataclass(frozen=True)
class RunSpec:
    """One training run. ``lr`` None: a run whose learning rate ``rule`` picks from finished
    runs ("best": the best of this cell's sweep; "S-best", "S-best+1": that best lr at another
    size, or the next grid point above it)."""

    size: str
    optimizer: str
    lr: float | None
    seed: int
    stage: str  # "sweep", "best_lr" or "transfer"
    tier: int = 0
    rule: str | None = None

    @property
    def run_id(self) -> str:
        return run_id(self.size, self.optimizer, self.lr, self.seed, self.rule)


@dataclass
class Cell:
    """All runs of one (size, optimizer) pair of one tier; a cell is never split across shards.
    ``lrs`` is the grid its learning rates come from; ``source`` the size whose sweep chooses
    them (``select_seed``'s runs there) for best-lr and transfer runs."""

    tier: Tier
    size: Size
    spec: Recipe
    lrs: tuple[float, ...]
    source: str
    select_seed: int
    runs: list[RunSpec] = field(default_factory=list)

    @property
    def estimate_s(self) -> float:
        return len(self.runs) * self.size.estimate_s(self.spec.name)


def _select_seed(edition_tiers: tuple[Tier, ...], size_key: str, optimizer: str) -> int:
    """The seed whose sweep picks the best lr of (size, optimizer): its tier's first seed."""
    return next((t.seeds[0] for t in edition_tiers
                 if t.size == size_key and optimizer in t.optimizers and not t.transfer_from), 0)


def make_cells(edition: Edition, *, quick: bool = False, tiers: list[int] | None = None,
               sizes: list[str] | None = None, optimizers: list[str] | None = None,
               steps: int | None = None, only_lrs: list[float] | None = None) -> list[Cell]:
    """The cells of the edition's tiers (its quick ones with ``quick``), less those the filters
    leave out; ``steps`` replaces every size's step count; ``only_lrs`` keeps only the sweep runs at
    those learning rates (no best-lr or transfer runs: they are not at a given lr)."""
    size_table = edition.quick_sizes if quick else edition.sizes
    all_tiers = edition.quick_tiers if quick else edition.tiers
    cells = []
    for tier in all_tiers:
        if (tiers and tier.number not in tiers) or (sizes and tier.size not in sizes):
            continue
        size = size_table[tier.size] if steps is None else replace(size_table[tier.size], steps=steps)
        for name in tier.optimizers:
            if optimizers and name not in optimizers:
                continue
            spec = edition.optimizers[name]
            lrs = edition.lrs(spec, quick)
            if tier.transfer_from:
                source = size_table[tier.transfer_from].name
                cell = Cell(tier, size, spec, lrs, source, _select_seed(all_tiers, tier.transfer_from, name))
                cell.runs = [RunSpec(size.name, name, None, seed, "transfer", tier.number,
                                     f"{source}-best" + (f"{offset:+d}" if offset else ""))
                             for seed in tier.seeds for offset in tier.transfer_offsets]
            else:
                cell = Cell(tier, size, spec, lrs, size.name, tier.seeds[0])
                cell.runs = [RunSpec(size.name, name, lr, seed, "sweep", tier.number)
                             for seed in tier.seeds for lr in lrs]
                cell.runs += [RunSpec(size.name, name, None, seed, "best_lr", tier.number, "best")
                              for seed in tier.best_lr_seeds]
            if only_lrs:
                cell.runs = [r for r in cell.runs
                             if r.stage == "sweep" and any(math.isclose(r.lr, x) for x in only_lrs)]
            if cell.runs:
                cells.append(cell)
    return cells


def same_budget(records: list[dict], edition: Edition, *, quick: bool = False,
                steps: int | None = None) -> tuple[list[dict], list[dict]]:
    """(the records whose steps, batch and sequence length are their size's in this plan, the
    others): a pilot's records (``--steps``) must not stand in for the study's runs."""
    table = edition.quick_sizes if quick else edition.sizes
    budgets = {s.name: (steps or s.steps, s.batch_size, s.seq_len) for s in table.values()}
    keep, drop = [], []
    for r in records:
        budget = budgets.get(r["size"])
        (keep if budget is None or budget == (r.get("steps"), r.get("batch_size"), r.get("seq_len"))
         else drop).append(r)
    return keep, drop


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
    """The runs in the order that loses least when a time budget cuts the tail: tier by tier,
    and in a tier every cell's first-seed sweep, then the other sweep seeds, then the best-lr
    seeds."""
    def phase(run: RunSpec, cell: Cell) -> int:
        if run.stage == "best_lr":
            return 2
        return 0 if run.seed == cell.tier.seeds[0] else 1
    ordered = [(cell.tier.number, phase(run, cell), i, j, run)
               for i, cell in enumerate(cells) for j, run in enumerate(cell.runs)]
    return [run for *_, run in sorted(ordered, key=lambda t: t[:4])]


def _done_key(record: dict) -> tuple:
    rule = record.get("lr_rule") or ("best" if record["stage"] == "best_lr" else None)
    return (record["size"], record["optimizer"], record["seed"], record["stage"], rule)


def not_finished(runs: list[RunSpec], finished: list[dict]) -> list[RunSpec]:
    """The runs that no earlier record finished (a best-lr or transfer run counts by size,
    optimizer, seed and rule, whatever lr it took)."""
    done = {r["id"] for r in finished}
    done_rules = {_done_key(r) for r in finished if r["stage"] != "sweep"}
    return [run for run in runs if run.run_id not in done
            and not (run.rule and (run.size, run.optimizer, run.seed, run.stage, run.rule) in done_rules)]


def split_stale(records: list[dict], cells: list[Cell]) -> tuple[list[dict], list[dict]]:
    """(the records that stand, the stale ones): a best-lr or transfer run is stale when its lr
    is not the one its rule picks from the sweep records now (the sweep changed after it ran:
    its runs were run again on another corpus, say). A stale run is run again and reported as
    left out; while the sweep is incomplete, no run is judged stale."""
    cell_of = {(c.size.name, c.spec.name): c for c in cells}
    keep, stale = [], []
    for r in records:
        cell = cell_of.get((r["size"], r["optimizer"]))
        lr = None
        if r["stage"] != "sweep" and cell is not None:
            run = RunSpec(r["size"], r["optimizer"], None, r["seed"], r["stage"], cell.tier.number, _done_key(r)[-1])
            lr, _ = resolve_lr(run, cell, records)
        (stale if lr is not None and not math.isclose(lr, r["lr"]) else keep).append(r)
    return keep, stale


def best_lr(records: list[dict], size: str, optimizer: str, seed: int) -> float | None:
    """The learning rate of the lowest final validation loss among finished sweep runs."""
    done = [r for r in records if r["size"] == size and r["optimizer"] == optimizer and r["seed"] == seed
            and r["stage"] == "sweep" and r["status"] == "ok"]
    return min(done, key=lambda r: r["final_val_loss"])["lr"] if done else None


def waits_for(run: RunSpec, cell: Cell) -> tuple[str, str, int] | None:
    """The (size, optimizer, seed) whose sweep a best-lr or transfer run needs, else None."""
    return None if run.lr is not None else (cell.source, run.optimizer, cell.select_seed)


def resolve_lr(run: RunSpec, cell: Cell, records: list[dict]) -> tuple[float | None, str]:
    """(the run's learning rate, a note) from finished records; (None, why) while it cannot be
    chosen. A best-lr or transfer run needs every lr of its source sweep finished."""
    if run.lr is not None:
        return run.lr, ""
    source, optimizer, seed = waits_for(run, cell)
    sweep = {r["lr"]: r for r in records if (r["size"], r["optimizer"], r["seed"], r["stage"])
             == (source, optimizer, seed, "sweep") and r["status"] in ("ok", "diverged")}
    missing = [lr for lr in cell.lrs if lr not in sweep]
    if missing:
        return None, (f"the {source} sweep of {optimizer} (seed {seed}) is not complete: no finished run at lr "
                      f"{', '.join(f'{lr:g}' for lr in missing)}")
    best = best_lr(list(sweep.values()), source, optimizer, seed)
    if best is None:
        return None, f"every run of the {source} sweep of {optimizer} (seed {seed}) diverged"
    if run.stage == "best_lr":
        return best, ""
    offset = int(run.rule.split("best", 1)[1] or 0)
    grid = sorted(cell.lrs)
    i = grid.index(best)
    if 0 <= i + offset < len(grid):
        return grid[i + offset], ""
    if offset and 0 <= i - offset < len(grid):
        return grid[i - offset], (f"{source}-best {best:g} is at the end of the grid: the point on its other side, "
                                  f"{grid[i - offset]:g}, stands in")
    return None, f"no grid point {offset:+d} from {source}-best {best:g}"


# ---------------------------------------------------------------------------- estimates


def measured_wall_s(records: list[dict], size: str, optimizer: str, keep=lambda record: True) -> float | None:
    """The median wall seconds of the finished straight (never resumed) runs of ``size`` that
    ``keep`` accepts: those of ``optimizer`` when there are MEASURED_WALLS of them (an optimizer's
    step can cost far more than another's: Muon's Newton-Schulz iterations), else those of every
    optimizer of the size; None with fewer still."""
    straight = [r for r in records if r["size"] == size and r["status"] == "ok" and not r.get("resumed_at")
                and keep(r)]
    for walls in ([r["wall_s"] for r in straight if r["optimizer"] == optimizer], [r["wall_s"] for r in straight]):
        if len(walls) >= MEASURED_WALLS:
            return statistics.median(walls)
    return None


def memory_estimate_bytes(size: Size, num_parameters: int, corpus_bytes: int) -> int:
    """Rough GPU memory of one run: float32 weights, gradients and two moments (16 bytes per
    parameter), bf16 activations, the logits, the corpus on the device and the process."""
    tokens = size.batch_size * size.seq_len
    activations = ACTIVATION_BYTES_PER_TOKEN_LAYER_DIM * tokens * size.layers * size.dim
    logits = tokens * 256 * 10  # bf16 logits, their float32 copy and its gradient
    return 16 * num_parameters + activations + logits + corpus_bytes + PROCESS_OVERHEAD_BYTES


def _fmt_tokens(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def machine_line(gpu_s: float, gpus: int) -> str:
    machine_s = gpu_s / gpus
    calls = math.ceil(machine_s / DEVICE_CALL_S) if machine_s else 0
    return (f"on {gpus} GPU{'s' * (gpus > 1)} about {machine_s / 60:.0f} min of machine time "
            f"({calls} call{'s' * (calls != 1)} of up to {DEVICE_CALL_S // 60} min)")


def plan_lines(edition: Edition, shards: list[list[Cell]], finished: list[dict], *, gpus: int = 2,
               corpus_note: list[str] | None = None) -> list[str]:
    """The plan (``--plan``): the sizes, every run of every tier with its tokens and estimated
    time, the total per tier and per shard, and how many runs fit side by side per GPU."""
    from magma_ext.demo import Llama  # the parameter counts; the rest of the plan needs no torch

    cells = [c for shard in shards for c in shard]
    sizes = sorted({c.size.name: c.size for c in cells}.values(), key=lambda s: s.tokens)
    measured = {s.name: MEASURED_TOKENS_PER_S.get(s.name) for s in sizes}
    lines = [f"Edition {edition.number} of the convergence study: "
             f"{sum(len(not_finished(shard_runs(s), finished)) for s in shards)} runs to go"
             + (f" ({len(finished)} finished runs from --resume left out)" if finished else "") + "."]
    gpu_estimates = any(s.tokens_per_s for s in sizes)
    if gpu_estimates:
        rates = ", ".join(f"{s.name} {s.tokens_per_s / 1e6:.2f}M ("
                          + (f"measured on {measured[s.name]}" if measured[s.name] else "PLACEHOLDER, not measured")
                          + ")" for s in sizes)
        lines.append(f"Estimates from whole-step tokens/s per GPU: {rates} (all the runs that share a GPU "
                     "together; definition.TOKENS_PER_S"
                     + ("" if all(measured.values()) else ": measure a placeholder with --mode throughput and a "
                        "short --parallel sweep, then replace it") + f"), plus {sizes[0].setup_s:.0f} s of start-up "
                     "per run (shared by the runs beside it). Where --resume holds "
                     f"{MEASURED_WALLS} finished straight runs of a size at its planned parallelism, the median of "
                     "their wall times replaces the estimate (of the run's own optimizer where it has that many).")
    for size in sizes:
        params = Llama(size.model_config()).num_parameters()
        lines.append(f"size {size.name}: {params / 1e6:.2f}M parameters (dim {size.dim} x {size.layers} layers x "
                     f"{size.heads} heads), {size.steps:,} steps x {size.batch_size} x {size.seq_len} = "
                     f"{_fmt_tokens(size.tokens)} tokens per run ({size.tokens / params:.3g} per parameter); "
                     f"evaluation every {size.eval_every} steps on {size.eval_batches} batches, the final one on "
                     f"{size.final_eval_batches or size.eval_batches}")
        if size.tokens_per_s:
            memory = memory_estimate_bytes(size, params, size.training_bytes_needed)
            k = size.side_by_side
            fits = GPU_MEMORY_BYTES // memory
            wall = f"a run takes about {size.wall_s(1) / 60:.1f} min alone on a GPU"
            if k > 1:
                wall += f", {size.wall_s(k) / 60:.1f} min with {k} side by side"
            if size.wall_s(k) > DEVICE_CALL_S:
                wall += (": longer than one device call, so it goes on from its checkpoint in the next call on "
                         "the same machine")
            how = "measured" if MEASURED_SIDE_BY_SIDE.get(size.name) else "not measured"
            lines.append(f"  side by side: {k} run{'s' * (k > 1)} per GPU planned "
                         f"({how}, definition.SIDE_BY_SIDE); about {fits} fit "
                         f"in {GPU_MEMORY_BYTES / 2**30:.0f} GiB by a memory estimate of {memory / 2**30:.1f} GiB per "
                         f"run (the corpus on the GPU included); {wall}")
    lines += corpus_note or []

    total_runs, total_tokens, total_s = 0, 0, 0.0
    for i, shard in enumerate(shards, 1):
        if len(shards) > 1:
            lines.append(f"shard {i}/{len(shards)}:")
        for number in sorted({c.tier.number for c in shard}):
            tier_cells = [c for c in shard if c.tier.number == number]
            tier = tier_cells[0].tier
            runs = not_finished(shard_runs(tier_cells), finished)
            by_cell = {(c.size.name, c.spec.name): c for c in tier_cells}
            lines.append(f"tier {number} ({tier_cells[0].size.name}): {tier.note or 'every optimizer over its grid'}")
            lines.append(f"  {'run':<40} {'stage':<8} {'lr':<22} {'tokens':>8} {'est. min':>8}")
            seconds, tokens = 0.0, 0
            for run in runs:
                cell = by_cell[(run.size, run.optimizer)]
                size = cell.size
                wall = measured_wall_s(finished, size.name, run.optimizer,
                                       lambda r: r.get("side_by_side", 1) == size.side_by_side)
                s = size.estimate_s(run.optimizer) if wall is None else wall / size.side_by_side
                seconds += s
                tokens += size.tokens
                lr = (f"{run.lr:g}" if run.lr is not None else
                      "best lr of the sweep" if run.stage == "best_lr" else run.rule)
                known, _ = resolve_lr(run, cell, finished) if run.lr is None else (None, "")
                lr += f" = {known:g}" if known is not None else ""
                lines.append(f"  {run.run_id:<40} {run.stage:<8} {lr:<22} {_fmt_tokens(size.tokens):>8} "
                             f"{s / 60:>8.2f}")
            unit = "GPU-min" if gpu_estimates else "min"
            lines.append(f"  tier {number}: {len(runs)} runs, {_fmt_tokens(tokens)} tokens, {seconds / 60:.1f} {unit}"
                         + (f"; {machine_line(seconds, gpus)}" if gpu_estimates else ""))
            total_runs, total_tokens, total_s = total_runs + len(runs), total_tokens + tokens, total_s + seconds
    overhead = INVOCATION_OVERHEAD_S * len(shards) if total_runs else 0.0
    lines.append(f"total: {total_runs} runs, {_fmt_tokens(total_tokens)} tokens, "
                 f"{(total_s + overhead) / 60:.1f} {'GPU-min' if gpu_estimates else 'min'}"
                 + (f"; {machine_line(total_s + overhead, gpus)}" if gpu_estimates else
                    f" ({INVOCATION_OVERHEAD_S:.0f} s start-up per shard included)"))
    return lines
