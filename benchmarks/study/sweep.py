"""The sweep: runs an invocation's share of the plan, one run after another in this process,
and writes one record per run into the invocation's bundle.

Runs go in plan order (:func:`.plan.ordered_runs`), so a best-lr or transfer run comes after the
sweep it takes its learning rate from, and is skipped, with the reason, when that sweep is not
complete in the records (this invocation's and ``--resume``'s).

With ``--time-budget-s``, runs stop at the budget, saving a checkpoint that a later invocation
with the same ``--work-dir`` on the same machine goes on from (:mod:`.trainer`); a stopped run
is listed as skipped, with its step, so the records say what is missing.

``--resume`` counts an earlier record only if it trained on its size's corpus (its content
SHA-1: the one built here for the sizes this invocation trains, else the one most of the size's
records name) and, for a best-lr or transfer run, only while its lr is still what its rule picks
from the sweep (:func:`.plan.split_stale`); the others are run again. A machine whose corpus is
not the one a size's records trained on refuses to train that size.
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from magma_ext.demo.train import BETAS

from . import corpus as corpus_lib
from .definition import CORPORA, MUON_ADAMW_LR_RATIO, Edition, Recipe, Size
from .environment import command_line, environment
from .optimizers import runs_magma_fused
from .plan import Cell, RunSpec, not_finished, ordered_runs, resolve_lr, split_stale
from .records import BundleWriter, corpus_of, curve, load_finished, now_utc, on_corpora, study_corpora
from .trainer import Diverged, RunJob, load_split, train_run

# Seconds a stopping run needs after its budget: finish the step, save the checkpoint, exit.
STOP_MARGIN_S = 30.0
# A run is not started with less than this left of the budget: its start-up (15-25 s for size S
# on an H200) would take most of it. A run started with less than it needs stops at the budget
# with a checkpoint, which the next call on the same machine goes on from.
MIN_LAUNCH_S = 45.0


def trained_id(run: RunSpec, lr: float) -> str:
    """The id of the record (and the checkpoint) of ``run`` trained at ``lr``: its learning rate
    in place of its rule."""
    return RunSpec(run.size, run.optimizer, lr, run.seed, run.stage).run_id


def base_record(edition: Edition, run: RunSpec, lr: float, note: str, size: Size, spec: Recipe,
                device: torch.device, dtype: str, compile_mode: str) -> dict:
    """The fields a run's record has before it trains."""
    return {"kind": "run", "id": trained_id(run, lr),
            "size": size.name, "optimizer": spec.name, "lr": lr, "seed": run.seed, "stage": run.stage,
            "steps": size.steps, "batch_size": size.batch_size, "seq_len": size.seq_len, "tokens": size.tokens,
            "eval_every": size.eval_every, "eval_batches": size.eval_batches,
            "model": size.model_config().to_dict(), "dtype": dtype, "optimizer_description": spec.description,
            "magma_fused": runs_magma_fused(spec, device), "status": "ok", "error": None,
            "edition": edition.number, "tier": run.tier, "lr_rule": run.rule, "lr_note": note or None,
            "final_eval_batches": size.final_eval_batches or size.eval_batches, "compile": compile_mode}


def train_one(job: RunJob, recipe: Recipe, data, device: torch.device, record: dict) -> dict:
    """Train one job and return its record (``record`` holds its fields so far): a divergence or
    an error becomes the status; a stopped run's record keeps ``stopped_at``."""
    if job.compile != "none":
        torch._dynamo.reset()  # a fresh model per run: no recompilations piling up in one process
    start = time.perf_counter()
    try:
        result = train_run(job, recipe, *data, device, log=lambda text: print(text, flush=True))
    except Diverged as exc:
        return {**record, "status": "diverged", "error": str(exc), "wall_s": time.perf_counter() - start}
    except Exception as exc:  # noqa: BLE001 -- one broken run must not lose the others
        print(traceback.format_exc(), flush=True)
        return {**record, "status": "error", "error": f"{type(exc).__name__}: {exc}",
                "wall_s": time.perf_counter() - start}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record = {**record, **result}
    if result["stopped_at"] is None:
        record["train_loss"] = curve(result["train_loss"])
        record["val_loss"] = curve(result["val_loss"])
    return record


