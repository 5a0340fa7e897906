"""What the run records say: each cell's best learning rate, the range of learning rates near
it, and the seed ranges there.

The best learning rate of a (size, optimizer) cell is the one with the lowest mean final
validation perplexity over the seeds that every learning rate of the cell ran (seed 0 alone
where only the best learning rate got more seeds); the summary then gives the mean and the
range over all seeds at that learning rate. A diverged run counts as infinite perplexity. A
transfer cell (tier 3: two learning rates chosen at another size) has no grid of its
own, so it has no edge and no stable range. A cell whose sweep lacks some of its grid's learning
rates says which (``missing_lrs``): its best learning rate is then only the best of those run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .definition import Edition


def ppl(run: dict) -> float:
    return run["final_val_ppl"] if run["status"] == "ok" else math.inf


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


@dataclass
class CellSummary:
    """One (size, optimizer) cell: its best learning rate and the runs there."""

    size: str
    optimizer: str
    lrs: list[float]
    best_lr: float
    best_runs: list[dict]
    selection_seeds: list[int]
    edge: str | None  # "lowest" / "highest" when the best lr is at the end of the grid
    scores: dict[float, float] = field(default_factory=dict)  # lr -> the perplexity it was judged by
    transfer: bool = False  # learning rates chosen at another size (no grid of its own)
    missing_lrs: list[float] = field(default_factory=list)  # learning rates of its grid not run yet

    @property
    def complete(self) -> bool:
        """Every learning rate of its grid ran (a transfer cell has no grid: always complete)."""
        return not self.missing_lrs

    def near_best(self, within: float) -> list[float]:
        """The learning rates whose perplexity is within ``within`` (relative) of the best one."""
        return [lr for lr in self.lrs if self.scores.get(lr, math.inf) <= self.scores[self.best_lr] * (1 + within)]

    @property
    def ppls(self) -> list[float]:
        return [ppl(r) for r in self.best_runs]

    @property
    def mean_ppl(self) -> float:
        return mean(self.ppls)

    @property
    def low(self) -> float:
        return min(self.ppls)

    @property
    def high(self) -> float:
        return max(self.ppls)


Summary = dict[str, dict[str, CellSummary]]


def summarize(runs: list[dict], edition: Edition, *, quick: bool = False) -> Summary:
    """size -> optimizer -> summary, sizes by parameter count, optimizers in the edition's order;
    ``quick``: the grids are the edition's ``--quick`` ones."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        cells.setdefault((r["size"], r["optimizer"]), []).append(r)
    out: Summary = {}
    for (size, optimizer), cell_runs in cells.items():
        by_lr: dict[float, dict[int, dict]] = {}
        for r in cell_runs:
            by_lr.setdefault(r["lr"], {})[r["seed"]] = r
        common = set.intersection(*(set(seeds) for seeds in by_lr.values()))
        if not common:  # no seed ran at every lr: judge each lr by all of its seeds
            score = {lr: mean(ppl(r) for r in seeds.values()) for lr, seeds in by_lr.items()}
        else:
            score = {lr: mean(ppl(seeds[s]) for s in common) for lr, seeds in by_lr.items()}
        lrs = sorted(by_lr)
        best = min(lrs, key=lambda lr: score[lr])
        transfer = all(r["stage"] == "transfer" for r in cell_runs)
        edge = None
        if len(lrs) > 1 and math.isfinite(score[best]) and not transfer:
            edge = "lowest" if best == lrs[0] else "highest" if best == lrs[-1] else None
        grid = () if transfer or optimizer not in edition.optimizers else \
            edition.lrs(edition.optimizers[optimizer], quick)
        swept = {r["lr"] for r in cell_runs if r["stage"] == "sweep"}  # a best-lr seed fills no gap
        missing = [lr for lr in grid if not any(math.isclose(lr, ran) for ran in swept)]
        out.setdefault(size, {})[optimizer] = CellSummary(
            size, optimizer, lrs, best, [by_lr[best][s] for s in sorted(by_lr[best])], sorted(common), edge,
            {lr: score[lr] for lr in lrs}, transfer, missing)
    params = {r["size"]: r["num_parameters"] for r in runs if r.get("num_parameters")}
    sizes = sorted(out, key=lambda s: (params.get(s, 0), s))
    return {s: {o: out[s][o] for o in sorted(out[s], key=edition.optimizer_rank)} for s in sizes}


