"""Time one optimizer step of Magma against torch.optim.AdamW(fused=True), in one run.

Magma runs with float32 state and with bfloat16 state (``exp_avg_dtype``/``exp_avg_sq_dtype``);
torchao's low-bit AdamW variants (``AdamW8bit``, ``AdamWFp8``, ``AdamW4bit``) are timed beside
them when torchao is installed (their rows say "skipped" otherwise).

Usage (from the repository root)::

    python benchmarks/step_bench.py                              # the full run, on CUDA
    python benchmarks/step_bench.py --out benchmarks/results/step_h100.md
    python benchmarks/step_bench.py --quick --device cpu         # a smoke test, tiny shapes

Each case builds its parameters with random gradients (filled once), creates its optimizer,
takes warm-up steps, then times ``opt.step()`` alone, one step at a time.  The table gives the
median, the minimum and the spread, the ratio to the baseline of the same shape set and dtype
measured in the same run, an achieved bandwidth from a stated bytes model against a measured
device copy bandwidth, the optimizer-state bytes and whether a step synchronises with the host.
Rows are printed (and written to ``--out``) as they are measured; a case that fails becomes a
row holding its error, so one failure never loses the table.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from magma_ext import Magma, has_cuda_extension  # noqa: E402
from magma_ext._ops import load_error  # noqa: E402
from magma_ext.layout import block_size_for  # noqa: E402

# Magma blocks of at most this many elements take the single-pass block kernel; larger ones
# take the two-pass (moments, then apply) kernels.  Mirrors kMaxSinglePassBlock in csrc/launch.h.
SINGLE_PASS_MAX_BLOCK = 8192
LR = 1e-3
WEIGHT_DECAY = 0.01
SYNC_CHECK_STEPS = 3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------- shape sets


def llama_shapes(vocab=32000, hidden=2048, layers=24, mlp=5632) -> list[tuple[int, ...]]:
    """Parameter shapes of a Llama model with an untied head (Llama-1B by default)."""
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4  # q, k, v, o
        shapes += [(mlp, hidden), (mlp, hidden), (hidden, mlp)]  # gate, up, down
        shapes += [(hidden,), (hidden,)]  # the two RMSNorm weights
    return shapes + [(hidden,), (vocab, hidden)]  # final norm, head


def many_small_shapes(count=5000, low=1_000, high=200_000, seed=0) -> list[tuple[int, ...]]:
    """``count`` 1-D tensors with log-uniform sizes in [low, high], from a fixed-seed RNG."""
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(math.log(low), math.log(high), size=count)).astype(np.int64)
    return [(int(n),) for n in sizes]


def shape_sets(quick: bool) -> dict[str, list[tuple[int, ...]]]:
    """The shape sets by name; ``quick`` shrinks them for a smoke test."""
    if quick:
        return {
            "llama1b": llama_shapes(vocab=512, hidden=64, layers=2, mlp=176),
            "many_small": many_small_shapes(count=50, low=100, high=2_000),
        }
    return {"llama1b": llama_shapes(), "many_small": many_small_shapes()}


def count_elements(shapes) -> int:
    """Total number of elements over ``shapes``."""
    return sum(math.prod(shape) for shape in shapes)


# ---------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One optimizer configuration: torch's AdamW ("adamw") or Magma with ``options``."""

    name: str
    kind: str
    options: dict = field(default_factory=dict)


BASELINE = Case("AdamW fused (baseline)", "adamw")
KEEP_HALF = Case("Magma keep 0.5", "magma", dict(mask="magma", keep_prob=0.5, block="tensor"))
MASK_NONE = Case("Magma mask none", "magma", dict(mask="none"))
FLOAT32_CASES = [
    BASELINE,
    Case("Magma keep 1.0", "magma", dict(mask="magma", keep_prob=1.0, block="tensor")),
    KEEP_HALF,
    Case("Magma keep 0.1", "magma", dict(mask="magma", keep_prob=0.1, block="tensor")),
    MASK_NONE,
    Case("Magma row keep 0.5", "magma", dict(mask="magma", keep_prob=0.5, block="row")),
    Case("Magma skip keep 0.5", "magma", dict(mask="skip", keep_prob=0.5, block="tensor")),
]
BF16_STATE = dict(exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16)
KEEP_HALF_BF16_STATE = Case("Magma keep 0.5, bf16 state", "magma",
                            dict(mask="magma", keep_prob=0.5, block="tensor", **BF16_STATE))
