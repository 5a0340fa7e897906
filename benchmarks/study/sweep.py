"""The learning-rate sweep: trains a shard's runs one after the other with the demo's loop and
writes one record per run."""

from __future__ import annotations

import time

import torch

from magma_ext.demo import load_corpus, train
from magma_ext.demo.train import BETAS

from .definition import MUON_ADAMW_LR_RATIO, OPTIMIZERS, WEIGHT_DECAY, Recipe, Size, quick_lrs
from .environment import command_line, describe_data, environment
from .optimizers import build, runs_magma_fused
from .plan import RunSpec, assign_shards, best_lr, make_cells, not_finished, shard_runs
from .records import RecordWriter, curve, load_finished, now_utc, run_id


def run_one(run: RunSpec, lr: float, size: Size, spec: Recipe, data, device, dtype: str) -> dict:
    """Train one run with the demo's loop; a divergence or an error becomes the record's status."""
    train_data, val_data = data
    factory = lambda model: build(spec, model, lr, run.seed, device)  # noqa: E731
    record = {"kind": "run", "id": run_id(size.name, spec.name, lr, run.seed), "size": size.name,
              "optimizer": spec.name, "lr": lr, "seed": run.seed, "stage": run.stage, "steps": size.steps,
              "batch_size": size.batch_size, "seq_len": size.seq_len, "tokens": size.tokens,
              "eval_every": size.eval_every, "eval_batches": size.eval_batches,
              "model": size.model_config().to_dict(), "dtype": dtype, "optimizer_description": spec.description,
              "magma_fused": runs_magma_fused(spec, device), "status": "ok", "error": None}
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


def sweep_meta(args, sizes: list[Size], specs: list[Recipe], runs: list[RunSpec], device, data) -> dict:
    """The set-up of a sweep invocation, as its records carry it."""
    train_data, val_data = data
    return {"command": command_line(), "date": now_utc(), "mode": "sweep", "shard": args.shard,
            "num_shards": args.num_shards, "quick": args.quick, "time_budget_s": args.time_budget_s,
            "env": environment(device), "data": describe_data(args.data, train_data, val_data, args.max_bytes),
            "sizes": {s.name: {**s.model_config().to_dict(), "steps": s.steps, "batch_size": s.batch_size,
                               "seq_len": s.seq_len, "tokens": s.tokens, "sweep_seeds": list(s.sweep_seeds),
                               "best_lr_seeds": list(s.best_lr_seeds)} for s in sizes},
            "optimizers": {s.name: {"lrs": list(quick_lrs(s) if args.quick else s.lrs),
                                    "description": s.description} for s in specs},
            "weight_decay": WEIGHT_DECAY, "betas": list(BETAS), "muon_adamw_lr_ratio": MUON_ADAMW_LR_RATIO,
            "planned_runs": [r.run_id for r in runs], "resumed_from": [str(p) for p in args.resume]}


def run_sweep(args, sizes: list[Size], specs: list[Recipe], device: torch.device, started: float) -> int:
    """Run this invocation's shard, less what ``--resume`` finished; ``started`` (monotonic
    seconds) is when the process started, for ``--time-budget-s``."""
    shards = assign_shards(make_cells(sizes, specs, args.quick), args.num_shards)
    finished = load_finished(args.resume)
    runs = not_finished(shard_runs(shards[args.shard - 1]), finished)
    sizes_by_name = {s.name: s for s in sizes}
    train_data, val_data = load_corpus(args.data, max_bytes=args.max_bytes)
    meta = sweep_meta(args, sizes, specs, runs, device, (train_data, val_data))
    writer = RecordWriter(args.out, args.bundle, meta)
    env = meta["env"]
    print(f"shard {args.shard}/{args.num_shards}: {len(runs)} runs on {env['device_name']} ({args.dtype}); "
          f"data {meta['data']['source']}: {meta['data']['train_bytes']:,} train / "
          f"{meta['data']['val_bytes']:,} val bytes; Magma CUDA extension "
          f"{'loaded' if env['magma_cuda_extension'] else 'NOT loaded: Magma runs on the reference path'}",
          flush=True)

    failures = 0
    for n, run in enumerate(runs, 1):
        size, spec = sizes_by_name[run.size], OPTIMIZERS[run.optimizer]
        lr = run.lr if run.lr is not None else best_lr(finished + writer.contents["runs"], run.size,
                                                       run.optimizer, size.sweep_seeds[0])
        skip_reason = None
        if lr is None:
            skip_reason = "no finished seed-0 sweep run to take the best learning rate from"
        elif args.time_budget_s is not None:
            done = [r["wall_s"] for r in writer.contents["runs"]
                    if r["size"] == run.size and r["optimizer"] == run.optimizer and r["status"] == "ok"]
            expected = max([size.estimate_s(run.optimizer)] + done)
            elapsed = time.monotonic() - started
            if elapsed + expected > args.time_budget_s:
                skip_reason = (f"time budget: {elapsed:.0f} s elapsed + {expected:.0f} s expected "
                               f"> {args.time_budget_s:.0f} s")
        if skip_reason:
            print(f"[{n}/{len(runs)}] {run.run_id}: skipped ({skip_reason})", flush=True)
            writer.add("skipped", {"id": run.run_id, "reason": skip_reason})
            continue
        record = run_one(run, lr, size, spec, (train_data, val_data), device, args.dtype)
        record.update(command=meta["command"], date=now_utc(), env=env, data=meta["data"])
        writer.add("runs", record, f"{record['id']}.json")
        failures += record["status"] == "error"
        outcome = (f"val ppl {record['final_val_ppl']:.4f}" if record["status"] == "ok"
                   else f"{record['status'].upper()}: {record['error']}")
        memory = f", peak {record['peak_mem_bytes'] / 2**20:,.0f} MiB" if record.get("peak_mem_bytes") else ""
        print(f"[{n}/{len(runs)}] {run.size} {run.optimizer} lr {lr:g} seed {run.seed}: {outcome}  "
              f"({record['wall_s']:.1f} s{memory}; {time.monotonic() - started:.0f} s elapsed)", flush=True)
    print(f"done: {len(writer.contents['runs'])} runs, {len(writer.contents['skipped'])} skipped, "
          f"{failures} errors; {time.monotonic() - started:.0f} s"
          + (f"; bundle {args.bundle}" if args.bundle else ""))
    return 1 if failures else 0