def passes(cells: dict[str, CellSummary]) -> float | None:
    """How often the best runs of a size's cells read their training bytes, where more than once
    (the most of them; a size's runs share one corpus and one budget, so one number)."""
    most = max((r.get("passes") or 1 for cell in cells.values() for r in cell.best_runs), default=1)
    return most if most > 1 else None


def size_label(size: str, cells: dict[str, CellSummary]) -> str:
    """The size's name, with the passes over its training bytes where its runs read them more than
    once: every result of such a size says so."""
    read = passes(cells)
    return size if read is None else f"{size} ({read:.2f} passes)"


def seeds_run(runs: list[dict], size: str) -> str:
    """Which seeds ran for a size, from the records: at every lr, and at the best lr only."""
    sweep = [r for r in runs if r["size"] == size and r["stage"] == "sweep"]
    cells = {(r["optimizer"], r["lr"]) for r in sweep}
    every = sorted(seed for seed in {r["seed"] for r in sweep}
                   if all(any(r["seed"] == seed and (r["optimizer"], r["lr"]) == c for r in sweep) for c in cells))
    best = sorted({r["seed"] for r in runs if r["size"] == size and r["stage"] == "best_lr"})
    transfer = sorted({r["seed"] for r in runs if r["size"] == size and r["stage"] == "transfer"})
    if transfer and not sweep:
        rules = sorted({r["lr_rule"] for r in runs if r["size"] == size and r["stage"] == "transfer"})
        return f"{transfer} at {' and '.join(rules)}"
    text = f"{every} at every lr"
    return text + (f"; {best} at the best lr of seed {every[0] if every else 0}" if best else "")


@dataclass
class SizeGap:
    """How ``subject`` compares with ``baseline`` at one size: their best mean final perplexities,
    the relative gap between them (``subject / baseline - 1``: below 0, the subject is better) and
    the gap of each seed both ran at their best lrs."""

    size: str
    label: str  # the size with its passes over the data where more than one (:func:`size_label`)
    parameters: int
    body_parameters: int  # without the embedding and the untied LM head
    tokens: int
    subject: CellSummary
    baseline: CellSummary
    seed_gaps: dict[int, float]

    @property
    def gap(self) -> float:
        return self.subject.mean_ppl / self.baseline.mean_ppl - 1


def gaps_by_size(summary: Summary, subject: str, baseline: str) -> dict[str, SizeGap]:
    """size -> :class:`SizeGap`, for the sizes where both cells ran and neither diverged."""
    out = {}
    for size, cells in summary.items():
        a, b = cells.get(subject), cells.get(baseline)
        if a is None or b is None or not (math.isfinite(a.mean_ppl) and math.isfinite(b.mean_ppl)):
            continue
        run = a.best_runs[0]
        model = run.get("model") or {}
        embeddings = 2 * model.get("vocab_size", 0) * model.get("dim", 0)
        by_seed = ({r["seed"]: ppl(r) for r in a.best_runs}, {r["seed"]: ppl(r) for r in b.best_runs})
        seed_gaps = {s: by_seed[0][s] / by_seed[1][s] - 1 for s in sorted(by_seed[0].keys() & by_seed[1].keys())}
        out[size] = SizeGap(size, size_label(size, cells), run["num_parameters"], run["num_parameters"] - embeddings,
                            run.get("tokens", 0), a, b, seed_gaps)
    return out
