"""Host (CPU) time of one optimizer step, split by where it goes: a diagnostic.

    python benchmarks/host_overhead.py

Times ``opt.step()`` without waiting for the device (the kernels run asynchronously, so this is
the host's cost), and inside Magma's step the native op call and the step-counter increment.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import step_bench as sb  # noqa: E402
import magma_ext.fused as fused  # noqa: E402

ROW_HALF = next(c for c in sb.FLOAT32_CASES if c.name == "Magma row keep 0.5")


REPEATS = 20


def host_ms(fn, repeats=REPEATS) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return float(np.median(times))


class Timed:
    """Wraps a function and adds up the host time spent in it."""

    def __init__(self, fn):
        self.fn, self.total = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - start


def main() -> int:
    device = torch.device("cuda")
    for name, shapes in (("llama1b", sb.llama_shapes()), ("many_small", sb.many_small_shapes())):
        params = sb.make_params(shapes, torch.float32, device)
        n = len(params)
        adamw, _ = sb.make_adamw(params)
        adamw.step()
        print(f"{name}: {n} tensors; AdamW(fused) step host {host_ms(adamw.step):.2f} ms")
        del adamw
        sb.free_memory(device)
        for case in (sb.KEEP_HALF, sb.MASK_NONE, ROW_HALF):
            opt, _ = sb.make_optimizer(case, params, torch.float32)
            opt.step()
            op, add = Timed(torch.ops.magma_ext.fused_step), Timed(torch._foreach_add_)
            total = host_ms(opt.step)
            saved = fused.torch
            shim = type(sys)("torch_shim")
            shim.__dict__.update(torch.__dict__)
            shim.ops = type("ops", (), {"magma_ext": type("m", (), {"fused_step": op})})
            shim._foreach_add_ = add
            fused.torch = shim
            try:
                host_ms(opt.step)
            finally:
                fused.torch = saved
            calls = REPEATS
            print(f"  {case.name}: step host {total:.2f} ms = op {op.total / calls * 1e3:.2f} ms"
                  f" + step counters {add.total / calls * 1e3:.2f} ms + rest (Python)"
                  f" {total - (op.total + add.total) / calls * 1e3:.2f} ms"
                  f"  ({total * 1e3 / n:.2f} us per tensor)")
            del opt
            sb.free_memory(device)
        del params
        sb.free_memory(device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
