"""The report's figures (matplotlib, imported only when a figure is drawn): validation curves,
perplexity against learning rate, and the gap between the edition's subject and its baseline
against model size."""

from __future__ import annotations

import math
from pathlib import Path

from .definition import Edition
from .summary import SizeGap, Summary, gaps_by_size, mean, ppl, size_label


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def color(name: str, edition: Edition) -> str | None:
    """The recipe's colour; matplotlib's next one for an optimizer the edition lacks."""
    recipe = edition.optimizers.get(name)
    return recipe.color if recipe else None


def mean_curve(runs: list[dict], key: str) -> tuple[list[float], list[float]]:
    """The mean over runs of a [step, loss] curve, on the steps that every run has."""
    curves = [dict(r[key]) for r in runs if r["status"] == "ok" and r.get(key)]
    if not curves:
        return [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [mean(c[s] for c in curves) for s in steps]


def final_evaluation_apart(runs: list[dict]) -> tuple[int, int] | None:
    """(batches of the final evaluation, of the periodic ones) where the runs' last point was
    measured on another sample of the validation split than the points before it, else None:
    the curve must not join the two, or a sample's offset reads as a change of the loss."""
    sizes = {(r.get("final_eval_batches") or r.get("eval_batches"), r.get("eval_batches")) for r in runs}
    apart = [(final, periodic) for final, periodic in sizes if periodic and final != periodic]
    return apart[0] if apart else None


def plot_val_curves(summary: Summary, path: Path, edition: Edition) -> None:
    """Per size: validation loss at each optimizer's best lr (mean over seeds), the whole run
    and the second half of it; a final evaluation on a larger sample than the periodic ones is
    a separate star, not joined to the line."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(summary), 2, figsize=(12, 4.2 * len(summary)), squeeze=False)
    for row, (size, cells) in enumerate(summary.items()):
        tail_values, apart = [], None
        for name, cell in cells.items():
            steps, losses = mean_curve(cell.best_runs, "val_loss")
            if not steps:
                continue
            tokens_per_step = cell.best_runs[0]["batch_size"] * cell.best_runs[0]["seq_len"]
            x = [s * tokens_per_step / 1e6 for s in steps]
            label = f"{name} (lr {cell.best_lr:g}, {len(cell.best_runs)} seed{'s' * (len(cell.best_runs) > 1)})"
            final = final_evaluation_apart(cell.best_runs)
            apart = apart or final
            joined = len(x) - 1 if final and len(x) > 1 else len(x)
            for ax in axes[row]:
                line, = ax.plot(x[:joined], losses[:joined], marker="o", markersize=3, color=color(name, edition),
                                label=label)
                ax.plot(x[joined:], losses[joined:], marker="*", markersize=9, linestyle="none",
                        color=line.get_color())
            half = [(xi, li) for xi, li in zip(x, losses) if xi >= x[-1] / 2]
            tail_values += [li for _, li in half]
            axes[row][1].set_xlim(left=half[0][0])
        if tail_values:
            lo, hi = min(tail_values), max(tail_values)
            pad = 0.05 * (hi - lo) + 1e-3
            axes[row][1].set_ylim(lo - pad, hi + pad)
        for ax, title in zip(axes[row], ("whole run", "second half")):
            ax.set_title(f"{size_label(size, cells)}: validation loss at the best lr, {title}", fontsize=10)
            ax.set_xlabel("training tokens (M)")
            ax.set_ylabel("val loss (nats per byte)")
            ax.grid(alpha=0.3)
        if apart:
            axes[row][0].plot([], [], marker="*", markersize=9, linestyle="none", color="gray",
                              label=f"final evaluation: {apart[0]} batches (the others {apart[1]})")
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ppl_vs_lr(summary: Summary, runs: list[dict], path: Path, edition: Edition) -> None:
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
            c = color(name, edition)
            ax.plot([lr for lr, m in zip(lrs, means) if math.isfinite(m)], [m for m in means if math.isfinite(m)],
                    marker="o", color=c, label=name)
            for r in cell_runs:
                if ppl(r) <= top:
                    ax.plot(r["lr"], ppl(r), ".", color=c, alpha=0.5)
                else:  # off the scale: marked on the top edge, a cross where it diverged
                    ax.plot(r["lr"], top, "x" if math.isinf(ppl(r)) else "^", color=c, markersize=8,
                            clip_on=False)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels collide on short ranges
        ax.set_ylim(best * 0.98, top)
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("final validation perplexity (per byte)")
        ax.set_title(f"{size_label(size, cells)}: final val perplexity vs lr (top edge: ^ above the axis, "
                     "x diverged)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gap_vs_size(gaps: dict[str, SizeGap], path: Path, edition: Edition) -> None:
    """The subject's gap to its baseline (percent of the baseline's best mean final perplexity)
    against transformer-body parameters (log x): ours joined in size order, each seed as a dot;
    the paper's at its sizes as open squares on dotted lines, for scale."""
    plt = _pyplot()
    subject, baseline = edition.gap
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ours = sorted(gaps.values(), key=lambda g: g.body_parameters)
    x = [g.body_parameters / 1e6 for g in ours]
    ax.plot(x, [100 * g.gap for g in ours], marker="o", color=color(subject, edition),
            label="this study (per byte), mean over seeds")
    for g, xi in zip(ours, x):
        ax.plot([xi] * len(g.seed_gaps), [100 * v for v in g.seed_gaps.values()], ".", color="gray", alpha=0.7)
        ax.annotate(g.label, (xi, 100 * g.gap), textcoords="offset points", xytext=(6, 6), fontsize=8)
    paper = edition.paper
    marked = [(m, paper.table[m.name]) for m in paper.models
              if subject in paper.table.get(m.name, {}) and baseline in paper.table.get(m.name, {})]
    for i, (model, table) in enumerate(marked):
        body, gap = model.body_parameters / 1e6, 100 * (table[subject] / table[baseline] - 1)
        x.append(body)
        ax.axvline(body, color="gray", linestyle=":", linewidth=1)
        ax.plot(body, gap, "s", markerfacecolor="none", color="black",
                label="the paper (per token, C4)" if i == 0 else None)
        ax.annotate(f"paper {model.name}\n(body {body:.1f}M)", (body, gap), textcoords="offset points",
                    xytext=(-8, 0), ha="right", va="center", fontsize=8, color="gray")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(min(x) / 1.5, max(x) * 1.5)
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if min(x) / 1.5 <= t <= max(x) * 1.5]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("transformer-body parameters, M (embedding and LM head excluded; log scale)")
    ax.set_ylabel(f"final val ppl, {subject} vs {baseline} (%)")
    ax.set_title(f"{subject} against {baseline} by model size (below 0: {subject} better; gray dots: seeds)",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw(summary: Summary, runs: list[dict], plots_dir: Path, edition: Edition) -> dict[str, Path]:
    """The figures into ``plots_dir``: name -> file (the gap figure where some size ran both of
    ``edition.gap``)."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    files = {"val_curves": plots_dir / "val_curves.png", "ppl_vs_lr": plots_dir / "ppl_vs_lr.png"}
    plot_val_curves(summary, files["val_curves"], edition)
    plot_ppl_vs_lr(summary, runs, files["ppl_vs_lr"], edition)
    gaps = gaps_by_size(summary, *edition.gap) if edition.gap else {}
    if gaps:
        files["gap_vs_size"] = plots_dir / "gap_vs_size.png"
        plot_gap_vs_size(gaps, files["gap_vs_size"], edition)
    return files