def sweep_meta(args, edition: Edition, cells: list[Cell], runs: list[RunSpec], device, data_description: dict) -> dict:
    """The set-up of a sweep invocation, as its bundle carries it."""
    return {"command": command_line(), "date": now_utc(), "mode": "sweep", "edition": edition.number,
            "quick": args.quick, "time_budget_s": args.time_budget_s, "env": environment(device),
            "data": data_description,
            "sizes": {c.size.name: {**c.size.model_config().to_dict(), "steps": c.size.steps,
                                    "batch_size": c.size.batch_size, "seq_len": c.size.seq_len,
                                    "tokens": c.size.tokens} for c in cells},
            "optimizers": {c.spec.name: {"lrs": list(c.lrs), "description": c.spec.description} for c in cells},
            "weight_decay": edition.weight_decay, "betas": list(BETAS), "muon_adamw_lr_ratio": MUON_ADAMW_LR_RATIO,
            "planned_runs": [r.run_id for r in runs], "resumed_from": [str(p) for p in args.resume],
            "tiers": [asdict(t) for t in dict.fromkeys(c.tier for c in cells)], "compile": args.compile}


def _outcome(record: dict) -> str:
    if record["status"] == "ok":
        return f"val ppl {record['final_val_ppl']:.4f}, {record['tokens_per_s']:,.0f} tok/s"
    return f"{record['status'].upper()}: {record['error']}"


def build_corpus(data: str | None, cells: list[Cell], cache_dir: Path) -> corpus_lib.Corpus:
    """The corpus of the invocation's sizes (``data`` instead where given); ValueError where
    their sizes name different corpora (run their tiers in separate invocations)."""
    names = sorted({c.size.corpus for c in cells})
    if data is None and len(names) > 1:
        raise ValueError(
            "the sizes of these tiers train on different corpora ("
            + "; ".join(f"{c.size.name}: {c.size.corpus}" for c in {c.size.name: c for c in cells}.values())
            + "): run their tiers in separate invocations (--tiers)")
    roots, suffixes = CORPORA[names[0]]
    return corpus_lib.build(data, cache_dir, extra_roots=roots, suffixes=suffixes)


