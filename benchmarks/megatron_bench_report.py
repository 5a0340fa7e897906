"""The results of benchmarks/megatron_bench.py and the tables it prints and writes.

No megatron-core import: CPU tests check the tables on made-up results.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from megatron_bench_cli import LABELS, VOCAB_SIZE, is_sparse

LOSS_WINDOW = 10  # the final loss is the mean over this many last steps


@dataclass
class RunResult:
    """One run's figures: medians of rank 0's CUDA-event timings after the warm-up steps, the final
    loss over the DP ranks, and rank 0's mean parameter-sync bytes per step."""

    name: str
    inner: str
    wrapper: str
    final_loss: float
    tokens_per_s: float
    iteration_ms: float
    wrapper_step_ms: float
    inner_step_ms: float | None
    skipped_steps: int
    parameters: tuple[int, int]  # (whole model, this rank)
    param_sync_ms: float | None  # the distributed optimizer's parameter all-gather (None without it)
    sync_bytes: float | None  # sent + received per step by rank 0, as param_sync_bytes reports it
    dense_bytes: float | None  # the same for a dense all-gather (None: nothing reported, see summarize)
    layout: dict | None = None  # sparse_gather_record.record_of_optimizer, kept for --layout-json



TIMED = ("final_loss", "tokens_per_s", "iteration_ms", "wrapper_step_ms", "inner_step_ms", "param_sync_ms",
         "sync_bytes", "dense_bytes")  # the figures a round measures; over rounds, their medians


def median_over_rounds(rounds: list[list[RunResult]]) -> list[RunResult]:
    """One result per run name (in the first round's order): the median of each figure of
    :data:`TIMED` over the rounds that have it, the most skipped steps of any round, the first
    recorded layout."""
    by_name: dict[str, list[RunResult]] = {}
    for results in rounds:
        for r in results:
            by_name.setdefault(r.name, []).append(r)
    combined = []
    for name, runs in by_name.items():
        figures = {}
        for field in TIMED:
            values = [getattr(r, field) for r in runs if getattr(r, field) is not None]
            figures[field] = statistics.median(values) if values else None
        layout = next((r.layout for r in runs if r.layout is not None), None)
        combined.append(replace(runs[0], **figures, skipped_steps=max(r.skipped_steps for r in runs), layout=layout))
    return combined