ROW_KEEP_HALF_BF16_STATE = Case("Magma row keep 0.5, bf16 state", "magma",
                                dict(mask="magma", keep_prob=0.5, block="row", **BF16_STATE))
BF16_STATE_CASES = [
    KEEP_HALF_BF16_STATE,
    ROW_KEEP_HALF_BF16_STATE,
    Case("Magma mask none, bf16 state", "magma", dict(mask="none", **BF16_STATE)),
]
# What a user short of optimizer memory would pick instead: torchao's low-bit AdamW, by class name.
TORCHAO_CASES = [Case(f"torchao {name}", "torchao", dict(optimizer=name))
                 for name in ("AdamW8bit", "AdamWFp8", "AdamW4bit")]
# Nominal bytes of one moment per element (their per-block scales left out).
TORCHAO_MOMENT_BYTES = {"AdamW8bit": 1.0, "AdamWFp8": 1.0, "AdamW4bit": 0.5}
SHORT_CASES = [BASELINE, KEEP_HALF, MASK_NONE]
# Issue 31's targets: step time as a fraction of fused AdamW's, Llama-1B float32 parameters.
TARGETS = {KEEP_HALF_BF16_STATE.name: 0.68, ROW_KEEP_HALF_BF16_STATE.name: 0.62}


def cases_for(shape_set: str, dtype: torch.dtype) -> list[Case]:
    """The cases timed for a shape set and dtype: all of them for llama1b in float32 (torchao's
    last: their first steps compile), bf16 state beside float32 state elsewhere."""
    if shape_set == "llama1b" and dtype == torch.float32:
        return FLOAT32_CASES + BF16_STATE_CASES + TORCHAO_CASES
    return SHORT_CASES + [KEEP_HALF_BF16_STATE]


def torchao_missing() -> str:
    """Why torchao's optimizers cannot run here ('' when they can)."""
    try:
        import torchao.optim  # noqa: F401
    except ImportError as exc:
        return f"torchao is not installed ({exc})"
    return ""


# ---------------------------------------------------------------------------- building


