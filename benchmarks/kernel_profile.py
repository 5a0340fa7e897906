"""Where the time of one optimizer step goes, kernel by kernel, with the bandwidth of each pass.

Usage (from the repository root, on CUDA)::

    python benchmarks/kernel_profile.py --out benchmarks/results/kernel_profile_h100.md

For the float32 Llama-1B shapes of ``step_bench.py`` it profiles a few steps of fused AdamW and
of Magma (tensor blocks at keep_prob 1.0 / 0.5 / 0.1, mask "none", row blocks) with
``torch.profiler`` and prints, per case and per kernel: milliseconds per step, bytes moved per
step and GB/s.  The bytes are exact, not expected: with tensor blocks the apply pass moves the
weights and moments of the tensors actually kept at the profiled steps, which this script draws
from the same Philox contract as the optimizer.  "gaps" is the step's CUDA-event time minus its
kernels' time (launch latency and idle device).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import step_bench as sb  # noqa: E402
from magma_ext.philox import keep_mask  # noqa: E402

CASES = [c for c in sb.FLOAT32_CASES if c.name != "Magma skip keep 0.5"]
KERNELS = ("one_pass_kernel", "moments_sums_kernel", "finalize_kernel", "apply_kernel", "block_kernel")


def kernel_kind(name: str) -> str:
    """A magma_ext kernel's short name (one of KERNELS), or "other" (torch's kernels)."""
    found = re.search(r"magma::(\w+_kernel)", name)
    return found.group(1) if found and found.group(1) in KERNELS else "other"


def two_pass(params) -> list[torch.Tensor]:
    """The tensors whose (tensor) block is too large for the single-pass kernel."""
    return [p for p in params if p.numel() > sb.SINGLE_PASS_MAX_BLOCK]


def kept_fraction(opt, params, steps: list[int], seed: int, keep_prob: float) -> float:
    """Fraction of the elements of ``params`` in kept tensors (tensor blocks), over ``steps``."""
    numels = torch.tensor([p.numel() for p in params], dtype=torch.float64)
    index = torch.tensor([opt.state[p]["magma_tensor_index"] for p in params])
    kept = [keep_mask(seed, index, torch.zeros_like(index), torch.full_like(index, t), keep_prob)
            for t in steps]
    return float(sum((numels * k.double()).sum() for k in kept) / (numels.sum() * len(steps)))


def pass_bytes(case: sb.Case, kind: str, shapes, kept: float) -> float | None:
    """Float32 bytes one step's kernels of ``kind`` move (None where not modelled).

    ``kept`` is the realised kept fraction of the two-pass tensors; the single-pass ones are
    counted at the expected keep_prob.
    """
    numel = sb.count_elements(shapes)
    mask = case.options.get("mask")
    if case.kind == "adamw":
        return numel * 28 if kind == "other" else None
    if mask == "none":
        return numel * 28 if kind == "one_pass_kernel" else None
    kinds = [sb.pass_kind(case, shape) for shape in shapes]
    one = sum(math.prod(s) for s, k in zip(shapes, kinds) if k == "1-pass")
    two = numel - one
    if kind == "moments_sums_kernel":
        return two * 20
    if kind == "apply_kernel":
        return two * kept * 16  # reads both moments and the weights, writes the weights
    if kind == "block_kernel":
        return one * (20 + 8 * case.options.get("keep_prob", 1.0))
    return None


def profile_case(case: sb.Case, params, steps: int, warmup: int) -> dict:
    """Per-kernel milliseconds per step, the step's CUDA-event median and the kept fraction."""
    opt, _ = sb.make_optimizer(case, params, torch.float32)
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        event_ms = [sb.time_call(opt.step, params[0].device) for _ in range(steps)]
    per_kind: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kind = kernel_kind(event.name)
            per_kind[kind] = per_kind.get(kind, 0.0) + event.device_time / 1e3 / steps
    kept = 1.0
    if case.kind == "magma" and case.options.get("mask") == "magma":
        done = warmup + 1  # step counts of the profiled steps: warmup + 1 .. warmup + steps
        kept = kept_fraction(opt, two_pass(params), list(range(done, done + steps)), 0,
                             case.options["keep_prob"])
    del opt
    sb.free_memory(params[0].device)
    return dict(kernels=per_kind, step_ms=float(np.median(event_ms)), kept=kept)


def table(results: dict, shapes, copy_gbs: float) -> list[str]:
    lines = ["| case | kernel | ms/step | GB/step | GB/s | % copy BW | kept fraction (2-pass) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        case = next(c for c in CASES if c.name == name)
        kernel_ms = 0.0
        for kind, ms in sorted(r["kernels"].items()):
            kernel_ms += ms
            nbytes = pass_bytes(case, kind, shapes, r["kept"])
            gb = f"{nbytes / 1e9:.2f}" if nbytes is not None else ""
            gbs = nbytes / 1e9 / (ms * 1e-3) if nbytes is not None and ms > 0 else None
            lines.append(f"| {name} | {kind} | {ms:.3f} | {gb} | {f'{gbs:.0f}' if gbs else ''} | "
                         f"{f'{100 * gbs / copy_gbs:.0f}%' if gbs else ''} | {r['kept']:.3f} |")
        lines.append(f"| {name} | gaps | {r['step_ms'] - kernel_ms:.3f} | | | | |")
        lines.append(f"| {name} | **step (events, median)** | **{r['step_ms']:.3f}** | | | | |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="profiled steps per case")
    parser.add_argument("--warmup", type=int, default=3, help="steps before profiling")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not sb.has_cuda_extension():
        print("kernel_profile.py needs CUDA and the magma_ext extension")
        return 1
    device = torch.device("cuda")
    shapes = sb.llama_shapes()
    numel = sb.count_elements(shapes)
    copy_gbs = sb.measure_copy_bandwidth(device, quick=False)
    params = sb.make_params(shapes, torch.float32, device)
    results = {case.name: profile_case(case, params, args.steps, args.warmup) for case in CASES}
    lines = [f"# Kernel profile of one optimizer step, Llama-1B float32 ({numel:,} parameters)", "",
             f"- device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}",
             f"- date: {sb.datetime.now(sb.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- measured device copy bandwidth: {copy_gbs:.0f} GB/s",
             f"- {args.steps} profiled steps per case after {args.warmup} warm-up steps; "
             "`python benchmarks/kernel_profile.py`",
             "- \"other\" is torch's kernels: the whole of fused AdamW; Magma's step-counter increments",
             ""] + table(results, shapes, copy_gbs)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
