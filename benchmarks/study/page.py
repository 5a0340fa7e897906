"""The Markdown page of the study, as text: set-up, results, cost, the check of the paper's
claim (with the gap between the edition's subject and its baseline at each size, beside the
paper's), the runs, the planned runs that have no record yet (:mod:`.plan`) and their provenance.

Optimizer names, their order, the fused paths, the recipe text and the claim come from the
study's definition (:mod:`.definition`); the numbers from the records. Nothing here knows a
particular optimizer. A size whose runs read their training bytes more than once says how often
beside each of its results (:func:`.summary.size_label`).
"""

from __future__ import annotations

import math
import shlex

from .definition import Edition, spelled
from .plan import make_cells, not_finished, ordered_runs
from .records import FINISHED, Study, corpus_of, merged_meta, now_utc
from .summary import CellSummary, Summary, gaps_by_size, mean, ppl, seeds_run, size_label

RUNNER = "benchmarks/convergence.py"
REPORTER = "benchmarks/convergence.py report"
# The figures of :mod:`.plots` by name, with the text that stands for them.
FIGURES = {"val_curves": "validation loss at the best learning rate",
           "ppl_vs_lr": "final validation perplexity against learning rate",
           "gap_vs_size": "the gap in final validation perplexity against model size"}
# The figures shown with the results; the others sit beside the text they illustrate.
RESULT_FIGURES = ("val_curves", "ppl_vs_lr")


def uses_magma(name: str, edition: Edition) -> bool:
    recipe = edition.optimizers.get(name)
    return bool(recipe and recipe.uses_magma)


def fused_label(record: dict, edition: Edition) -> str:
    """The "fused" column of the throughput table: which fused path the step took."""
    recipe = edition.optimizers.get(record["optimizer"])
    if recipe is None or recipe.fused == "magma_ext":
        if record["magma_fused"]:
            return "magma_ext fused"
        return "no (reference path)" if recipe else "n/a"
    if recipe.fused == "torch":
        return "torch fused" if record["env"]["device"].startswith("cuda") else "no (CPU)"
    return f"n/a ({recipe.fused_note})" if recipe.fused_note else "n/a"


# ---------------------------------------------------------------------------- results


def fmt_ppl(cell: CellSummary) -> str:
    if not math.isfinite(cell.mean_ppl):
        bad = sum(not math.isfinite(p) for p in cell.ppls)
        return f"diverged ({bad}/{len(cell.ppls)} seeds)"
    if len(cell.ppls) == 1:
        return f"{cell.mean_ppl:.4f} (1 seed)"
    return f"{cell.mean_ppl:.4f} [{cell.low:.4f}, {cell.high:.4f}] ({len(cell.ppls)} seeds)"


def results_table(summary: Summary) -> list[str]:
    lines = ["| size | optimizer | best lr | final val ppl: mean [min, max] | wall s / run | peak MiB |",
             "|---|---|---:|---|---:|---:|"]
    for size, cells in summary.items():
        for name, cell in cells.items():
            walls = [r["wall_s"] for r in cell.best_runs if r.get("wall_s") is not None]
            peaks = [r["peak_mem_bytes"] for r in cell.best_runs if r.get("peak_mem_bytes")]
            edge = f" ({cell.edge} of grid)" if cell.edge else ""
            if not cell.complete:
                edge += f" (best of {len(cell.lrs)} of {len(cell.lrs) + len(cell.missing_lrs)} lrs run)"
            lines.append(f"| {size_label(size, cells)} | {name} | {cell.best_lr:g}{edge} | {fmt_ppl(cell)} | "
                         f"{mean(walls):.1f} | {f'{max(peaks) / 2**20:,.0f}' if peaks else 'n/a'} |")
    return lines


def sweep_table(summary: Summary, runs: list[dict]) -> list[str]:
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
            lines.append(f"| {size_label(size, cells)} | {name} | {'; '.join(parts)} |")
    return lines