def run_sweep(args, edition: Edition, cells: list[Cell], device: torch.device, started: float) -> int:
    """Run the cells' runs, less what ``--resume`` finished; ``started`` (monotonic seconds) is
    when the process started, for ``--time-budget-s``."""
    finished = load_finished(args.resume)
    cell_of = {(c.size.name, c.spec.name): c for c in cells}
    try:
        corpus = build_corpus(args.data, cells, args.work_dir / "corpus")
    except (ValueError, FileNotFoundError) as exc:  # CorpusTooSmall is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data_description = corpus_lib.describe(corpus.manifest)
    here = data_description["content_sha1"]
    corpora, trained = study_corpora(finished), {c.size.name for c in cells}
    moved = sorted(size for size in trained if corpora.get(size, here) != here)
    if moved:
        print(f"error: the --resume runs of size {', '.join(moved)} trained on corpus "
              f"{', '.join(corpora[size][:12] for size in moved)}, but this machine builds {here[:12]} "
              f"({data_description['source']}): runs here would not compare with them. Run where that corpus "
              "builds (the same machine image), or leave those runs' bundles out of --resume to run that size "
              "again here.", file=sys.stderr)
        return 2
    corpora.update({size: here for size in trained})
    finished, elsewhere = on_corpora(finished, corpora)
    if elsewhere:
        print(f"warning: {len(elsewhere)} --resume records trained on another corpus than their size's "
              f"({', '.join(sorted({corpus_of(r)[:12] for r in elsewhere}))}): their validation set is another, "
              "so they count for nothing and are run again", flush=True)
    finished, stale = split_stale(finished, cells)
    for r in stale:
        print(f"warning: --resume record {r['id']} ran at lr {r['lr']:g}, which is no longer what its rule picks "
              "from the sweep: it is run again", flush=True)
    runs = not_finished(ordered_runs(cells), finished)
    try:
        corpus_lib.check_fits(corpus.train_bytes, {cell_of[(r.size, r.optimizer)].size for r in runs},
                              f"the corpus ({corpus.manifest['source']})")
    except corpus_lib.CorpusTooSmall as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    data = (load_split(str(corpus.train_path), device), load_split(str(corpus.val_path), device))
    checkpoint_dir = args.work_dir / "checkpoints"
    meta = sweep_meta(args, edition, cells, runs, device, data_description)
    writer = BundleWriter(args.bundle, meta)
    env = meta["env"]
    print(f"{len(runs)} runs on {env['device_name']} ({args.dtype}, compile {args.compile}); data "
          f"{data_description['source']}: {data_description['train_bytes']:,} train / "
          f"{data_description['val_bytes']:,} val bytes; Magma CUDA extension "
          f"{'loaded' if env['magma_cuda_extension'] else 'NOT loaded: Magma runs on the reference path'}",
          flush=True)

    failures, trained_tokens, first_launch = 0, 0, None
    for run in runs:
        cell = cell_of[(run.size, run.optimizer)]
        size = cell.size
        lr, note = resolve_lr(run, cell, finished + writer.contents["runs"])
        usable = None if args.time_budget_s is None else (
            args.time_budget_s - (time.monotonic() - started) - STOP_MARGIN_S)
        reason = (note if lr is None else
                  f"time budget: {max(usable, 0):.0f} s usable" if usable is not None and usable < MIN_LAUNCH_S
                  else None)
        if reason:
            print(f"{run.run_id}: skipped ({reason})", flush=True)
            writer.add("skipped", {"id": run.run_id, "reason": reason})
            continue
        first_launch = first_launch or time.monotonic()
        record = base_record(edition, run, lr, note, size, cell.spec, device, args.dtype, args.compile)
        job = RunJob(record["id"], size, lr, run.seed, edition.weight_decay, data_sha1=here, dtype=args.dtype,
                     compile=args.compile, checkpoint_dir=str(checkpoint_dir),
                     stop_at=None if usable is None else time.time() + usable)
        record = train_one(job, cell.spec, data, device, record)
        start_step = (record.get("resumed_at") or [0])[-1]
        if record.get("stopped_at") is not None:
            trained_tokens += (record["stopped_at"] - start_step) * size.batch_size * size.seq_len
            reason = (f"stopped at step {record['stopped_at']} of {size.steps} by the time budget; a later "
                      f"invocation with --work-dir {args.work_dir} on this machine goes on from there")
            print(f"{run.run_id}: skipped ({reason})", flush=True)
            writer.add("skipped", {"id": run.run_id, "reason": reason})
            continue
        record.pop("stopped_at", None)
        if record["status"] == "ok":
            trained_tokens += (size.steps - start_step) * size.batch_size * size.seq_len
        record.update(command=meta["command"], date=now_utc(), env=env, data=data_description)
        writer.add("runs", record)
        failures += record["status"] == "error"
        memory = f", peak {record['peak_mem_bytes'] / 2**20:,.0f} MiB" if record.get("peak_mem_bytes") else ""
        print(f"[{len(writer.contents['runs'])}/{len(runs)}] {run.size} {run.optimizer} lr {lr:g} seed {run.seed}: "
              f"{_outcome(record)}  ({record['wall_s']:.1f} s{memory}; {time.monotonic() - started:.0f} s elapsed)",
              flush=True)

    summary = f"done: {len(writer.contents['runs'])} runs, {len(writer.contents['skipped'])} skipped, {failures} errors"
    if first_launch is not None:
        wall = time.monotonic() - first_launch
        writer.set_meta("aggregate", {"tokens_trained": trained_tokens, "wall_s": wall, "devices": 1,
                                      "runs_per_device": 1, "tokens_per_s_per_device": trained_tokens / wall})
        summary += (f"; {trained_tokens / 1e6:,.1f}M tokens trained in {wall:.0f} s: {trained_tokens / wall:,.0f} "
                    "tokens/s, start-ups and evaluations included")
    print(summary + f"; {time.monotonic() - started:.0f} s; bundle {args.bundle}", flush=True)
    return 1 if failures else 0
