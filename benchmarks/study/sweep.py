"""The sweep: runs an invocation's share of the plan and writes one record per run.

Edition 1 trains each run in this process with the demo's loop (``magma_ext.demo.train``).
Edition 2 trains with :mod:`.trainer`: in this process when there is one slot, else in worker
processes (``convergence.py worker JOB RECORD``, one process per run), ``--parallel`` of them
side by side on each of ``--gpus`` GPUs (or on the CPU). Runs start in plan order as slots free
up; a best-lr or transfer run starts once every run of the sweep it takes its learning rate
from has finished, and is skipped, with the reason, when that sweep cannot complete here.

With ``--time-budget-s``, edition 2's runs stop at the budget, saving a checkpoint that a later
invocation with the same ``--checkpoint-dir`` goes on from (:mod:`.trainer`); a stopped run is
listed as skipped, with its step, so the records say what is missing.

``--resume`` counts an earlier record only if it trained on its size's corpus (its content
SHA-1: the one built here for the sizes this invocation trains, else the one most of the size's
records name) and, for a best-lr or transfer run, only while its lr is still what its rule picks
from the sweep (:func:`.plan.split_stale`); the others are run again. A machine whose corpus is
not the one a size's records trained on refuses to train that size unless ``--switch-corpus``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from magma_ext.demo import load_corpus, train
from magma_ext.demo.train import BETAS

from . import corpus as corpus_lib
from .definition import MUON_ADAMW_LR_RATIO, Edition, Recipe, Size, edition as edition_by_number
from .environment import command_line, describe_data, environment
from .optimizers import runs_magma_fused
from .plan import (Cell, RunSpec, assign_shards, measured_wall_s, not_finished, resolve_lr, same_budget, shard_runs,
                   split_stale, waits_for)
from .records import (RecordWriter, corpus_of, curve, load_finished, now_utc, on_corpora, study_corpora,
                      write_json)
from .trainer import Diverged, RunJob, checkpointed_step, load_split, train_run

REPO = Path(__file__).resolve().parents[2]
# Seconds a stopping run needs after its budget: finish the step, save the checkpoint, exit.
STOP_MARGIN_S = 30.0
# A run is not started with less than this left of the budget: its start-up (15-25 s for size S
# on an H200) would take most of it. A run started with less than it needs stops at the budget
# with a checkpoint, which the next call on the same machine goes on from.
MIN_LAUNCH_S = 45.0
POLL_S = 0.5


def default_work_dir(edition_number: int) -> Path:
    """Where checkpoints and the corpus go unless told: the machine's temporary folder, which
    outlives a device call on a warm machine but not the machine."""
    return Path(tempfile.gettempdir()) / "magma_ext_study" / f"edition{edition_number}"


# ---------------------------------------------------------------------------- one run


def trained_id(run: RunSpec, lr: float) -> str:
    """The id of the record (and the checkpoint) of ``run`` trained at ``lr``: its learning rate
    in place of its rule."""
    return RunSpec(run.size, run.optimizer, lr, run.seed, run.stage).run_id


def base_record(edition: Edition, run: RunSpec, lr: float, note: str, size: Size, spec: Recipe,
                device: torch.device, dtype: str, compile_mode: str, slot: tuple[int | None, int]) -> dict:
    """The fields a run's record has before it trains."""
    record = {"kind": "run", "id": trained_id(run, lr),
              "size": size.name, "optimizer": spec.name, "lr": lr, "seed": run.seed, "stage": run.stage,
              "steps": size.steps, "batch_size": size.batch_size, "seq_len": size.seq_len, "tokens": size.tokens,
              "eval_every": size.eval_every, "eval_batches": size.eval_batches,
              "model": size.model_config().to_dict(), "dtype": dtype, "optimizer_description": spec.description,
              "magma_fused": runs_magma_fused(spec, device), "status": "ok", "error": None}
    if edition.number > 1:
        record.update({"edition": edition.number, "tier": run.tier, "lr_rule": run.rule, "lr_note": note or None,
                       "final_eval_batches": size.final_eval_batches or size.eval_batches,
                       "compile": compile_mode, "gpu": slot[0], "side_by_side": slot[1]})
    return record


def run_demo(record: dict, run: RunSpec, lr: float, size: Size, spec: Recipe, data, device, dtype: str,
             weight_decay: float) -> dict:
    """Edition 1: train one run with the demo's loop; a divergence or an error becomes the status."""
    from .optimizers import build

    train_data, val_data = data
    factory = lambda model: build(spec, model, lr, run.seed, device, weight_decay)  # noqa: E731
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
    record["train_loss"] = curve(result["train_loss"])
    record["val_loss"] = curve(result["val_loss"])
    return record