def throughput_table(rows: list[dict], edition: Edition) -> list[str]:
    """One table per size and measurement (an invocation of ``--mode throughput``), the newest
    first: ratios are only taken between rows measured side by side."""
    if not rows:
        return ["No throughput records were given (`--mode throughput`).", ""]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["size"], measured(r) or ""), []).append(r)
    newest_first = sorted(groups, key=lambda key: key[1], reverse=True)
    lines = []
    for key in sorted(newest_first, key=lambda key: key[0]):  # a stable sort: by size, then the newest first
        here = sorted(groups[key], key=lambda r: edition.optimizer_rank(r["optimizer"]))
        lines += measurement_table(here, edition.reference, edition)
    return lines


def measured(row: dict) -> str | None:
    """The invocation a throughput row came from: its ``measurement`` (the invocation's start),
    or, in records older than that field, its own date."""
    return row.get("measurement", row.get("date"))


def measurement_table(here: list[dict], reference: str, edition: Edition) -> list[str]:
    base = next((r for r in here if r["optimizer"] == reference), None)
    first = here[0]
    lines = [f"Model {first['size']} ({first['num_parameters'] / 1e6:.1f}M parameters), batch {first['batch_size']} x "
             f"{first['seq_len']} tokens, {first['dtype']}, {first['env']['device_name']}, "
             f"{first['warmup_steps']} warm-up steps then the median of {first['repeats']} "
             f"window{'s' if first['repeats'] != 1 else ''} of {first['timed_steps']} steps"
             f"{', the optimizers taking turns' if first['repeats'] > 1 else ''} "
             f"(optimizer step: median over all timed steps, {first['opt_step_timer']})"
             f"{compiled(first)}; {measured(first)}.", "",
             f"| optimizer | fused | tokens/s | vs {reference} | step ms: median [windows' range] "
             f"| optimizer step ms: median (min) | vs {reference} | state MiB | peak MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in here:
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.3f}x" if base else "n/a"
        opt = f"{r['opt_step_ms_median'] / base['opt_step_ms_median']:.2f}x" if base else "n/a"
        peak = f"{r['peak_mem_bytes'] / 2**20:,.0f}" if r["peak_mem_bytes"] else "n/a"
        lines.append(f"| {r['optimizer']} | {fused_label(r, edition)} | {r['tokens_per_s']:,.0f} | {speed} | "
                     f"{step_ms(r)} | {opt_step_ms(r)} | {opt} | "
                     f"{r['state_bytes'] / 2**20:,.1f} | {peak} |")
    lines.append("")
    disturbed = [r["optimizer"] for r in here if is_disturbed(r)]
    if disturbed:
        lines += [f"Disturbed: the optimizer step's median is more than {DISTURBED} times its fastest step for "
                  f"{', '.join(disturbed)}. A step of fixed work does not vary that much on a quiet GPU, so "
                  "the machine (its host or its clocks) slowed these windows; compare the fastest steps, and "
                  "read the ratios of this table as noise-bound.", ""]
    return lines


DISTURBED = 2.0


def is_disturbed(record: dict) -> bool:
    fastest = record.get("opt_step_ms_min")
    return fastest is not None and record["opt_step_ms_median"] > DISTURBED * fastest


def step_ms(record: dict) -> str:
    windows = record.get("step_ms_windows") or []
    spread = f" [{min(windows):.2f}, {max(windows):.2f}]" if len(windows) > 1 else ""
    return f"{record['step_ms']:.2f}{spread}"


def opt_step_ms(record: dict) -> str:
    """The optimizer step's median, and its fastest step where the record has it: a median far
    above the minimum says the steps were disturbed, not that the optimizer is slow."""
    fastest = record.get("opt_step_ms_min")
    return f"{record['opt_step_ms_median']:.3f}" + ("" if fastest is None else f" ({fastest:.3f})")


def compiled(record: dict) -> str:
    mode = record.get("compile")
    return "" if mode is None else ", eager" if mode == "none" else f", torch.compile ({mode})"


