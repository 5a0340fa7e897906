"""The plan: which runs the study's tiers hold, in which order they run, which of them --resume
leaves out, how a best-lr or transfer run finds its learning rate, and what the runs are
estimated to cost."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .definition import MEASURED_TOKENS_PER_S, Edition, Recipe, Size, Tier, spelled
from .records import run_id

# A device call runs at most 10 minutes; what it can give to runs, start-up and copies aside.
DEVICE_CALL_S = 540
# A lent machine is held at most 30 minutes, its start included; a checkpoint cannot leave it, so a
# run longer than one call must end on the machine it started on.
MACHINE_HOLD_S = 30 * 60
# GPU memory of one H100 as the device tool lends it.
GPU_MEMORY_BYTES = 78 * 2**30
# CUDA context, allocator slack and torch.compile's workspace of one process, roughly.
PROCESS_OVERHEAD_BYTES = 2 * 2**30
# Bytes of saved activations per token, layer and model dimension under bf16 autocast with a
# fused attention kernel (the usual estimate for a pre-norm transformer block: 34).
ACTIVATION_BYTES_PER_TOKEN_LAYER_DIM = 34


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
    """All runs of one (size, optimizer) pair of one tier. ``lrs`` is the grid its learning rates
    come from; ``source`` the size whose sweep chooses them (``select_seed``'s runs there) for
    best-lr and transfer runs."""

    tier: Tier
    size: Size
    spec: Recipe
    lrs: tuple[float, ...]
    source: str
    select_seed: int
    runs: list[RunSpec] = field(default_factory=list)


def _select_seed(edition_tiers: tuple[Tier, ...], size_key: str, optimizer: str) -> int:
    """The seed whose sweep picks the best lr of (size, optimizer): its tier's first seed."""
    return next((t.seeds[0] for t in edition_tiers
                 if t.size == size_key and optimizer in t.optimizers and not t.transfer_from), 0)


def make_cells(edition: Edition, *, quick: bool = False, tiers: list[int] | None = None,
               optimizers: list[str] | None = None) -> list[Cell]:
    """The cells of the edition's tiers (its quick ones with ``quick``), less those the filters
    leave out."""
    size_table = edition.quick_sizes if quick else edition.sizes
    all_tiers = edition.quick_tiers if quick else edition.tiers
    cells = []
    for tier in all_tiers:
        if tiers and tier.number not in tiers:
            continue
        size = size_table[tier.size]
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
            cells.append(cell)
    return cells


def ordered_runs(cells: list[Cell]) -> list[RunSpec]:
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


def memory_estimate_bytes(size: Size, num_parameters: int, corpus_bytes: int) -> int:
    """Rough GPU memory of one run: float32 weights, gradients and two moments (16 bytes per
    parameter), bf16 activations, the logits, the corpus on the device and the process."""
    tokens = size.batch_size * size.seq_len
    activations = ACTIVATION_BYTES_PER_TOKEN_LAYER_DIM * tokens * size.layers * size.dim
    logits = tokens * 256 * 10  # bf16 logits, their float32 copy and its gradient
    return 16 * num_parameters + activations + logits + corpus_bytes + PROCESS_OVERHEAD_BYTES


def _fmt_tokens(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def calls_line(seconds: float) -> str:
    calls = math.ceil(seconds / DEVICE_CALL_S) if seconds else 0
    return f"{calls} device call{'s' * (calls != 1)} of up to {DEVICE_CALL_S // 60} min on one GPU"


def throughput_command(size_key: str, optimizers: list[str]) -> str:
    """The one device call that measures a size's whole-step tokens/s (``--mode throughput``)."""
    return (f"bash benchmarks/study_device_run.sh throughput_{size_key} {DEVICE_CALL_S} --mode throughput "
            f"--size {size_key} --optimizers {','.join(optimizers)} --repeats 1")


def long_run_note(seconds: float) -> str:
    """What the plan says of a run longer than one device call."""
    per_machine = int(MACHINE_HOLD_S // seconds)
    return (": longer than one device call, so it goes on from its checkpoint in the next call on the same "
            f"machine; a machine is held at most {MACHINE_HOLD_S // 60} min, so {spelled(per_machine)} such "
            f"run{'s' * (per_machine != 1)} fit{'s' * (per_machine == 1)} on one, and a run must end on the "
            "machine it started on" if seconds > DEVICE_CALL_S else "")


def plan_lines(edition: Edition, cells: list[Cell], finished: list[dict], corpus_note: list[str]) -> list[str]:
    """The plan (``--plan``): the sizes, every run of every tier with its tokens and estimated
    time on one GPU, and the total per tier."""
    from magma_ext.demo import Llama  # the parameter counts; the rest of the plan needs no torch

    sizes = sorted({c.size.name: c.size for c in cells}.values(), key=lambda s: s.tokens)
    measured = {s.name: MEASURED_TOKENS_PER_S.get(s.name) for s in sizes}
    rates = ", ".join(f"{s.name} {s.tokens_per_s / 1e6:.2f}M ("
                      + (f"measured on {measured[s.name]}" if measured[s.name] else "PLACEHOLDER, not measured")
                      + ")" for s in sizes)
    lines = [f"Edition {edition.number} of the convergence study: {len(not_finished(ordered_runs(cells), finished))} "
             "runs to go" + (f" ({len(finished)} finished runs from --resume left out)" if finished else "") + ".",
             f"Estimates from whole-step tokens/s of one GPU: {rates} (definition.TOKENS_PER_S"
             + ("" if all(measured.values()) else ": measure a placeholder with --mode throughput, then replace it")
             + f"), plus {sizes[0].setup_s:.0f} s of start-up per run." if sizes else "No runs."]
    for size in (s for s in sizes if not measured[s.name]):
        here = [c for c in cells if c.size.name == size.name]
        lines.append(f"Measure {size.name}'s tokens/s first, in one device call on the kind of GPU that will run it: "
                     + throughput_command(here[0].tier.size, list(dict.fromkeys(c.spec.name for c in here))))
    for size in sizes:
        params = Llama(size.model_config()).num_parameters()
        memory = memory_estimate_bytes(size, params, size.training_bytes_needed // size.max_passes)
        alone = size.estimate_s()
        lines.append(f"size {size.name}: {params / 1e6:.2f}M parameters (dim {size.dim} x {size.layers} layers x "
                     f"{size.heads} heads), {size.steps:,} steps x {size.batch_size} x {size.seq_len} = "
                     f"{_fmt_tokens(size.tokens)} tokens per run ({size.tokens / params:.3g} per parameter); "
                     f"evaluation every {size.eval_every} steps on {size.eval_batches} batches, the final one on "
                     f"{size.final_eval_batches or size.eval_batches}; about {memory / 2**30:.1f} GiB of GPU memory "
                     f"(of {GPU_MEMORY_BYTES / 2**30:.0f}); a run takes about {alone / 60:.1f} min"
                     + long_run_note(alone))
    lines += corpus_note
    total_runs, total_tokens, total_s = 0, 0, 0.0
    for number in sorted({c.tier.number for c in cells}):
        tier_cells = [c for c in cells if c.tier.number == number]
        tier = tier_cells[0].tier
        runs = not_finished(ordered_runs(tier_cells), finished)
        by_cell = {(c.size.name, c.spec.name): c for c in tier_cells}
        lines.append(f"tier {number} ({tier_cells[0].size.name}): {tier.note or 'every optimizer over its grid'}")
        lines.append(f"  {'run':<40} {'stage':<8} {'lr':<22} {'tokens':>8} {'est. min':>8}")
        seconds, tokens = 0.0, 0
        for run in runs:
            cell = by_cell[(run.size, run.optimizer)]
            seconds += cell.size.estimate_s()
            tokens += cell.size.tokens
            lr = (f"{run.lr:g}" if run.lr is not None else
                  "best lr of the sweep" if run.stage == "best_lr" else run.rule)
            known, _ = resolve_lr(run, cell, finished) if run.lr is None else (None, "")
            lr += f" = {known:g}" if known is not None else ""
            lines.append(f"  {run.run_id:<40} {run.stage:<8} {lr:<22} {_fmt_tokens(cell.size.tokens):>8} "
                         f"{cell.size.estimate_s() / 60:>8.2f}")
        lines.append(f"  tier {number}: {len(runs)} runs, {_fmt_tokens(tokens)} tokens, {seconds / 60:.1f} GPU-min "
                     f"({calls_line(seconds)})")
        total_runs, total_tokens, total_s = total_runs + len(runs), total_tokens + tokens, total_s + seconds
    lines.append(f"total: {total_runs} runs, {_fmt_tokens(total_tokens)} tokens, {total_s / 60:.1f} GPU-min "
                 f"({calls_line(total_s)})")
    return lines