def execute_job(job: RunJob, edition: Edition, data=None, log=print) -> dict:
    """Edition 2: train one job with :mod:`.trainer` and return its record (``job.extra`` holds
    the record's fields so far). A stopped run's record keeps ``stopped_at``."""
    device = torch.device(job.device)
    if job.threads:
        torch.set_num_threads(job.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    if job.compile != "none":
        torch._dynamo.reset()  # a fresh model per run: no recompilations piling up in one process
    record = dict(job.extra)
    start = time.perf_counter()
    try:
        if data is None:
            data = (load_split(job.train_path, device), load_split(job.val_path, device))
        result = train_run(job, edition.optimizers[job.optimizer], *data, device, log=log)
    except Diverged as exc:
        record.update(status="diverged", error=str(exc), wall_s=time.perf_counter() - start)
        return record
    except Exception as exc:  # noqa: BLE001 -- one broken run must not lose the others
        log(traceback.format_exc())
        record.update(status="error", error=f"{type(exc).__name__}: {exc}", wall_s=time.perf_counter() - start)
        return record
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record.update(result)
    if result["stopped_at"] is None:
        record["train_loss"] = curve(result["train_loss"])
        record["val_loss"] = curve(result["val_loss"])
    return record


def worker_main(job_path: str, record_path: str) -> int:
    """``convergence.py worker JOB RECORD``: one run of edition 2 in its own process."""
    job = RunJob.from_json(Path(job_path).read_text())
    record = execute_job(job, edition_by_number(job.extra["edition"]),
                         log=lambda text: print(f"[{job.run_id}] {text}", flush=True))
    write_json(Path(record_path), record)
    return 0


# ---------------------------------------------------------------------------- slots


@dataclass
class Running:
    """A run under way in a slot: in a worker process, or (in this process) already done."""

    run: RunSpec
    lr: float
    base: dict
    record_path: Path | None = None
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    record: dict | None = None
    started: float = 0.0

    def poll(self) -> dict | None:
        if self.record is not None:
            return self.record
        if self.process.poll() is None:
            return None
        if self.record_path.is_file():
            self.record = json.loads(self.record_path.read_text())
        else:
            tail = self.log_path.read_text()[-2000:] if self.log_path.is_file() else ""
            self.record = {**self.base, "status": "error", "error": f"worker exited with code "
                           f"{self.process.returncode} and no record; its log ends: {tail}",
                           "wall_s": time.monotonic() - self.started}
        return self.record


def make_slots(args, device: torch.device) -> list[tuple[int | None, int]]:
    """(GPU index or None, how many runs share it) for every slot."""
    if device.type != "cuda":
        return [(None, args.parallel)] * args.parallel
    visible = torch.cuda.device_count()
    count = visible if args.gpus is None else args.gpus
    if not 1 <= count <= visible:
        raise SystemExit(f"--gpus {count}: {visible} GPU(s) visible")
    return [(gpu, args.parallel) for _ in range(args.parallel) for gpu in range(count)]


# ---------------------------------------------------------------------------- the invocation


def sweep_meta(args, edition: Edition, cells: list[Cell], runs: list[RunSpec], device, data_description: dict,
               slots) -> dict:
    """The set-up of a sweep invocation, as its records carry it."""
    meta = {"command": command_line(), "date": now_utc(), "mode": "sweep", "shard": args.shard,
            "num_shards": args.num_shards, "quick": args.quick, "time_budget_s": args.time_budget_s,
            "env": environment(device), "data": data_description,
            "sizes": {c.size.name: {**c.size.model_config().to_dict(), "steps": c.size.steps,
                                    "batch_size": c.size.batch_size, "seq_len": c.size.seq_len,
                                    "tokens": c.size.tokens} for c in cells},
            "optimizers": {c.spec.name: {"lrs": list(c.lrs), "description": c.spec.description} for c in cells},
            "weight_decay": edition.weight_decay, "betas": list(BETAS), "muon_adamw_lr_ratio": MUON_ADAMW_LR_RATIO,
            "planned_runs": [r.run_id for r in runs], "resumed_from": [str(p) for p in args.resume]}
    if edition.number > 1:
        meta.update({"edition": edition.number,
                     "tiers": [asdict(t) for t in dict.fromkeys(c.tier for c in cells)],
                     "parallel": args.parallel, "gpus": len({s[0] for s in slots}), "compile": args.compile})
    return meta


def _outcome(record: dict) -> str:
    if record["status"] == "ok":
        speed = f", {record['tokens_per_s']:,.0f} tok/s" if record.get("tokens_per_s") else ""
        return f"val ppl {record['final_val_ppl']:.4f}{speed}"
    return f"{record['status'].upper()}: {record['error']}"


def run_sweep(args, edition: Edition, cells: list[Cell], device: torch.device, started: float) -> int:
    """Run this invocation's shard, less what ``--resume`` finished; ``started`` (monotonic
    seconds) is when the process started, for ``--time-budget-s``."""
    shard = assign_shards(cells, args.num_shards)[args.shard - 1]
    finished, other = same_budget(load_finished(args.resume), edition, quick=args.quick, steps=args.steps)
    if other:
        print(f"warning: {len(other)} --resume records have another budget (steps, batch, seq_len) than this "
              f"plan's and are left out, e.g. {other[0]['id']} ({other[0]['steps']} steps)", flush=True)
    cell_of = {(c.size.name, c.spec.name): c for c in shard}
    work_dir = default_work_dir(edition.number)
    slots = [(None, 1)] if edition.harness == "demo" else make_slots(args, device)

    if edition.harness == "demo":
        max_bytes = args.max_bytes if args.max_bytes is not None else edition.default_max_bytes
        train_data, val_data = load_corpus(args.data, max_bytes=max_bytes)
        data_description = describe_data(args.data, train_data, val_data, max_bytes)
        corpus, local_data = None, (train_data, val_data)
    else:
        cache_dir = Path(args.cache_dir) if args.cache_dir else work_dir / "corpus"
        try:
            corpus = corpus_lib.build(args.data, cache_dir, extra_roots=args.corpus_add,
                                      suffixes=args.corpus_suffixes, max_bytes=args.max_bytes)
        except corpus_lib.CorpusTooSmall as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        data_description = corpus_lib.describe(corpus.manifest)
        local_data = None
        if len(slots) == 1:  # one slot: the runs train in this process, on one copy of the data
            local_data = (load_split(str(corpus.train_path), device), load_split(str(corpus.val_path), device))
    here = data_description.get("content_sha1")
    corpora, trained = study_corpora(finished), {c.size.name for c in shard}
    moved = sorted(size for size in trained if here and corpora.get(size, here) != here)
    if moved and not args.switch_corpus:
        print(f"error: the --resume runs of size {', '.join(moved)} trained on corpus "
              f"{', '.join(corpora[size][:12] for size in moved)}, but this machine builds {here[:12]} "
              f"({data_description['source']}): runs here would not compare with them. Run where that corpus "
              "builds (the same machine image), or pass --switch-corpus to run that size again here.",
              file=sys.stderr)
        return 2
    corpora.update({size: here for size in trained if here})
    finished, elsewhere = on_corpora(finished, corpora)
    if elsewhere:
        print(f"warning: {len(elsewhere)} --resume records trained on another corpus than their size's "
              f"({', '.join(sorted({corpus_of(r)[:12] for r in elsewhere}))}): their validation set is another, "
              "so they count for nothing and are run again", flush=True)
    finished, stale = split_stale(finished, shard)
    for r in stale:
        print(f"warning: --resume record {r['id']} ran at lr {r['lr']:g}, which is no longer what its rule picks "
              "from the sweep: it is run again", flush=True)
    runs = not_finished(shard_runs(shard), finished)
    if corpus is not None:
        try:
            corpus_lib.check_fits(corpus.train_bytes, {cell_of[(r.size, r.optimizer)].size for r in runs},
                                  f"the corpus ({corpus.manifest['source']})")
        except corpus_lib.CorpusTooSmall as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    checkpoint_dir = (None if args.checkpoint_dir == "" else
                      Path(args.checkpoint_dir) if args.checkpoint_dir else work_dir / "checkpoints")

    meta = sweep_meta(args, edition, shard, runs, device, data_description, slots)
    writer = RecordWriter(args.out, args.bundle, meta)
    env = meta["env"]
    print(f"shard {args.shard}/{args.num_shards}: {len(runs)} runs on {env['device_name']} ({args.dtype}"
          + (f", compile {args.compile}, {len(slots)} slot(s): {args.parallel} per device" if corpus else "")
          + f"); data {data_description['source']}: {data_description['train_bytes']:,} train / "
          f"{data_description['val_bytes']:,} val bytes; Magma CUDA extension "
          f"{'loaded' if env['magma_cuda_extension'] else 'NOT loaded: Magma runs on the reference path'}",
          flush=True)

    jobs_dir = Path(tempfile.mkdtemp(prefix="magma_study_jobs_")) if len(slots) > 1 else None
    pending, running = list(runs), {}
    failures, trained_tokens, count = 0, 0, len(runs)
    first_launch = None

    def records_so_far() -> list[dict]:
        return finished + writer.contents["runs"]

    def skip(run: RunSpec, reason: str) -> None:
        print(f"{run.run_id}: skipped ({reason})", flush=True)
        writer.add("skipped", {"id": run.run_id, "reason": reason})

    def readiness(run: RunSpec):
        """("wait",), ("skip", reason) or ("go", lr, note)."""
        cell = cell_of[(run.size, run.optimizer)]
        source = waits_for(run, cell)
        if source is not None:
            active = pending + [r.run for r in running.values()]
            if any(r.stage == "sweep" and (r.size, r.optimizer, r.seed) == source for r in active):
                return ("wait",)
        lr, note = resolve_lr(run, cell, records_so_far())
        if lr is None:
            return ("skip", note)
        return ("go", lr, note)

    def expected_wall_s(run: RunSpec, lr: float, size: Size) -> float:
        """A run's wall seconds: the median of the straight runs finished so far on this device
        at this parallelism (this invocation's and --resume's; :func:`.plan.measured_wall_s`),
        else the plan's estimate; of a run with a checkpoint, its start-up and the share of its
        steps still to train."""
        measured = measured_wall_s(records_so_far(), size.name, run.optimizer,
                                   lambda r: r.get("side_by_side") == args.parallel
                                   and r.get("env", {}).get("device_name") == env["device_name"])
        whole = measured if measured is not None else (
            size.wall_s(args.parallel) if size.tokens_per_s else size.estimate_s(run.optimizer))
        done = checkpointed_step(str(checkpoint_dir), trained_id(run, lr)) if checkpoint_dir else 0
        return whole - max(whole - size.setup_s, 0.0) * done / size.steps

    def budget_reason(run: RunSpec, lr: float, size: Size) -> tuple[str | None, float | None]:
        """(why not to start the run, or None; the time.time() it must stop at, or None)."""
        if args.time_budget_s is None:
            return None, None
        left = args.time_budget_s - (time.monotonic() - started)
        if edition.harness == "demo":
            done = [r["wall_s"] for r in writer.contents["runs"]
                    if r["size"] == run.size and r["optimizer"] == run.optimizer and r["status"] == "ok"]
            expected = max([size.estimate_s(run.optimizer)] + done)
            if expected > left:
                return (f"time budget: {args.time_budget_s - left:.0f} s elapsed + {expected:.0f} s expected "
                        f"> {args.time_budget_s:.0f} s"), None
            return None, None
        usable = left - STOP_MARGIN_S
        expected = expected_wall_s(run, lr, size)
        if usable < MIN_LAUNCH_S or (args.finish_only and expected > usable):
            return f"time budget: {max(usable, 0):.0f} s usable, the run needs about {expected:.0f} s", None
        return None, time.time() + usable

    def launch(run: RunSpec, lr: float, note: str, slot) -> Running:
        nonlocal first_launch
        first_launch = first_launch or time.monotonic()
        cell = cell_of[(run.size, run.optimizer)]
        size, spec = cell.size, cell.spec
        record = base_record(edition, run, lr, note, size, spec, device, args.dtype, args.compile, slot)
        if edition.harness == "demo":
            return Running(run, lr, record, record=run_demo(dict(record), run, lr, size, spec, local_data, device,
                                                             args.dtype, edition.weight_decay))
        _, stop_at = budget_reason(run, lr, size)
        job = RunJob(record["id"], asdict(size), spec.name, lr, run.seed, edition.weight_decay,
                     str(corpus.train_path), str(corpus.val_path), device="cuda" if device.type == "cuda" else "cpu",
                     dtype=args.dtype, compile=args.compile,
                     checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, stop_at=stop_at,
                     threads=max(1, (os.cpu_count() or 1) // len(slots)),
                     extra={**record, "data_sha1": data_description["content_sha1"]})
        if jobs_dir is None:
            result = execute_job(job, edition, data=local_data, log=lambda text: print(text, flush=True))
            return Running(run, lr, record, record=result)
        stem = jobs_dir / record["id"]
        Path(f"{stem}.job.json").write_text(job.to_json())
        env_vars = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if slot[0] is not None:
            env_vars["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(
                str(i) for i in range(torch.cuda.device_count()))).split(",")[slot[0]]
        log_path = Path(f"{stem}.log")
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(
                [sys.executable, str(REPO / "benchmarks" / "convergence.py"), "worker", f"{stem}.job.json",
                 f"{stem}.record.json"], cwd=REPO, env=env_vars, stdout=log_file, stderr=subprocess.STDOUT)
        return Running(run, lr, record, Path(f"{stem}.record.json"), process, log_path, started=time.monotonic())

    def land(item: Running) -> None:
        nonlocal failures, trained_tokens
        record = item.poll()
        record.pop("data_sha1", None)
        run, size = item.run, cell_of[(item.run.size, item.run.optimizer)].size
        start_step = (record.get("resumed_at") or [0])[-1]
        if record.get("stopped_at") is not None:
            trained_tokens += (record["stopped_at"] - start_step) * size.batch_size * size.seq_len
            skip(run, f"stopped at step {record['stopped_at']} of {size.steps} by the time budget; a later "
                      f"invocation with --checkpoint-dir {checkpoint_dir} on this machine goes on from there")
            return
        record.pop("stopped_at", None)
        if record["status"] == "ok":
            trained_tokens += (size.steps - start_step) * size.batch_size * size.seq_len
        record.update(command=meta["command"], date=now_utc(), env=env, data=data_description)
        writer.add("runs", record, f"{record['id']}.json")
        failures += record["status"] == "error"
        memory = f", peak {record['peak_mem_bytes'] / 2**20:,.0f} MiB" if record.get("peak_mem_bytes") else ""
        where = f", GPU {record['gpu']}" if record.get("gpu") is not None else ""
        print(f"[{len(writer.contents['runs'])}/{count}] {run.size} {run.optimizer} lr {item.lr:g} seed {run.seed}: "
              f"{_outcome(record)}  ({record['wall_s']:.1f} s{memory}{where}; "
              f"{time.monotonic() - started:.0f} s elapsed)", flush=True)
        if record["status"] == "error" and item.log_path is not None:
            print(item.log_path.read_text()[-3000:], flush=True)

    try:
        while pending or running:
            for slot_index, slot in enumerate(slots):
                if slot_index in running:
                    continue
                for run in list(pending):
                    state = readiness(run)
                    if state[0] == "wait":
                        continue
                    pending.remove(run)
                    if state[0] == "skip":
                        skip(run, state[1])
                        continue
                    reason, _ = budget_reason(run, state[1], cell_of[(run.size, run.optimizer)].size)
                    if reason:
                        skip(run, reason)
                        continue
                    running[slot_index] = launch(run, state[1], state[2], slot)
                    break
            if not running:
                for run in pending:  # nothing runs, so nothing they wait for can finish here
                    skip(run, "waits for runs that did not finish in this invocation")
                break
            while True:
                done = {i: item for i, item in running.items() if item.poll() is not None}
                if done:
                    break
                time.sleep(POLL_S)
            for slot_index, item in done.items():
                del running[slot_index]
                land(item)
    finally:  # interrupted: end the workers this invocation started (their checkpoints stay)
        for item in running.values():
            if item.process is not None and item.process.poll() is None:
                item.process.terminate()
    if jobs_dir is not None and not failures:  # the workers' logs stay where a run failed
        shutil.rmtree(jobs_dir, ignore_errors=True)

    summary = f"done: {len(writer.contents['runs'])} runs, {len(writer.contents['skipped'])} skipped, {failures} errors"
    if first_launch is not None and edition.harness != "demo":
        wall = time.monotonic() - first_launch
        gpus = len({s[0] for s in slots})
        writer.set_meta("aggregate", {"tokens_trained": trained_tokens, "wall_s": wall, "devices": gpus,
                                      "runs_per_device": args.parallel,
                                      "tokens_per_s_per_device": trained_tokens / wall / gpus if wall else None})
        summary += (f"; {trained_tokens / 1e6:,.1f}M tokens trained in {wall:.0f} s: "
                    f"{trained_tokens / wall / gpus:,.0f} tokens/s per device, start-ups and evaluations included")
    print(summary + f"; {time.monotonic() - started:.0f} s" + (f"; bundle {args.bundle}" if args.bundle else ""),
          flush=True)
    return 1 if failures else 0