def run_speed_table(study: Study, edition: Edition) -> list[str]:
    """Training tokens/s of the study's own runs (evaluations and warm-up steps excluded), per
    size, device and optimizer, each against the reference's runs of that size on that kind of
    device (a ratio across devices would measure the cards, not the optimizers), and what each
    sweep invocation trained per device."""
    runs = [r for r in study.runs if r["status"] == "ok" and r.get("tokens_per_s")]
    if not runs:
        return []
    lines = ["Training speed of the runs themselves (tokens/s of one run, evaluations and its first "
             "steps excluded; runs that shared a GPU each count their own share; ratios are taken "
             "between runs on the same kind of device):", "",
             "| size | optimizer | runs | side by side | device | tokens/s per run: mean [min, max] "
             f"| vs {edition.reference} |",
             "|---|---|---:|---|---|---|---:|"]
    spreads = []  # (max / min of one optimizer's runs, its size, device and name)
    for size in sorted({r["size"] for r in runs}, key=lambda s: min(r["num_parameters"] for r in runs
                                                                    if r["size"] == s)):
        for device in sorted({device_name(r) for r in runs if r["size"] == size}):
            here = [r for r in runs if r["size"] == size and device_name(r) == device]
            base = [r["tokens_per_s"] for r in here if r["optimizer"] == edition.reference]
            for name in sorted({r["optimizer"] for r in here}, key=edition.optimizer_rank):
                speeds = [r["tokens_per_s"] for r in here if r["optimizer"] == name]
                shared = sorted({r.get("side_by_side") or 1 for r in here if r["optimizer"] == name})
                ratio = f"{mean(speeds) / mean(base):.3f}x" if base else "n/a"
                if base and name != edition.reference and ranges_overlap(speeds, base):
                    ratio += " (overlaps)"
                if len(speeds) > 1:
                    spreads.append((max(speeds) / min(speeds), size, device, name))
                lines.append(f"| {size} | {name} | {len(speeds)} | {', '.join(map(str, shared))} | {device} | "
                             f"{mean(speeds):,.0f} [{min(speeds):,.0f}, {max(speeds):,.0f}] | {ratio} |")
    if spreads:
        lines += run_speed_spread_lines(max(spreads), edition, compared_end_to_end=bool(study.throughput))
    aggregates = [m for m in study.metas if m.get("mode") == "sweep" and m.get("aggregate")]
    if aggregates:
        lines += ["", "Per sweep invocation, all its runs together (start-ups, compilation and evaluations "
                      "included):", ""]
        for m in sorted(aggregates, key=lambda m: m.get("date", "")):
            a = m["aggregate"]
            if a.get("tokens_per_s_per_device"):
                lines.append(f"- {m['date']}: {a['tokens_trained'] / 1e6:,.1f}M tokens in {a['wall_s']:.0f} s on "
                             f"{a['devices']} device(s), {a['runs_per_device']} run(s) per device: "
                             f"{a['tokens_per_s_per_device']:,.0f} tokens/s per device.")
    return lines + [""]


def ranges_overlap(speeds: list[float], base: list[float]) -> bool:
    """Whether two sets of runs' [min, max] ranges overlap, both holding more than one run."""
    return len(speeds) > 1 and len(base) > 1 and min(speeds) <= max(base) and min(base) <= max(speeds)


def run_speed_spread_lines(widest: tuple, edition: Edition, compared_end_to_end: bool) -> list[str]:
    """The widest spread of one optimizer's runs on one kind of device, ``(max / min, size,
    device, name)``: what a run-speed ratio must exceed to say anything about the optimizers;
    with ``compared_end_to_end``, where the page compares them instead."""
    spread, size, device, name = widest
    return ["", f"Runs of one optimizer on one kind of device differ by up to {spread:.2f}x ({name} at {size} "
                f"on {device}): the machines themselves vary that much, so a ratio marked \"overlaps\" "
                f"(its runs' range overlaps {edition.reference}'s) is within that spread and says nothing "
                "about the optimizers" + ("; the end-to-end tables above, where the optimizers take turns in "
                                          "one process, compare them." if compared_end_to_end else ".")]


def device_name(run: dict) -> str:
    return (run.get("env") or {}).get("device_name") or "unknown"


# ---------------------------------------------------------------------------- the paper's claim


def _relative(value: float, base: float | None) -> str:
    if base is None or not (math.isfinite(value) and math.isfinite(base)):
        return "n/a"
    return f"{100 * (value / base - 1):+.1f}%"


