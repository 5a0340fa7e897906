"""Time one source tree's optimizer step, for A/B comparisons of trees in separate processes.

    python benchmarks/step_ab.py --root .device/stepab/old --label old --out /tmp/raw/old_1.json

``magma_ext._C`` is one module per process, so each tree is timed in its own process:
``<root>/benchmarks/step_bench.py`` is imported, which puts ``<root>`` first on ``sys.path``,
so the tree's own ``magma_ext`` and its in-place built extension are the ones that run (the
script checks both paths).  The float32 Llama-1B shapes are built once; AdamW(fused=True) and
the Magma cases step the same parameters and gradients, taking turns step by step (the order
rotates every turn) so that a drift of the device's speed reaches every case alike.  Each turn
times every case twice:

  event ms   one step from an idle device, as step_bench.py times it: the host's time before
             the step's first kernel counts;
  device ms  one step queued behind a GPU sleep (torch.cuda._sleep) longer than the host needs
             to enqueue it, so that the events see only the kernels, back to back;
  host ms    that second step's host time, perf_counter around ``opt.step()`` (no sync).

Each Magma case replays the same sequence of masks in every tree (the seed and tensor indices
are the same).  The per-step times go to ``--out`` as JSON; step_ab_summary.py makes the table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

CASE_NAMES = ["AdamW fused (baseline)", "Magma keep 1.0", "Magma keep 0.5", "Magma mask none",
              "Magma row keep 0.5"]
SLEEP_MS = 6.0  # longer than any case's host time to enqueue a step (about 1 ms for AdamW)


def load_tree(root: Path):
    """step_bench and magma_ext of the tree at ``root``; raises if another copy was imported."""
    sys.path.insert(0, str(root / "benchmarks"))
    step_bench = importlib.import_module("step_bench")
    import magma_ext
    import magma_ext._C as compiled

    for module in (step_bench, magma_ext, compiled):
        path = Path(module.__file__).resolve()
        if root.resolve() not in path.parents:
            raise RuntimeError(f"{module.__name__} came from {path}, not from {root}")
    return step_bench


def sleep_cycles(ms: float) -> int:
    """GPU clock cycles that torch.cuda._sleep spins for about ``ms`` milliseconds."""
    probe = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(probe)  # the first call loads the kernel
    torch.cuda.synchronize()
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    end.synchronize()
    return int(probe * ms / start.elapsed_time(end))


def queued_step(step, cycles: int) -> tuple[float, float]:
    """(device ms, host ms) of one ``step()`` enqueued while the GPU sleeps ``cycles``."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)
    began = time.perf_counter()
    start.record()
    step()
    end.record()
    host_ms = (time.perf_counter() - began) * 1e3
    end.synchronize()
    return start.elapsed_time(end), host_ms


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="source tree with an in-place built extension")
    parser.add_argument("--label", required=True, help="the tree's name in the table")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the per-step times")
    parser.add_argument("--turns", type=int, default=40, help="timed turns (each times every case twice)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of every case first")
    args = parser.parse_args(argv)

    sb = load_tree(args.root)
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    cases = [next(c for c in sb.FLOAT32_CASES if c.name == name) for name in CASE_NAMES]
    params = sb.make_params(sb.llama_shapes(), torch.float32, device)
    optimizers = {}
    for case in cases:
        opt, impl = sb.make_optimizer(case, params, torch.float32)
        if impl != "fused":
            raise RuntimeError(f"{case.name}: runs {impl!r}, not the fused step")
        optimizers[case.name] = opt
    for _ in range(args.warmup):
        for opt in optimizers.values():
            opt.step()
    cycles = sleep_cycles(SLEEP_MS)
    times = {name: {"event_ms": [], "device_ms": [], "host_ms": []} for name in CASE_NAMES}
    for turn in range(args.turns):
        shift = turn % len(CASE_NAMES)
        for name in CASE_NAMES[shift:] + CASE_NAMES[:shift]:
            step = optimizers[name].step
            times[name]["event_ms"].append(sb.time_call(step, device))
            device_ms, host_ms = queued_step(step, cycles)
            times[name]["device_ms"].append(device_ms)
            times[name]["host_ms"].append(host_ms)
    record = {
        "label": args.label,
        "root": str(args.root),
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "sleep_ms": SLEEP_MS,
        "sleep_cycles": cycles,
        "turns": args.turns,
        "warmup": args.warmup,
        "times": times,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record))
    baseline = statistics.median(times[CASE_NAMES[0]]["event_ms"])
    for name in CASE_NAMES:
        event = statistics.median(times[name]["event_ms"])
        print(f"{args.label}: {name}: event median {event:.3f} ms, {event / baseline:.3f}x AdamW", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
