"""``--mode throughput``: whole training steps and the optimizer step alone, timed for every
optimizer in one process, the model compiled on CUDA as the study's runs are (the warm-up steps
absorb the compilation). The data are a few fixed batches of random bytes: their content does not
change the time of a step."""

from __future__ import annotations

import gc
import statistics
import time
from contextlib import nullcontext

import torch

from magma_ext.demo import Llama

from .definition import Edition, Recipe, Size
from .environment import command_line, environment
from .optimizers import build, runs_magma_fused
from .records import BundleWriter, now_utc

WARMUP_STEPS = 10
TIMED_STEPS = 30


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (inner optimizers' too)."""
    total = 0
    for opt in getattr(optimizer, "optimizers", (optimizer,)):
        for state in opt.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def time_window(size: Size, spec: Recipe, device: torch.device, dtype: str, warmup: int, timed: int,
                compile_mode: str = "none", weight_decay: float = 0.1) -> dict:
    """One fresh model and optimizer: ``warmup`` steps, then ``timed`` whole training steps
    (forward, backward, clipping, optimizer) timed together and each optimizer step alone
    (CUDA events on a GPU); the peak memory counts from before the model was built."""
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = Llama(size.model_config()).to(device)
    optimizer = build(spec, model, spec.lrs[len(spec.lrs) // 2], 0, device, weight_decay)
    if compile_mode != "none":
        torch._dynamo.reset()  # a fresh model per window: keep recompilations under dynamo's limit
    net = model if compile_mode == "none" else torch.compile(
        model, mode=None if compile_mode == "default" else compile_mode)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    # A few fixed batches already on the device: the step is timed, not the data pipeline.
    windows = torch.randint(0, 256, (4, size.batch_size, size.seq_len + 1),
                            generator=torch.Generator().manual_seed(0)).to(device)
    fixed = [(w[:, :-1], w[:, 1:]) for w in windows]
    opt_ms, events = [], []

    def step(i: int, timing: bool) -> None:
        inputs, targets = fixed[i % len(fixed)]
        with autocast:
            loss = net(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if timing and cuda:
            pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            pair[0].record()
            optimizer.step()
            pair[1].record()
            events.append(pair)
        elif timing:
            t0 = time.perf_counter()
            optimizer.step()
            opt_ms.append((time.perf_counter() - t0) * 1000)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for i in range(warmup):
        step(i, timing=False)
    sync()
    t0 = time.perf_counter()
    for i in range(timed):
        step(i, timing=True)
    sync()
    window = time.perf_counter() - t0
    opt_ms += [a.elapsed_time(b) for a, b in events]
    result = {"window_s": window, "opt_ms": opt_ms, "state_bytes": state_bytes(optimizer),
              "num_parameters": model.num_parameters(),
              "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if cuda else None}
    del model, net, optimizer, fixed
    return result


def run_throughput(args, edition: Edition, size: Size, specs: list[Recipe], device: torch.device) -> int:
    """Every optimizer's windows in turn, round after round, so that drifts of the machine
    (clocks, other load) spread over all optimizers instead of favouring one."""
    meta = {"command": command_line(), "date": now_utc(), "mode": "throughput", "quick": args.quick,
            "env": environment(device), "data": {"source": "random bytes"}, "edition": edition.number,
            "compile": args.compile}
    writer = BundleWriter(args.bundle, meta)
    print(f"throughput: {size.name} model, batch {size.batch_size} x {size.seq_len}, {args.dtype}, "
          f"compile {args.compile}, {args.repeats} rounds of {WARMUP_STEPS} warm-up + {TIMED_STEPS} timed steps "
          f"per optimizer, on {meta['env']['device_name']}", flush=True)
    windows: dict[str, list[dict]] = {spec.name: [] for spec in specs}
    errors: dict[str, str] = {}
    for _ in range(args.repeats):
        for spec in specs:
            if spec.name in errors:
                continue
            try:
                windows[spec.name].append(time_window(size, spec, device, args.dtype, WARMUP_STEPS,
                                                      TIMED_STEPS, args.compile, edition.weight_decay))
            except Exception as exc:  # noqa: BLE001 -- keep the other rows
                errors[spec.name] = f"{type(exc).__name__}: {exc}"
                print(f"{spec.name}: ERROR {errors[spec.name]}", flush=True)
    tokens = TIMED_STEPS * size.batch_size * size.seq_len
    for spec in specs:
        if spec.name in errors:
            continue
        runs = windows[spec.name]
        window = statistics.median(r["window_s"] for r in runs)
        opt_ms = [ms for r in runs for ms in r["opt_ms"]]
        peaks = [r["peak_mem_bytes"] for r in runs if r["peak_mem_bytes"] is not None]
        record = {"kind": "throughput", "size": size.name, "optimizer": spec.name, "description": spec.description,
                  "magma_fused": runs_magma_fused(spec, device), "dtype": args.dtype,
                  "batch_size": size.batch_size, "seq_len": size.seq_len, "num_parameters": runs[0]["num_parameters"],
                  "warmup_steps": WARMUP_STEPS, "timed_steps": TIMED_STEPS, "repeats": len(runs),
                  "tokens_per_s": tokens / window, "step_ms": 1000 * window / TIMED_STEPS,
                  "step_ms_windows": [1000 * r["window_s"] / TIMED_STEPS for r in runs],
                  "opt_step_ms_median": statistics.median(opt_ms), "opt_step_ms_min": min(opt_ms),
                  "opt_step_timer": "cuda events" if device.type == "cuda" else "perf_counter",
                  "state_bytes": runs[0]["state_bytes"], "peak_mem_bytes": max(peaks) if peaks else None,
                  "command": meta["command"], "date": now_utc(), "measurement": meta["date"], "env": meta["env"],
                  "edition": edition.number, "compile": args.compile}
        writer.add("throughput", record)
        memory = f"  peak {record['peak_mem_bytes'] / 2**20:,.0f} MiB" if record["peak_mem_bytes"] else ""
        print(f"{spec.name:<14} {record['tokens_per_s']:>12,.0f} tok/s  step {record['step_ms']:.2f} ms  "
              f"optimizer {record['opt_step_ms_median']:.3f} ms  state {record['state_bytes'] / 2**20:,.1f} MiB"
              f"{memory}", flush=True)
    return 1 if errors else 0