def paper_table(summary: Summary, edition: Edition) -> list[str]:
    """The paper's perplexities and ours side by side, each as its difference to Adam(W) at its
    own size: the comparable quantity (the paper's are per token at 60M/130M, ours per byte)."""
    paper, reference = edition.paper, edition.reference
    if not paper.table:
        return []
    names = [n for n in edition.optimizers if any(n in t for t in paper.table.values())
             or any(n in cells for cells in summary.values())]
    head = ["optimizer"] + [f"paper {s}" for s in paper.table] + [f"ours {size_label(s, c)}"
                                                                  for s, c in summary.items()]
    lines = [f"The paper's numbers ({paper.table_source}) and this study's best mean final validation "
             f"perplexity, each with its difference to {reference} (the paper's Adam) at the same size:", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in names:
        recipe = edition.optimizers[name]
        cols = [name + (f" ({recipe.paper_name})" if recipe.paper_name and recipe.paper_name != name else "")]
        for table in paper.table.values():
            cols.append(f"{table[name]:.2f} ({_relative(table[name], table.get(reference))})" if name in table else "-")
        for cells in summary.values():
            base = cells[reference].mean_ppl if reference in cells else None
            partial = "; partial grid" if name in cells and not cells[name].complete else ""
            cols.append(f"{cells[name].mean_ppl:.4f} ({_relative(cells[name].mean_ppl, base)}{partial})"
                        if name in cells else "-")
        lines.append("| " + " | ".join(cols) + " |")
    return lines + [""]


def figure_lines(name: str, figures: dict[str, str] | None) -> list[str]:
    """The image of figure ``name`` (a key of :data:`FIGURES`), where it was drawn."""
    link = (figures or {}).get(name)
    return [f"![{FIGURES[name]}]({link})", ""] if link else []


def _percent(value: float) -> str:
    return f"{100 * value:+.1f}%"


def gap_lines(study: Study, summary: Summary, edition: Edition, figures: dict[str, str] | None) -> list[str]:
    """The gap of ``edition.gap``'s subject to its baseline (best mean final perplexity) at each
    size, a planned size with no result yet as "not run yet", the paper's at its sizes, and the
    figure of the gaps against the transformer-body parameters."""
    if not edition.gap:
        return []
    subject, baseline = edition.gap
    gaps = gaps_by_size(summary, subject, baseline)
    planned = {}  # the sizes of the tiers that run both, in the order of the edition's sizes
    for cell in make_cells(edition, quick=study.quick, optimizers=[subject, baseline]):
        if {subject, baseline} <= set(cell.tier.optimizers):
            planned.setdefault(cell.size.name, (cell.size, {}))[1][cell.tier.number] = None
    lines = [f"{subject} against {baseline} at each size: the relative gap of their best mean final validation "
             f"perplexities ({subject} / {baseline} - 1; below 0, {subject} is better), the gap of each seed "
             "both ran at their best lrs in brackets. The body is the transformer blocks and the final norm: "
             "without the embedding and the LM head, which are 2 x 256 x width parameters at byte level and "
             "most of the paper's 60M. The paper's gaps are per token on C4, ours per byte.", "",
             f"| size | parameters (body) | tokens per run | passes over the training bytes | {baseline} | "
             f"{subject} | gap |", "|---|---:|---:|---|---:|---:|---|"]
    for size in list(planned) + [s for s in gaps if s not in planned]:
        g = gaps.get(size)
        if g is None:
            plan, tiers = planned[size]
            lines.append(f"| {size} | not run yet (tier {', '.join(map(str, tiers))}) | {plan.tokens / 1e6:,.2f}M "
                         "| | | | |")
            continue
        read = next((r.get("passes") for r in g.subject.best_runs + g.baseline.best_runs if r.get("passes")), None)
        seeds = "; ".join(f"seed {s} {_percent(v)}" for s, v in g.seed_gaps.items())
        lines.append(f"| {g.label} | {g.parameters / 1e6:.2f}M ({g.body_parameters / 1e6:.2f}M) | "
                     f"{g.tokens / 1e6:,.2f}M | {f'{read:.2f}' if read and read > 1 else 'at most 1'} | "
                     f"{fmt_ppl(g.baseline)} | {fmt_ppl(g.subject)} | {_percent(g.gap)}"
                     + (f" [{seeds}]" if len(g.seed_gaps) > 1 else "") + " |")
    paper = edition.paper
    for model in paper.models:
        table = paper.table.get(model.name, {})
        if subject in table and baseline in table:
            lines.append(f"| paper {model.name} | {model.parameters / 1e6:.2f}M ({model.body_parameters / 1e6:.2f}M) "
                         f"| | | {table[baseline]:.2f} | {table[subject]:.2f} | "
                         f"{_relative(table[subject], table[baseline])} |")
    return lines + [""] + figure_lines("gap_vs_size", figures)


def _relation_line(a: CellSummary, b: CellSummary) -> tuple[bool, str]:
    """Whether "a < b" holds, and the line that says so."""
    holds = a.mean_ppl < b.mean_ppl
    if not (math.isfinite(a.mean_ppl) and math.isfinite(b.mean_ppl)):
        detail = "a side diverged"
    elif len(a.ppls) > 1 and len(b.ppls) > 1:
        separated = a.high < b.low if holds else b.high < a.low
        detail = "separated" if separated else "seed ranges overlap"
    else:
        detail = "one seed on at least one side"
    return holds, (f"- {a.optimizer} < {b.optimizer}: {'holds' if holds else 'does not hold'} "
                   f"({a.mean_ppl:.4f} vs {b.mean_ppl:.4f}; {detail}).")


def _stable_ranges(cells: dict[str, CellSummary], within: float) -> list[str]:
    ranges = []
    for name, c in cells.items():
        near = c.near_best(within)
        if math.isfinite(c.mean_ppl) and len(c.lrs) > 1 and not c.transfer and not c.complete:
            span = f"{near[0]:g} to {near[-1]:g}" if len(near) > 1 else f"{near[0]:g}"
            ranges.append(f"{name} {len(near)} of the {len(c.lrs)} run so far ({span}; grid incomplete)")
        elif math.isfinite(c.mean_ppl) and len(c.lrs) > 1 and not c.transfer:
            ranges.append(f"{name} {len(near)} of {len(c.lrs)} ({near[0]:g} to {near[-1]:g})" if len(near) > 1
                          else f"{name} 1 of {len(c.lrs)} ({near[0]:g})")
    return ranges


def ordering_statement(summary: Summary, edition: Edition) -> list[str]:
    """A plain comparison of the measured ordering of best perplexities with the paper's."""
    paper, within = edition.paper, edition.stable_within
    relations = paper.relations
    lines = [f"The paper reports the ordering {paper.ordering} (lower validation perplexity first). "
             f"Below, each of the {spelled(len(relations))} pairwise relations it implies is checked against "
             "this study's best mean final validation perplexity per optimizer; \"separated\" means the seed "
             "ranges do not overlap (only possible where both sides have at least two seeds).", ""]
    verdicts = {}
    for size, cells in summary.items():
        finite = sorted((c.mean_ppl, name) for name, c in cells.items())
        order = " < ".join(f"{name} ({p:.4f})" if math.isfinite(p) else f"{name} (diverged)" for p, name in finite)
        lines.append(f"**{size_label(size, cells)}.** Measured order: {order}.")
        held, checked = 0, 0
        for a, b in relations:
            if a not in cells or b not in cells:
                lines.append(f"- {a} < {b}: not checked ({a if a not in cells else b} was not run).")
                continue
            unfinished = [n for n in (a, b) if not cells[n].complete]
            if unfinished:
                gaps = "; ".join(f"{n} lacks lr {', '.join(f'{lr:g}' for lr in cells[n].missing_lrs)}"
                                 for n in unfinished)
                lines.append(f"- {a} < {b}: not checked yet (sweep incomplete: {gaps}; now "
                             f"{cells[a].mean_ppl:.4f} vs {cells[b].mean_ppl:.4f}).")
                continue
            holds, line = _relation_line(cells[a], cells[b])
            checked += 1
            held += holds
            lines.append(line)
        verdicts[size] = (held, checked)
        edges = [f"{name} ({c.edge})" for name, c in cells.items() if c.edge]
        if edges:
            lines.append(f"- Best learning rate at an end of its grid: {', '.join(edges)}; the optimum of these "
                         "may lie outside the grid, so their best perplexity may be overstated.")
        ranges = _stable_ranges(cells, within)
        if ranges:
            lines.append(f"- Stable range ({paper.stable_range}): learning rates within {within:.0%} of each "
                         "optimizer's best perplexity (over the seeds every learning rate ran): "
                         f"{'; '.join(ranges)}. A range that reaches an end of its grid may continue beyond it.")
        lines.append("")
    full = [s for s, (h, c) in verdicts.items() if c == len(relations) and h == c]
    partial = [f"{s}: none of the {len(relations)} relations could be checked yet" if c == 0 else
               f"{s}: {h} of {c} checked relations hold"
               + (f", {len(relations) - c} not checked" if c < len(relations) else "")
               for s, (h, c) in verdicts.items() if s not in full]
    if full:
        lines.append(f"The paper's ordering holds in full at: {', '.join(full)}.")
    if partial:
        lines.append(f"The paper's ordering is not reproduced in full ({'; '.join(partial)}).")
    return lines + ["", paper.not_reproduced]


# ---------------------------------------------------------------------------- set-up and provenance


def data_line(study: Study, data: dict) -> str:
    """Where each size's training bytes came from: its corpus, as its runs recorded it."""
    described = {}  # each size's corpus, as its runs recorded it (load_study kept one per size)
    for r in sorted(study.runs, key=lambda r: r.get("date", "")):
        if corpus_of(r):
            described.setdefault(r["size"], r["data"])
    return "\n\n".join(
        f"Data{f' of size {size}' if size else ''}: {d['source']}: {d['files']:,} files in sorted path order "
        f"({d['duplicates_dropped']:,} files whose bytes repeat an earlier file's dropped), {d['bytes']:,} bytes "
        f"(file list SHA-1 {d['file_list_sha1'][:12]}, content SHA-1 {d['content_sha1'][:12]}); "
        f"{d['val_bytes']:,} bytes in {d['val_chunks']} chunks of {d['chunk_bytes']:,} spread over the stream held "
        f"out for validation, {d['train_bytes']:,} for training."
        for size, d in (described or {"": data}).items())


def setup_lines(study: Study, edition: Edition) -> list[str]:
    meta = next((m for m in study.metas if m.get("mode") == "sweep"), {})
    lines = []
    sizes = merged_meta(study.metas, "sizes")
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
        lines.append(data_line(study, data))
    optimizers = merged_meta(study.metas, "optimizers")
    if optimizers:
        lines += ["", "| optimizer | implementation | learning rates run (sweep), per size |", "|---|---|---|"]
        for name, o in optimizers.items():
            grids = []
            for size in sorted({r["size"] for r in study.runs if r["optimizer"] == name}):
                lrs = sorted({r["lr"] for r in study.runs
                              if r["optimizer"] == name and r["size"] == size and r["stage"] == "sweep"})
                transfer = sorted({(r["lr"], r["lr_rule"]) for r in study.runs if r["optimizer"] == name
                                   and r["size"] == size and r["stage"] == "transfer"})
                if lrs or not transfer:
                    grids.append(f"{size}: {', '.join(f'{lr:g}' for lr in lrs)}")
                else:  # tier 3: no sweep, the lrs chosen at a smaller size
                    grids.append(f"{size}: {', '.join(f'{lr:g} ({rule})' for lr, rule in transfer)}")
            lines.append(f"| {name} | {o['description']} | {'; '.join(grids) or 'not run'} |")
        lines += ["", edition.shared_recipe.format(betas=tuple(meta["betas"]), weight_decay=meta["weight_decay"])]
        lines += passes_lines(study)
    fused = {r["magma_fused"] for r in study.runs if uses_magma(r["optimizer"], edition)}
    if fused:
        lines.append("")
        lines.append("Magma-based optimizers ran on " + (
            "magma_ext's fused CUDA path." if fused == {True} else
            "the PyTorch reference path (no CUDA extension or no GPU)." if fused == {False} else
            "a mix of the fused CUDA path and the reference path."))
    return lines


def passes_lines(study: Study) -> list[str]:
    """What a size whose runs read their training bytes more than once does instead."""
    read: dict[str, float] = {}
    for r in study.runs:
        if (r.get("passes") or 1) > 1:
            read[r["size"]] = max(read.get(r["size"], 1), r["passes"])
    return ["", " ".join(
        f"Size {size}'s runs read their training bytes {most:.2f} times (its corpus holds fewer than a run's "
        "tokens): once every window has been read, a run reads them all again in a new shuffled order; each of "
        "its results says so." for size, most in sorted(read.items()))] if read else []


def commands_in_order(study: Study) -> list[str]:
    """The commands behind the records, each once, in the order they first ran (by the date of
    their bundle or record; undated ones last)."""
    first: dict[str, str] = {}
    for source in study.metas + study.runs + study.throughput:
        command, date = source.get("command"), source.get("date") or "~"  # "~" sorts after every date
        if command and (command not in first or date < first[command]):
            first[command] = date
    return sorted(first, key=lambda command: (first[command], command))


def provenance_lines(study: Study, argv: list[str]) -> list[str]:
    commands = commands_in_order(study)
    devices = sorted({device_name(r) for r in study.runs + study.throughput if r.get("env")})
    dates = sorted({r["date"] for r in study.runs + study.throughput if r.get("date")})
    envs = sorted({(r["env"]["torch"], r["env"]["python"], r["env"].get("git_commit") or "unknown")
                   for r in study.runs + study.throughput if r.get("env")})
    lines = ["Commands that produced the records:", "", "```"] + commands + [
        f"python {REPORTER} " + " ".join(shlex.quote(a) for a in argv), "```", ""]
    lines.append(f"Device: {', '.join(devices) or 'unknown'}. Runs dated {dates[0]} to {dates[-1]}."
                 if dates else "No dated runs.")
    lines.append("Software: " + "; ".join(f"torch {t}, Python {p}, commit {c}" for t, p, c in envs) + ".")
    lines.append(f"Page generated {now_utc()}.")
    return lines


def planned_runs(study: Study, edition: Edition) -> list[tuple[int, list]]:
    """(tier number, its planned runs in the order a sweep runs them), tier by tier."""
    cells = make_cells(edition, quick=study.quick)
    return [(number, ordered_runs([c for c in cells if c.tier.number == number]))
            for number in dict.fromkeys(c.tier.number for c in cells)]


def missing_lines(study: Study, tiers: list[tuple[int, list]]) -> list[str]:
    """The planned runs of every tier that no record finished, with the reason where a record
    says one (a skip, a failure)."""
    finished = [r for r in study.runs if r["status"] in FINISHED]
    reasons = {s["id"]: f"skipped: {s['reason']}" for s in study.skipped}
    reasons.update({r["id"]: f"{r['status']}: {r['error']}" for r in study.runs if r["status"] not in FINISHED})
    lines, missing_total = [], 0
    for number, planned in tiers:
        missing = not_finished(planned, finished)
        missing_total += len(missing)
        if missing:
            lines.append(f"- Tier {number}: {len(missing)} of {len(planned)} planned runs missing:")
            lines += [f"  - {run.run_id}" + (f" ({reasons[run.run_id]})" if run.run_id in reasons else "")
                      for run in missing]
        else:
            lines.append(f"- Tier {number}: all {len(planned)} planned runs are in.")
    head = ("Every planned run is in." if not missing_total else
            f"{missing_total} planned run{'s' * (missing_total > 1)} "
            f"{'have' if missing_total > 1 else 'has'} no finished record yet")
    return ["", head + (":" if missing_total else "")] + (lines if missing_total else [])


def run_status_lines(study: Study, listed_below: set[str]) -> list[str]:
    """The count of runs by outcome, and each run that did not finish, except the skipped runs
    in ``listed_below`` (the missing planned runs, listed later with their reasons)."""
    ok = sum(r["status"] == "ok" for r in study.runs)
    lines = [f"{len(study.runs)} runs: {ok} finished, "
             f"{sum(r['status'] == 'diverged' for r in study.runs)} diverged, "
             f"{sum(r['status'] == 'error' for r in study.runs)} failed; {len(study.skipped)} skipped"
             + (" (the planned ones are listed below with the missing runs)."
                if any(s["id"] in listed_below for s in study.skipped) else ".")]
    for r in sorted(study.runs, key=lambda r: r["id"]):
        if r["status"] != "ok":
            lines.append(f"- {r['id']}: {r['status']}: {r['error']}")
    for s in study.skipped:
        if s["id"] not in listed_below:
            lines.append(f"- {s['id']}: skipped: {s['reason']}")
    return lines


def left_out_lines(study: Study) -> list[str]:
    """The records that count for nothing here, and why: runs on another corpus (another
    validation set), best-lr runs at a sweep's former best."""
    lines = []
    by_corpus: dict[str, list[dict]] = {}
    for r in study.other_corpus_runs:
        by_corpus.setdefault(corpus_of(r), []).append(r)
    for corpus, runs in sorted(by_corpus.items()):
        dates = sorted(r.get("date", "") for r in runs)
        devices = sorted({device_name(r) for r in runs})
        lines.append(f"- {len(runs)} run{'s' * (len(runs) > 1)} trained on another corpus (content SHA-1 "
                     f"{corpus[:12]}, {runs[0]['data']['files']:,} files; {', '.join(devices)}, {dates[0]} to "
                     f"{dates[-1]}) are left out: their validation set is another, so their perplexities "
                     f"compare with none here. The corpus is built from the machine's installed files, and "
                     f"that machine's image differed: {', '.join(sorted(r['id'] for r in runs))}.")
    for r in sorted(study.stale_runs, key=lambda r: r["id"]):
        lines.append(f"- {r['id']} is left out: it ran at lr {r['lr']:g}, no longer the best of its sweep.")
    return ([""] + lines) if lines else []


def shard_note(study: Study) -> str:
    """The shards of the older invocations, which still name them."""
    shards = sorted({(m["shard"], m["num_shards"]) for m in study.metas if m.get("mode") == "sweep" and "shard" in m})
    if not shards:
        return ""
    return f"; this study ran as shard(s) {', '.join(f'{i}/{n}' for i, n in shards)}"


# ---------------------------------------------------------------------------- the page


def build_page(study: Study, summary: Summary, argv: list[str], figures: dict[str, str] | None = None, *,
               edition: Edition) -> str:
    """The page; ``figures`` maps a name of :data:`FIGURES` to the link of its image."""
    lines = [f"# {edition.title()}", "",
             f"Generated by `{REPORTER}` from the JSON records of `{RUNNER}`; edit neither the numbers nor "
             "the statements by hand.", "",
             "## Setup", ""] + setup_lines(study, edition) + [
                 "", edition.design.format(shard_note=shard_note(study)), ""]
    if summary:
        lines += ["## Results", ""] + results_table(summary) + [
            "", "Every learning rate (bold: the best):", ""] + sweep_table(summary, study.runs) + [""]
        for name in RESULT_FIGURES:
            lines += figure_lines(name, figures)
    else:
        lines += ["## Results", "", "No run records were given.", ""]
    lines += ["## End-to-end cost", ""] + throughput_table(study.throughput, edition)
    lines += run_speed_table(study, edition)
    lines += ["## What was and was not reproduced", ""] + (
        paper_table(summary, edition) + gap_lines(study, summary, edition, figures)
        + ordering_statement(summary, edition) if summary
        else ["Nothing to compare: no run records."])
    tiers = planned_runs(study, edition)
    lines += ["", "## Runs", ""] + run_status_lines(study, {run.run_id for _, runs in tiers for run in runs})
    lines += left_out_lines(study)
    lines += missing_lines(study, tiers)
    lines += ["", "## Provenance", ""] + provenance_lines(study, argv) + [""]
    return "\n".join(lines)