def rounds_table(rounds: list[list[RunResult]]) -> str:
    """Each round's order and, per Magma run, its tokens/s and inner step over that round's Adam."""
    magma = [r.name for r in rounds[0] if r.name != "adam"]
    head = "| round | order | " + " | ".join(f"{LABELS[n]} tokens/s vs Adam | {LABELS[n]} inner step vs Adam"
                                            for n in magma) + " |"
    lines = [head, "|---|---|" + "---:|" * (2 * len(magma))]
    for k, results in enumerate(rounds, start=1):
        by_name = {r.name: r for r in results}
        adam = by_name.get("adam")
        cells = [f"{_ratio(by_name[n].tokens_per_s, adam and adam.tokens_per_s)} | "
                 f"{_ratio(by_name[n].inner_step_ms, adam and adam.inner_step_ms)}" for n in magma]
        lines.append(f"| {k} | {', '.join(LABELS[r.name] for r in results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.3f}" if value is not None and base else "—"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _mib(value: float | None) -> str:
    return "dense" if value is None else f"{value / 2**20:,.1f} MiB"


def param_sync_cells(r: RunResult, results: list[RunResult]) -> str:
    """The parameter-sync columns of one row: its median time, that over the dense-gather Magma
    run's (Adam's without one), its bytes per step and those over the dense gather's. A run that
    reported no bytes (Adam, a dense-gather Magma run) moves the dense figure, which a Magma run
    reported; "dense" where none did."""
    if r.param_sync_ms is None:
        return "| — | — | — | — |"
    by_name = {x.name: x for x in results}
    base = by_name.get("magma") or by_name.get("adam")
    if r.sync_bytes is not None:
        moved, versus = _mib(r.sync_bytes), _ratio(r.sync_bytes, r.dense_bytes)
    else:
        moved, versus = _mib(next((x.dense_bytes for x in results if x.dense_bytes), None)), "1.000"
    timed = _ratio(r.param_sync_ms, base and base.param_sync_ms)
    return f"| {_ms(r.param_sync_ms)} | {timed} | {moved} | {versus} |"


def format_table(results: list[RunResult]) -> str:
    """The comparison as a Markdown table; ratios are to the Adam row when there is one. With
    the distributed optimizer, four parameter-sync columns follow (:func:`param_sync_cells`)."""
    adam = next((r for r in results if r.name == "adam"), None)
    sync = any(r.param_sync_ms is not None for r in results)
    lines = [
        "| run | optimizer | final loss | tokens/s | vs Adam | iteration ms | wrapper step ms "
        "| inner step ms | inner step vs Adam |"
        + (" param sync ms | param sync vs dense | sync bytes/step | bytes vs dense |" if sync else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" * 4 if sync else ""),
    ]
    for r in results:
        lines.append(
            f"| {LABELS[r.name]} | {r.inner} | {r.final_loss:.4f} | {r.tokens_per_s:,.0f} "
            f"| {_ratio(r.tokens_per_s, adam and adam.tokens_per_s)} | {_ms(r.iteration_ms)} "
            f"| {_ms(r.wrapper_step_ms)} | {_ms(r.inner_step_ms)} "
            f"| {_ratio(r.inner_step_ms, adam and adam.inner_step_ms)} "
            + (param_sync_cells(r, results) if sync else "|"))
    return "\n".join(lines)


def describe_setup(args: argparse.Namespace, results: list[RunResult]) -> list[str]:
    """The set-up lines above the table: model, parallelism, optimizers, steps and measurements."""
    total, per_rank = results[0].parameters
    wrapper = results[0].wrapper
    skipped = ", ".join(f"{LABELS[r.name]} {r.skipped_steps}" for r in results)
    return [
        f"- model: GPTModel (local spec), {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
        f"vocab {VOCAB_SIZE}, seq {args.seq_len}: {total:,} parameters ({per_rank:,} on rank 0); {args.dtype}; "
        f"initialised on the {getattr(args, 'init', 'cpu').upper()}",
        f"- parallelism: tp {args.tp}, dp {args.dp}, sequence parallel {'on' if args.tp > 1 else 'off'}, "
        f"distributed optimizer {'on' if args.distributed_optimizer else 'off'} (wrapper {wrapper})"
        + (f", parameter gather {args.param_gather}" if args.distributed_optimizer else "")
        + (", overlap_grad_reduce and overlap_param_gather on" if args.overlap_param_gather else ""),
        f"- Magma: keep_prob {args.keep_prob:g}, block {args.block}, seed {args.seed}, lr {args.magma_lr:g}; "
        f"Adam: lr {args.lr:g}; both: betas (0.9, 0.95), weight decay 0.1, clip 1.0, "
        f"warm-up {int(0.1 * args.steps)} steps then cosine to lr/10",
        f"- {args.steps} steps of {args.dp} x {args.micro_batch} x {args.seq_len} tokens"
        + (f", {args.rounds} rounds (every run per round, the order reversed every other round; figures: medians "
           "over the rounds)" if getattr(args, "rounds", 1) > 1 else "")
        + f"; timings: medians of "
        f"rank 0 over steps {args.warmup_steps + 1}-{args.steps} (sync bytes: rank 0's mean over those "
        f"steps); final loss: mean of the last "
        f"{min(LOSS_WINDOW, args.steps)} steps over DP ranks; skipped (overflow) steps: {skipped}",
    ]


def markdown_report(args: argparse.Namespace, results: list[RunResult], device: str, versions: str,
                    rounds: list[list[RunResult]] | None = None) -> str:
    """The Markdown page of ``--table``: ``device`` (e.g. "2 x NVIDIA H200") and ``versions`` (of
    torch and megatron-core) head it, with the date and the command that ran; with several
    ``rounds`` (``results`` then their medians), each round's ratios follow the table."""
    world = args.tp * args.dp
    command = f"torchrun --nproc-per-node {world} " + shlex.join(sys.argv)
    lines = [
        "# megatron-core GPTModel: Magma vs Adam",
        "",
        f"- device: {device}; {versions}; date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        *describe_setup(args, results),
        f"- command: `{command}`",
        "",
        format_table(results),
        "",
        "Iteration: CUDA events around zero_grad, forward-backward (Megatron's schedule, with the DP "
        "gradient reduction), optimizer step and scheduler step. Wrapper step: around Megatron's "
        "`optimizer.step()` (grad copy, unscale, clipping, the inner step, copy back to the model and, "
        "with the distributed optimizer, the parameter all-gather). Inner step: around the inner "
        "optimizer's own `step()`. tokens/s: global tokens per iteration / median iteration.",
    ]
    if rounds is not None and len(rounds) > 1:
        lines[-1:-1] = ["Per round:", "", rounds_table(rounds), ""]
    if any(r.param_sync_ms is not None for r in results):
        lines[-1] += (
            " Param sync: around each distributed-optimizer part's `start_param_sync_for_bucket_group_subset()`, "
            "the parameter all-gather after the inner step (Megatron's dense all-gather of every bucket, or "
            "with Magma+sparse the kept blocks' elements by the route the sparse gather picks per dtype: "
            "packed into all-gathers padded to the largest rank's count, or in place by point-to-point "
            "transfers, with its host-side layout); param sync vs dense: over the median of "
            "the Magma run with the dense gather (over Adam's without one). Sync bytes/step: bytes rank 0 "
            "sent plus received in that sync per step (`magma_ext.megatron.param_sync_bytes`), mean over "
            "the timed steps that ran (an fp16 overflow step syncs nothing); Adam and a dense-gather Magma "
            "run move the dense figure. Bytes vs dense: "
            "mean sent + received over the mean a dense all-gather of the same buckets moves (bucket and "
            "packing padding included).")
    return "\n".join(lines) + "\n"


def write_layout(path: str, results: list[RunResult]) -> None:
    """--layout-json: the Magma+sparse run's bucket layout record, else that of the one run with one."""
    recorded = [r for r in results if r.layout is not None]
    chosen = next((r for r in recorded if is_sparse(r.name)), recorded[0] if recorded else None)
    if chosen is None:
        print(f"note: no run has a sparse parameter gather: {path} not written", flush=True)
        return
    Path(path).write_text(json.dumps(chosen.layout))
    print(f"wrote {path} ({LABELS[chosen.name]}'s bucket layout; project it with "
          f"python benchmarks/sparse_gather_projection.py {path})", flush=True)