def make_params(shapes, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Parameters with random values and random gradients (never zeros), filled once."""
    params = []
    for shape in shapes:
        p = torch.randn(shape, dtype=dtype, device=device).requires_grad_()
        p.grad = torch.randn(shape, dtype=dtype, device=device)
        params.append(p)
    return params


def make_adamw(params) -> tuple[torch.optim.Optimizer, str]:
    """torch.optim.AdamW, fused where this torch supports it on the device, else foreach."""
    try:
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True), "fused"
    except RuntimeError:
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True), "foreach"


def make_optimizer(case: Case, params, dtype: torch.dtype) -> tuple[torch.optim.Optimizer, str]:
    """The case's optimizer and a word naming the implementation that runs."""
    if case.kind == "adamw":
        return make_adamw(params)
    if case.kind == "torchao":
        import torchao.optim

        optimizer_class = getattr(torchao.optim, case.options["optimizer"])
        return optimizer_class(params, lr=LR, weight_decay=WEIGHT_DECAY), "torchao"
    master = dtype != torch.float32
    opt = Magma(params, lr=LR, weight_decay=WEIGHT_DECAY, master_weights=master, **case.options)
    fused = has_cuda_extension() and params[0].is_cuda
    return opt, "fused" if fused else "reference"


# ---------------------------------------------------------------------------- the bytes model


def bytes_per_element(pass_kind: str, keep: float, param_bytes: int, grad_bytes: int,
                      state_bytes: float = 4, master: bool = False) -> float:
    """Expected memory traffic (bytes read + written) of one step per parameter element.

    Every kind reads the gradient and reads and writes both moments (``state_bytes`` each).  The weights (the float32
    master copy if any, read and written, plus the parameter written) move only in kept
    blocks: all of them for "dense", a fraction ``keep`` for "1-pass", and "2-pass" (Magma
    blocks too large for one thread block) also re-reads both moments in its apply pass.
    Float32: AdamW and mask "none" 28; Magma 2-pass 20 + 16p; 1-pass (row blocks, skip) 20 + 8p.
    Bfloat16 moments with float32 parameters: 2-pass 12 + 12p; 1-pass 12 + 8p.
    """
    moments = grad_bytes + 4 * state_bytes
    weights = 4 + 4 + param_bytes if master else 2 * param_bytes
    if pass_kind == "dense":
        return moments + weights
    if pass_kind == "1-pass":
        return moments + keep * weights
    return moments + keep * (2 * state_bytes + weights)


def pass_kind(case: Case, shape) -> str:
    """Which kernel path, in the bytes model's words, the case takes for a tensor of ``shape``."""
    mask = case.options.get("mask", "magma")
    if case.kind in ("adamw", "torchao") or mask == "none":
        return "dense"
    if mask == "skip":
        return "1-pass"
    block = case.options.get("block", "tensor")
    return "1-pass" if block_size_for(tuple(shape), block) <= SINGLE_PASS_MAX_BLOCK else "2-pass"


def moment_bytes(case: Case, dtype: torch.dtype) -> float:
    """Bytes of one moment per element (the mean of the two moments' sizes)."""
    if case.kind == "torchao":
        return TORCHAO_MOMENT_BYTES[case.options["optimizer"]]
    if case.kind == "adamw":  # torch's AdamW keeps its state in the parameters' dtype
        return torch.finfo(dtype).bits // 8
    return sum(torch.finfo(case.options.get(key, torch.float32)).bits // 8
               for key in ("exp_avg_dtype", "exp_avg_sq_dtype")) / 2


def step_bytes(case: Case, shapes, dtype: torch.dtype) -> tuple[float, str]:
    """Modelled bytes of one step over ``shapes`` and the pass kinds it used, e.g. "2-pass"."""
    size = torch.finfo(dtype).bits // 8
    state_bytes = moment_bytes(case, dtype)
    master = case.kind == "magma" and dtype != torch.float32
    keep = 1.0 if case.options.get("mask") == "none" else case.options.get("keep_prob", 1.0)
    total, kinds = 0.0, {}
    for shape in shapes:
        kind = pass_kind(case, shape)
        numel = math.prod(shape)
        total += numel * bytes_per_element(kind, keep, size, size, state_bytes, master)
        kinds[kind] = kinds.get(kind, 0) + numel
    return total, "+".join(sorted(kinds, key=kinds.get, reverse=True))


# ---------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device) -> float:
    """Milliseconds of one ``fn()`` started on an idle device: CUDA events, else perf_counter."""
    synchronize(device)
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    median_ms = float(np.median([time_call(lambda: dst.copy_(src), device) for _ in range(repeats)]))
    return 2 * nbytes / (median_ms * 1e-3) / 1e9


def measure_copy_bandwidth(device: torch.device, quick: bool) -> float:
    """``copy_bandwidth`` over 1 GiB on CUDA (64 MiB on the CPU or with --quick); NaN if it fails."""
    nbytes = 2**30 if device.type == "cuda" and not quick else 2**26
    try:
        return copy_bandwidth(device, nbytes)
    except Exception as exc:  # noqa: BLE001 - the table matters more than this reference number
        print(f"copy bandwidth not measured: {one_line(exc, 200)}", flush=True)
        return float("nan")
    finally:
        free_memory(device)


def steps_that_fit(requested: int, step_ms: float, seconds: float) -> int:
    """At most ``requested`` steps, fewer (but at least 3) when they would take over ``seconds``."""
    return max(3, min(requested, int(seconds * 1e3 / max(step_ms, 1e-3))))


def time_steps(opt, device, steps: int, warmup: int, max_seconds: float) -> list[float]:
    """Milliseconds of each timed ``opt.step()`` after ``warmup`` untimed ones (at least one)."""
    warm_ms = [time_call(opt.step, device) for _ in range(max(warmup, 1))]
    steps = steps_that_fit(steps, warm_ms[-1], max_seconds)
    return [time_call(opt.step, device) for _ in range(steps)]


def sync_check(opt, device: torch.device) -> str:
    """Run steps under torch.cuda.set_sync_debug_mode("error"): "none" or the error raised."""
    if device.type != "cuda":
        return "n/a (cpu)"
    synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(SYNC_CHECK_STEPS):
            opt.step()
    except Exception as exc:  # noqa: BLE001 - any error is the answer
        return f"SYNC: {one_line(exc, 60)}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    synchronize(device)
    return "none"


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: a tensor subclass that flattens into inner tensors (torchao's
    quantized optimizer states: codes and scales) holds its inner tensors' bytes, not its
    logical shape's."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def state_bytes(opt) -> dict[str, int]:
    """Bytes of every tensor in ``opt.state``, summed per state key over all parameters."""
    totals: dict[str, int] = {}
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                totals[key] = totals.get(key, 0) + tensor_bytes(value)
    return totals


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset, in GiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def free_memory(device: torch.device) -> None:
    """Return freed tensors' memory to the device and reset the peak counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------- one case


@dataclass
class Result:
    """What one case measured."""

    shape_set: str
    dtype: str
    case: str
    impl: str = ""
    times_ms: list[float] = field(default_factory=list)
    model_bytes: float = 0.0
    model_kinds: str = ""
    numel: int = 0
    state: dict = field(default_factory=dict)
    param_bytes: int = 0
    peak_gib: float | None = None
    syncs: str = ""
    error: str = ""

    @property
    def median_ms(self) -> float:
        return float(np.median(self.times_ms))


def run_case(case: Case, shape_set: str, shapes, dtype_name: str, device, args) -> Result:
    """Build, warm up and time one case; its tensors are freed when it returns."""
    dtype = DTYPES[dtype_name]
    result = Result(shape_set, dtype_name, case.name, numel=count_elements(shapes))
    result.param_bytes = result.numel * torch.finfo(dtype).bits // 8
    result.model_bytes, result.model_kinds = step_bytes(case, shapes, dtype)
    params = make_params(shapes, dtype, device)
    opt, result.impl = make_optimizer(case, params, dtype)
    result.times_ms = time_steps(opt, device, args.steps, args.warmup, args.max_case_s)
    result.state = state_bytes(opt)
    result.peak_gib = peak_gib(device)
    result.syncs = sync_check(opt, device)
    return result


def run_case_safely(case: Case, shape_set: str, shapes, dtype_name: str, device, args) -> Result:
    """``run_case``, with any exception turned into a row holding the error."""
    try:
        result = run_case(case, shape_set, shapes, dtype_name, device, args)
    except Exception as exc:  # noqa: BLE001 - a failed case must not lose the table
        result = Result(shape_set, dtype_name, case.name, error=one_line(exc, 160))
    # Freed only here, after the except clause has dropped the traceback that holds the tensors.
    free_memory(device)
    return result


# ---------------------------------------------------------------------------- the table


COLUMNS = [
    "shapes", "dtype", "case", "impl", "n", "median ms", "min ms", "p90/p10", "vs baseline",
    "model B/param", "GB/s", "% copy BW", "state B/param", "extra state % of param B",
    "peak GiB", "syncs",
]


def one_line(exc: BaseException, limit: int) -> str:
    """An exception as one table-safe line of at most ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def extra_state(result: Result) -> str:
    """State beyond exp_avg and exp_avg_sq as % of parameter bytes (also without the master copy)."""
    extra = sum(v for k, v in result.state.items() if k not in ("exp_avg", "exp_avg_sq"))
    text = f"{100 * extra / result.param_bytes:.3f}%"
    if "master_param" in result.state:
        text += f" ({100 * (extra - result.state['master_param']) / result.param_bytes:.3f}% w/o master)"
    return text


def format_row(result: Result, baseline_ms: float | None, copy_gbs: float) -> str:
    """One markdown row; a failed case keeps its name and shows its error."""
    head = [result.shape_set, result.dtype, result.case]
    if result.error:
        text = result.error if result.error.startswith("skipped") else "ERROR: " + result.error
        return "| " + " | ".join(head + [text] + [""] * (len(COLUMNS) - 4)) + " |"
    times = np.asarray(result.times_ms)
    median, p10, p90 = np.median(times), np.percentile(times, 10), np.percentile(times, 90)
    gbs = result.model_bytes / (median * 1e-3) / 1e9
    cells = head + [
        result.impl,
        str(len(times)),
        f"{median:.3f}",
        f"{times.min():.3f}",
        f"{p90 / p10:.3f}",
        f"{median / baseline_ms:.3f}" if baseline_ms else "-",
        f"{result.model_bytes / result.numel:.1f} ({result.model_kinds})",
        f"{gbs:.0f}" if gbs >= 100 else f"{gbs:.2f}",
        f"{100 * gbs / copy_gbs:.0f}%",
        f"{sum(result.state.values()) / result.numel:.3f}",
        extra_state(result),
        "-" if result.peak_gib is None else f"{result.peak_gib:.1f}",
        result.syncs,
    ]
    return "| " + " | ".join(cells) + " |"


class Report:
    """Prints lines as they come and, with a path, writes them to that file at once too."""

    def __init__(self, path: str | None):
        self._file = open(path, "w", encoding="utf-8") if path else None  # noqa: SIM115

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        if self._file:
            self._file.write(text + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


def header_lines(device: torch.device, copy_gbs: float, sets: dict, args) -> list[str]:
    """Where and when the run happened, the copy bandwidth and the sizes of the shape sets."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    extension = "loaded" if has_cuda_extension() else f"not loaded ({load_error()})"
    lines = [
        "# magma_ext optimizer step benchmark",
        "",
        f"- device: {name} ({device})",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- magma_ext CUDA extension: {extension}",
        f"- measured device copy bandwidth: {copy_gbs:.0f} GB/s (read + write bytes)",
        f"- steps: {args.steps} timed after {args.warmup} warm-up; lr {LR}, weight_decay {WEIGHT_DECAY}",
    ]
    for set_name in args.shapes:
        shapes = sets[set_name]
        lines.append(f"- {set_name}: {count_elements(shapes):,} parameters in {len(shapes):,} tensors")
    return lines + [""]


FOOTNOTES = [
    "",
    "Notes:",
    "1. Timing: each `opt.step()` starts on an idle device (synchronised before its start event) "
    "and is timed alone with CUDA events (perf_counter on the CPU); zero_grad and backward are "
    "not run. Gradients are random (torch.randn), filled once. n = timed steps (fewer than asked "
    "when a case would exceed --max-case-s). p90/p10 is the spread.",
    "2. vs baseline = median / median of AdamW fused for the same shape set and dtype, same run.",
    "3. model B/param = bytes read + written per parameter per step (`bytes_per_element`): "
    "float32 AdamW and mask none 28; Magma 2-pass (blocks > 8192 elements) 20 + 16p; "
    "1-pass (row blocks up to 8192 elements, mask skip) 20 + 8p, p = keep_prob, the *expected* "
    "kept fraction. With block=tensor only a few large tensors are drawn per step, so the bytes "
    "actually moved vary from step to step (see p90/p10). GB/s = model bytes / median time; "
    "% copy BW is against the measured device-to-device copy.",
    "4. bfloat16: Magma runs with master_weights=True (float32 master copy, bf16 parameter written "
    "back; float32 moments unless the row says bf16 state). torch's AdamW keeps its exp_avg/exp_avg_sq in bfloat16 for "
    "bfloat16 parameters (14 B/param modelled vs 28 for Magma mask none), so the bf16 baseline "
    "does less work and keeps less precise state: its ratio is not like for like.",
    "4b. bf16 state: Magma with exp_avg_dtype = exp_avg_sq_dtype = torch.bfloat16 (stochastic "
    "rounding, docs/ALGORITHM.md section 6); modelled float32-parameter bytes 12 + 12p (2-pass), "
    "12 + 8p (1-pass), 20 (mask none). torchao rows: its AdamW8bit / AdamWFp8 / AdamW4bit with "
    "their defaults, modelled as dense AdamW with 1, 1 and 0.5 bytes per moment (block scales left "
    "out); their first steps (warm-up) compile.",
    "5. state B/param = all tensors in optimizer.state / parameters. Extra state = everything "
    "beyond exp_avg and exp_avg_sq (step counters, magma_score, master_param) as % of "
    "parameter bytes.",
    f"6. syncs: {SYNC_CHECK_STEPS} more steps under torch.cuda.set_sync_debug_mode('error'): "
    "'none' means no host-device synchronisation.",
]


def target_lines(targets) -> list[str]:
    """Each targeted case's ratio to fused AdamW against its target (llama1b, float32)."""
    lines = ["", "Targets (llama1b, float32 parameters, step time / fused AdamW's):"] if targets else []
    for name, result, baseline_ms in targets:
        if result.error or not baseline_ms:
            lines.append(f"- {name}: not measured ({result.error or 'no baseline'})")
            continue
        ratio = result.median_ms / baseline_ms
        verdict = "met" if ratio <= TARGETS[name] else "MISSED"
        lines.append(f"- {name}: {ratio:.3f}x (target <= {TARGETS[name]}x: {verdict}); "
                     f"state {sum(result.state.values()) / result.numel:.3f} B/param, peak {result.peak_gib:.1f} GiB"
                     if result.peak_gib is not None else
                     f"- {name}: {ratio:.3f}x (target <= {TARGETS[name]}x: {verdict})")
    return lines


# ---------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; defaults depend on --quick."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="llama1b,many_small", help="comma-separated: llama1b, many_small")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (30; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per case (5; 1 with --quick)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--out", default=None, help="also write the report to this markdown file")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few steps: a smoke test")
    parser.add_argument("--budget-s", type=float, default=180.0,
                        help="cases not started within this many seconds are skipped")
    parser.add_argument("--max-case-s", type=float, default=15.0,
                        help="fewer timed steps when a case's steps would take longer than this")
    args = parser.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    for name in args.shapes:
        if name not in ("llama1b", "many_small"):
            parser.error(f"unknown shape set {name!r}")
    for name in args.dtypes:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}")
    args.steps = args.steps or (3 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(argv=None) -> int:
    """Run every (shape set, dtype, case) and print the table row by row."""
    args = parse_args(argv)
    started = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    sets = shape_sets(args.quick)
    report = Report(args.out)
    try:
        copy_gbs = measure_copy_bandwidth(device, quick=args.quick)
        for text in header_lines(device, copy_gbs, sets, args):
            report.line(text)
        report.line("| " + " | ".join(COLUMNS) + " |")
        report.line("|" + "---|" * len(COLUMNS))
        targets = []
        for set_name in args.shapes:
            for dtype_name in args.dtypes:
                baseline_ms = None
                for case in cases_for(set_name, DTYPES[dtype_name]):
                    if time.monotonic() - started > args.budget_s:
                        result = Result(set_name, dtype_name, case.name, error="skipped: --budget-s spent")
                    elif case.kind == "torchao" and torchao_missing():
                        result = Result(set_name, dtype_name, case.name, error=f"skipped: {torchao_missing()}")
                    else:
                        result = run_case_safely(case, set_name, sets[set_name], dtype_name, device, args)
                    if case is BASELINE and not result.error:
                        baseline_ms = result.median_ms
                    if case.name in TARGETS and set_name == "llama1b" and dtype_name == "float32":
                        targets.append((case.name, result, baseline_ms))
                    report.line(format_row(result, baseline_ms, copy_gbs))
        for text in target_lines(targets):
            report.line(text)
        for text in FOOTNOTES:
            report.line(text)
        report.line(f"\nTotal wall time: {time.monotonic() - started:.0f} s")
    finally:
        report.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
