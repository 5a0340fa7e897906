"""Report of the convergence study: plots and a Markdown page from the run records.

Usage (from the repository root; ``convergence.py report ...`` is the same)::

    python benchmarks/plot_convergence.py --inputs benchmarks/results/convergence shard1.json shard2.json

``--inputs`` takes JSON files (single records or the bundles of ``--bundle``) and folders
(searched recursively). Runs are matched by their id (size, optimizer, lr, seed), so a record
found both in a folder and in a bundle counts once. The page goes to ``--page`` (default
``benchmarks/results/convergence.md``), the plots beside it in a folder named after the page.

The best learning rate of a (size, optimizer) cell is the one with the lowest mean final
validation perplexity over the seeds that every learning rate of the cell ran (seed 0 alone
where only the best learning rate got a second seed); the table then gives the mean and the
range over all seeds at that learning rate. A diverged run counts as infinite perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PAGE = REPO / "benchmarks" / "results" / "convergence.md"
OPTIMIZER_ORDER = ("AdamW", "RMSProp", "SkipUpdate", "Magma-Adam", "Magma-RMSProp", "Muon")
COLORS = {"AdamW": "tab:blue", "RMSProp": "tab:gray", "SkipUpdate": "tab:brown", "Magma-Adam": "tab:orange",
          "Magma-RMSProp": "tab:red", "Muon": "tab:green"}
# The paper's ordering of best perplexities, Magma-RMSProp < Magma-Adam / Muon < Adam, as the
# pairwise relations it implies ("a < b": a reaches the lower perplexity).
PAPER_ORDER = "Magma-RMSProp < Magma-Adam / Muon < AdamW"
PAPER_RELATIONS = (("Magma-RMSProp", "Magma-Adam"), ("Magma-RMSProp", "Muon"),
                   ("Magma-Adam", "AdamW"), ("Muon", "AdamW"))


# ---------------------------------------------------------------------------- loading


@dataclass
class Study:
    """Everything the inputs hold, runs de-duplicated by id."""

    runs: list[dict] = field(default_factory=list)
    throughput: list[dict] = field(default_factory=list)
    metas: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def json_files(paths: list[str]) -> list[Path]:
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.json") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def load_study(paths: list[str]) -> Study:
    runs, throughput, study = {}, {}, Study()
    for path in json_files(paths):
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"warning: skipping {path}: {exc}", file=sys.stderr)
            continue
        kind = obj.get("kind") if isinstance(obj, dict) else None
        if kind == "bundle":
            study.metas.append(obj.get("meta", {}))
            study.skipped += obj.get("skipped", [])
            records = obj.get("runs", []) + obj.get("throughput", [])
        elif kind == "meta":
            study.metas.append(obj["meta"])
            records = []
        elif kind in ("run", "throughput"):
            records = [obj]
        else:
            continue  # not a record of this study
        for r in records:
            if r["kind"] == "run":
                # One run can sit in a folder and in a bundle; a finished copy wins over a failed one.
                if r["id"] not in runs or (runs[r["id"]]["status"] != "ok" and r["status"] == "ok"):
                    runs[r["id"]] = r
            else:
                throughput[(r["size"], r["optimizer"], r.get("date"))] = r
    study.runs = list(runs.values())
    study.throughput = list(throughput.values())
    done = set(runs)
    study.skipped = [s for s in study.skipped if s["id"] not in done]
    return study


# ---------------------------------------------------------------------------- summary


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


def summarize(runs: list[dict]) -> dict[str, dict[str, CellSummary]]:
    """size -> optimizer -> summary, sizes by parameter count, optimizers in a fixed order."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        cells.setdefault((r["size"], r["optimizer"]), []).append(r)
    out: dict[str, dict[str, CellSummary]] = {}
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
        edge = None
        if len(lrs) > 1 and math.isfinite(score[best]):
            edge = "lowest" if best == lrs[0] else "highest" if best == lrs[-1] else None
        out.setdefault(size, {})[optimizer] = CellSummary(
            size, optimizer, lrs, best, [by_lr[best][s] for s in sorted(by_lr[best])], sorted(common), edge,
            {lr: score[lr] for lr in lrs})
    params = {r["size"]: r["num_parameters"] for r in runs if r.get("num_parameters")}
    sizes = sorted(out, key=lambda s: (params.get(s, 0), s))
    return {s: {o: out[s][o] for o in sorted(out[s], key=_optimizer_rank)} for s in sizes}


def _optimizer_rank(name: str) -> tuple[int, str]:
    return (OPTIMIZER_ORDER.index(name) if name in OPTIMIZER_ORDER else len(OPTIMIZER_ORDER), name)


# ---------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def mean_curve(runs: list[dict], key: str) -> tuple[list[float], list[float]]:
    """The mean over runs of a [step, loss] curve, on the steps that every run has."""
    curves = [dict(r[key]) for r in runs if r["status"] == "ok" and r.get(key)]
    if not curves:
        return [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [mean(c[s] for c in curves) for s in steps]


def plot_val_curves(summary: dict[str, dict[str, CellSummary]], path: Path) -> None:
    """Per size: validation loss at each optimizer's best lr (mean over seeds), the whole run
    and the second half of it."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(summary), 2, figsize=(12, 4.2 * len(summary)), squeeze=False)
    for row, (size, cells) in enumerate(summary.items()):
        tail_values = []
        for name, cell in cells.items():
            steps, losses = mean_curve(cell.best_runs, "val_loss")
            if not steps:
                continue
            tokens_per_step = cell.best_runs[0]["batch_size"] * cell.best_runs[0]["seq_len"]
            x = [s * tokens_per_step / 1e6 for s in steps]
            label = f"{name} (lr {cell.best_lr:g}, {len(cell.best_runs)} seed{'s' * (len(cell.best_runs) > 1)})"
            for ax in axes[row]:
                ax.plot(x, losses, marker="o", markersize=3, color=COLORS.get(name), label=label)
            half = [(xi, li) for xi, li in zip(x, losses) if xi >= x[-1] / 2]
            tail_values += [li for _, li in half]
            axes[row][1].set_xlim(left=half[0][0])
        if tail_values:
            lo, hi = min(tail_values), max(tail_values)
            pad = 0.05 * (hi - lo) + 1e-3
            axes[row][1].set_ylim(lo - pad, hi + pad)
        for ax, title in zip(axes[row], ("whole run", "second half")):
            ax.set_title(f"{size}: validation loss at the best lr, {title}", fontsize=10)
            ax.set_xlabel("training tokens (M)")
            ax.set_ylabel("val loss (nats per byte)")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ppl_vs_lr(summary: dict[str, dict[str, CellSummary]], runs: list[dict], path: Path) -> None:
    """Per size: final validation perplexity against learning rate (log x), the mean over seeds
    as a line and each seed as a dot; diverged runs as crosses on the top edge."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(summary), figsize=(6.5 * len(summary), 4.5), squeeze=False)
    for ax, (size, cells) in zip(axes[0], summary.items()):
        finite = [ppl(r) for r in runs if r["size"] == size and math.isfinite(ppl(r))]
        if not finite:
            continue
        best = min(finite)
        top = min(max(finite), best * 2.5) * 1.01
        for name in cells:
            cell_runs = [r for r in runs if r["size"] == size and r["optimizer"] == name]
            lrs = sorted({r["lr"] for r in cell_runs})
            means = [mean(ppl(r) for r in cell_runs if r["lr"] == lr) for lr in lrs]
            color = COLORS.get(name)
            ax.plot([lr for lr, m in zip(lrs, means) if math.isfinite(m)], [m for m in means if math.isfinite(m)],
                    marker="o", color=color, label=name)
            for r in cell_runs:
                if ppl(r) <= top:
                    ax.plot(r["lr"], ppl(r), ".", color=color, alpha=0.5)
                else:  # off the scale: marked on the top edge, a cross where it diverged
                    ax.plot(r["lr"], top, "x" if math.isinf(ppl(r)) else "^", color=color, markersize=8,
                            clip_on=False)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels collide on short ranges
        ax.set_ylim(best * 0.98, top)
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("final validation perplexity (per byte)")
        ax.set_title(f"{size}: final val perplexity vs lr (top edge: ^ above the axis, x diverged)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- the page


def fmt_ppl(cell: CellSummary) -> str:
    if not math.isfinite(cell.mean_ppl):
        bad = sum(not math.isfinite(p) for p in cell.ppls)
        return f"diverged ({bad}/{len(cell.ppls)} seeds)"
    if len(cell.ppls) == 1:
        return f"{cell.mean_ppl:.4f} (1 seed)"
    return f"{cell.mean_ppl:.4f} [{cell.low:.4f}, {cell.high:.4f}] ({len(cell.ppls)} seeds)"


def results_table(summary: dict[str, dict[str, CellSummary]]) -> list[str]:
    lines = ["| size | optimizer | best lr | final val ppl: mean [min, max] | wall s / run | peak MiB |",
             "|---|---|---:|---|---:|---:|"]
    for size, cells in summary.items():
        for name, cell in cells.items():
            walls = [r["wall_s"] for r in cell.best_runs if r.get("wall_s") is not None]
            peaks = [r["peak_mem_bytes"] for r in cell.best_runs if r.get("peak_mem_bytes")]
            edge = f" ({cell.edge} of grid)" if cell.edge else ""
            lines.append(f"| {size} | {name} | {cell.best_lr:g}{edge} | {fmt_ppl(cell)} | "
                         f"{mean(walls):.1f} | {f'{max(peaks) / 2**20:,.0f}' if peaks else 'n/a'} |")
    return lines


def sweep_table(summary: dict[str, dict[str, CellSummary]], runs: list[dict]) -> list[str]:
    """Every learning rate of every cell: mean final perplexity over the seeds that ran there."""
    lines = ["| size | optimizer | learning rate: mean final val ppl (seeds) |", "|---|---|---|"]
    for size, cells in summary.items():
        for name, cell in cells.items():
            parts = []
            for lr in cell.lrs:
                here = [r for r in runs if r["size"] == size and r["optimizer"] == name and r["lr"] == lr]
                m = mean(ppl(r) for r in here)
                value = f"{m:.4f}" if math.isfinite(m) else "diverged"
                parts.append(f"{lr:g}: {'**' + value + '**' if lr == cell.best_lr else value} ({len(here)})")
            lines.append(f"| {size} | {name} | {'; '.join(parts)} |")
    return lines


def throughput_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["No throughput records were given (`--mode throughput`).", ""]
    lines = []
    for size in sorted({r["size"] for r in rows}):
        here = sorted((r for r in rows if r["size"] == size), key=lambda r: _optimizer_rank(r["optimizer"]))
        base = next((r for r in here if r["optimizer"] == "AdamW"), None)
        first = here[0]
        lines += [f"Model {size} ({first['num_parameters'] / 1e6:.1f}M parameters), batch {first['batch_size']} x "
                  f"{first['seq_len']} tokens, {first['dtype']}, {first['env']['device_name']}, "
                  f"{first['warmup_steps']} warm-up steps then the median of {first['repeats']} windows of "
                  f"{first['timed_steps']} steps (optimizer step: median over all timed steps, "
                  f"{first['opt_step_timer']}); {first['date']}.", "",
                  "| optimizer | fused | tokens/s | vs AdamW | step ms | optimizer step ms | vs AdamW "
                  "| state MiB | peak MiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in here:
            speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.3f}x" if base else "n/a"
            opt = f"{r['opt_step_ms_median'] / base['opt_step_ms_median']:.2f}x" if base else "n/a"
            on_cuda = r["env"]["device"].startswith("cuda")
            fused = {"AdamW": "torch fused" if on_cuda else "no (CPU)", "Muon": "n/a (torch Muon)"}.get(
                r["optimizer"], "magma_ext fused" if r["magma_fused"] else "no (reference path)")
            peak = f"{r['peak_mem_bytes'] / 2**20:,.0f}" if r["peak_mem_bytes"] else "n/a"
            lines.append(f"| {r['optimizer']} | {fused} | {r['tokens_per_s']:,.0f} | {speed} | {r['step_ms']:.2f} | "
                         f"{r['opt_step_ms_median']:.3f} | {opt} | {r['state_bytes'] / 2**20:,.1f} | {peak} |")
        lines.append("")
    return lines


STABLE_WITHIN = 0.10


def ordering_statement(summary: dict[str, dict[str, CellSummary]]) -> list[str]:
    """A plain comparison of the measured ordering of best perplexities with the paper's."""
    lines = [f"The paper reports the ordering {PAPER_ORDER} (lower validation perplexity first). "
             "Below, each of the four pairwise relations it implies is checked against this study's "
             "best mean final validation perplexity per optimizer; \"separated\" means the seed ranges "
             "do not overlap (only possible where both sides have at least two seeds).", ""]
    verdicts = {}
    for size, cells in summary.items():
        finite = sorted((c.mean_ppl, name) for name, c in cells.items())
        order = " < ".join(f"{name} ({p:.4f})" if math.isfinite(p) else f"{name} (diverged)" for p, name in finite)
        lines.append(f"**{size}.** Measured order: {order}.")
        held, checked = 0, 0
        for a, b in PAPER_RELATIONS:
            if a not in cells or b not in cells:
                lines.append(f"- {a} < {b}: not checked ({a if a not in cells else b} was not run).")
                continue
            ca, cb = cells[a], cells[b]
            checked += 1
            holds = ca.mean_ppl < cb.mean_ppl
            held += holds
            both_multi = len(ca.ppls) > 1 and len(cb.ppls) > 1
            if not (math.isfinite(ca.mean_ppl) and math.isfinite(cb.mean_ppl)):
                detail = "a side diverged"
            elif both_multi:
                separated = ca.high < cb.low if holds else cb.high < ca.low
                detail = "separated" if separated else "seed ranges overlap"
            else:
                detail = "one seed on at least one side"
            lines.append(f"- {a} < {b}: {'holds' if holds else 'does not hold'} "
                         f"({ca.mean_ppl:.4f} vs {cb.mean_ppl:.4f}; {detail}).")
        verdicts[size] = (held, checked)
        edges = [f"{name} ({c.edge})" for name, c in cells.items() if c.edge]
        if edges:
            lines.append(f"- Best learning rate at an end of its grid: {', '.join(edges)}; the optimum of these "
                         "may lie outside the grid, so their best perplexity may be overstated.")
        ranges = []
        for name, c in cells.items():
            near = c.near_best(STABLE_WITHIN)
            if math.isfinite(c.mean_ppl) and len(c.lrs) > 1:
                ranges.append(f"{name} {len(near)} of {len(c.lrs)} ({near[0]:g} to {near[-1]:g})" if len(near) > 1
                              else f"{name} 1 of {len(c.lrs)} ({near[0]:g})")
        if ranges:
            lines.append(f"- Stable range (the paper claims a much wider one for Magma): learning rates within "
                         f"{STABLE_WITHIN:.0%} of each optimizer's best perplexity (over the seeds every learning rate "
                         f"ran): {'; '.join(ranges)}. A range that reaches an end of its grid may continue "
                         "beyond it.")
        lines.append("")
    full = [s for s, (h, c) in verdicts.items() if c == len(PAPER_RELATIONS) and h == c]
    partial = [f"{s}: {h} of {c} checked relations hold"
               + (f", {len(PAPER_RELATIONS) - c} not checked" if c < len(PAPER_RELATIONS) else "")
               for s, (h, c) in verdicts.items() if s not in full]
    if full:
        lines.append(f"The paper's ordering holds in full at: {', '.join(full)}.")
    if partial:
        lines.append(f"The paper's ordering is not reproduced in full ({'; '.join(partial)}).")
    lines += ["", "Not reproduced at all: the paper's models, tokenizer, data and token budgets. This study "
              "trains byte-level models of the sizes above on a few million tokens each, with learning-rate "
              "grids of four points and one or two seeds; differences smaller than the seed ranges "
              "above are not evidence either way."]
    return lines


def _merged(metas: list[dict], key: str) -> dict:
    """``meta[key]`` of every sweep invocation, merged in date order (a later one wins)."""
    merged: dict = {}
    for m in sorted((m for m in metas if m.get("mode") == "sweep"), key=lambda m: m.get("date", "")):
        merged.update(m.get(key) or {})
    return merged


def seeds_run(runs: list[dict], size: str) -> str:
    """Which seeds ran for a size, from the records: at every lr, and at the best lr only."""
    sweep = [r for r in runs if r["size"] == size and r["stage"] == "sweep"]
    cells = {(r["optimizer"], r["lr"]) for r in sweep}
    every = sorted(seed for seed in {r["seed"] for r in sweep}
                   if all(any(r["seed"] == seed and (r["optimizer"], r["lr"]) == c for r in sweep) for c in cells))
    best = sorted({r["seed"] for r in runs if r["size"] == size and r["stage"] == "best_lr"})
    text = f"{every} at every lr"
    return text + (f"; {best} at the best lr of seed {every[0] if every else 0}" if best else "")


def setup_lines(study: Study) -> list[str]:
    meta = next((m for m in study.metas if m.get("mode") == "sweep"), {})
    lines = []
    sizes = _merged(study.metas, "sizes")
    if sizes:
        lines += ["| size | parameters | dim x layers x heads | steps x batch x seq | tokens per run | seeds run |",
                  "|---|---:|---|---|---:|---|"]
        params = {r["size"]: r.get("num_parameters") for r in study.runs if r.get("num_parameters")}
        for name, s in sizes.items():
            count = f"{params[name] / 1e6:.2f}M" if name in params else "n/a"
            lines.append(f"| {name} | {count} | {s['dim']} x {s['n_layers']} x {s['n_heads']} | "
                         f"{s['steps']} x {s['batch_size']} x {s['seq_len']} | {s['tokens'] / 1e6:.2f}M | "
                         f"{seeds_run(study.runs, name)} |")
        lines.append("")
    data = meta.get("data")
    if data:
        hashes = sorted({m["data"]["val_sha1"] for m in study.metas if m.get("data")})
        lines.append(f"Data: {data['source']}, capped at {data['max_bytes']:,} bytes: {data['train_bytes']:,} "
                     f"training bytes, the last {data['val_bytes']:,} bytes of the fixed-order stream for "
                     f"validation (SHA-1 {', '.join(hashes)}"
                     f"{'; WARNING: the inputs used different validation splits' if len(hashes) > 1 else ''}).")
    optimizers = _merged(study.metas, "optimizers")
    if optimizers:
        lines += ["", "| optimizer | implementation | learning rates run (sweep), per size |", "|---|---|---|"]
        for name, o in optimizers.items():
            grids = []
            for size in sorted({r["size"] for r in study.runs if r["optimizer"] == name}):
                lrs = sorted({r["lr"] for r in study.runs
                              if r["optimizer"] == name and r["size"] == size and r["stage"] == "sweep"})
                grids.append(f"{size}: {', '.join(f'{lr:g}' for lr in lrs)}")
            lines.append(f"| {name} | {o['description']} | {'; '.join(grids) or 'not run'} |")
        lines += ["", f"Shared: betas {tuple(meta['betas'])}, weight decay {meta['weight_decay']} on 2-D weights "
                  "(embedding, norms unmasked and undecayed via `magma_ext.param_groups`, the same split for "
                  "AdamW), linear warm-up over the first 10% of steps then cosine decay to 10% of the peak, "
                  "gradient clipping at 1.0, bfloat16 autocast on CUDA (float32 on CPU), no torch.compile. "
                  "Validation: a fixed set of batches spread over the validation split, at step 0, every "
                  "tenth of the run and at the end; perplexity is per byte, exp(val loss)."]
    fused = {r["magma_fused"] for r in study.runs if r["optimizer"] not in ("AdamW", "Muon")}
    if fused:
        lines.append("")
        lines.append("Magma-based optimizers ran on " + (
            "magma_ext's fused CUDA path." if fused == {True} else
            "the PyTorch reference path (no CUDA extension or no GPU)." if fused == {False} else
            "a mix of the fused CUDA path and the reference path."))
    return lines


def provenance_lines(study: Study, argv: list[str]) -> list[str]:
    commands = sorted({m["command"] for m in study.metas if m.get("command")}
                      | {r["command"] for r in study.runs + study.throughput if r.get("command")})
    devices = sorted({r["env"]["device_name"] for r in study.runs + study.throughput if r.get("env")})
    dates = sorted({r["date"] for r in study.runs + study.throughput if r.get("date")})
    envs = sorted({(r["env"]["torch"], r["env"]["python"], r["env"].get("git_commit") or "unknown")
                   for r in study.runs + study.throughput if r.get("env")})
    lines = ["Commands that produced the records:", "", "```"] + commands + [
        "python benchmarks/plot_convergence.py " + " ".join(shlex.quote(a) for a in argv), "```", ""]
    lines.append(f"Device: {', '.join(devices) or 'unknown'}. Runs dated {dates[0]} to {dates[-1]}."
                 if dates else "No dated runs.")
    lines.append("Software: " + "; ".join(f"torch {t}, Python {p}, commit {c}" for t, p, c in envs) + ".")
    lines.append(f"Page generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.")
    return lines


def run_status_lines(study: Study) -> list[str]:
    ok = sum(r["status"] == "ok" for r in study.runs)
    lines = [f"{len(study.runs)} runs: {ok} finished, "
             f"{sum(r['status'] == 'diverged' for r in study.runs)} diverged, "
             f"{sum(r['status'] == 'error' for r in study.runs)} failed; {len(study.skipped)} skipped."]
    for r in sorted(study.runs, key=lambda r: r["id"]):
        if r["status"] != "ok":
            lines.append(f"- {r['id']}: {r['status']}: {r['error']}")
    for s in study.skipped:
        lines.append(f"- {s['id']}: skipped: {s['reason']}")
    return lines


def link(path: Path, page: Path) -> str:
    """``path`` as the page should link it: relative when it lies under the page's folder."""
    here = page.parent.resolve()
    target = path.resolve()
    return target.relative_to(here).as_posix() if target.is_relative_to(here) else target.as_posix()


def shard_note(study: Study) -> str:
    shards = sorted({(m["shard"], m["num_shards"]) for m in study.metas if m.get("mode") == "sweep"})
    if not shards:
        return ""
    return f"; this study ran as shard(s) {', '.join(f'{i}/{n}' for i, n in shards)}"


def write_page(study: Study, page: Path, plots_dir: Path, argv: list[str]) -> None:
    summary = summarize(study.runs) if study.runs else {}
    plots_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Convergence: Magma against AdamW, RMSProp, SkipUpdate and Muon", "",
             "Generated by `benchmarks/plot_convergence.py` from the JSON records of "
             "`benchmarks/convergence.py`; edit neither the numbers nor the statements by hand.", "",
             "## Setup", ""] + setup_lines(study) + [
             "", "Design: every learning rate runs with the seeds of the table's last column; where a size "
             "lists seeds \"at the best lr of seed 0\", those run after that size's seed-0 sweep, at the "
             "learning rate the sweep found best (which favours that learning rate slightly, as seed 0 "
             "picked it). The best learning rate of a (size, optimizer) cell minimises the mean final "
             "validation perplexity over the seeds that every learning rate of the cell ran. A cell never "
             f"leaves its shard, so every device call is self-contained{shard_note(study)}.", ""]
    if summary:
        curves, sweep = plots_dir / "val_curves.png", plots_dir / "ppl_vs_lr.png"
        plot_val_curves(summary, curves)
        plot_ppl_vs_lr(summary, study.runs, sweep)
        lines += ["## Results", ""] + results_table(summary) + [
            "", "Every learning rate (bold: the best):", ""] + sweep_table(summary, study.runs) + [
            "", f"![validation loss at the best learning rate]({link(curves, page)})", "",
            f"![final validation perplexity against learning rate]({link(sweep, page)})", ""]
    else:
        lines += ["## Results", "", "No run records were given.", ""]
    lines += ["## End-to-end cost", ""] + throughput_table(study.throughput)
    lines += ["## What was and was not reproduced", ""] + (
        ordering_statement(summary) if summary else ["Nothing to compare: no run records."])
    lines += ["", "## Runs", ""] + run_status_lines(study)
    lines += ["", "## Provenance", ""] + provenance_lines(study, argv) + [""]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="convergence.py report", description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", nargs="+", required=True, help="JSON records, bundles or folders of them")
    p.add_argument("--page", default=str(DEFAULT_PAGE), help="the Markdown page to write")
    p.add_argument("--plots-dir", default=None, help="where the PNGs go (default: beside the page, "
                                                     "in a folder named after it)")
    args = p.parse_args(argv)
    page = Path(args.page)
    plots_dir = Path(args.plots_dir) if args.plots_dir else page.with_suffix("")
    study = load_study(args.inputs)
    write_page(study, page, plots_dir, argv)
    print(f"{len(study.runs)} runs, {len(study.throughput)} throughput rows -> {page} (plots in {plots_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
