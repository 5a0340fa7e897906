"""The command line of the convergence study (``benchmarks/convergence.py``,
``benchmarks/plot_convergence.py`` and ``python -m benchmarks.study`` all land here).

Usage (from the repository root)::

    python benchmarks/convergence.py --plan --num-shards 3            # the run list, estimated times
    python benchmarks/convergence.py --shard 1 --num-shards 3 --out '' --bundle shard1.json --time-budget-s 500
    python benchmarks/convergence.py --mode throughput --out '' --bundle throughput.json
    python benchmarks/convergence.py report --inputs shard1.json shard2.json shard3.json throughput.json
    python benchmarks/convergence.py --sizes 10M --resume shard1.json --bundle more.json   # the rest
    python benchmarks/convergence.py --quick --out /tmp/conv_smoke    # a CPU smoke test
    python benchmarks/plot_convergence.py --inputs benchmarks/results/convergence/   # = convergence.py report

The whole study (78 runs, ~19 min of H100 time by the estimates) fits three calls of under
nine minutes: ``--num-shards 3``, each shard with ``--time-budget-s``, the throughput mode
beside the shortest shard. Shards must be run with the same flags apart from ``--shard``.
``--resume`` takes earlier bundles and leaves out the runs they finished, so a study cut short
by a device limit goes on where it stopped. Each run becomes one JSON record (curves, final
validation perplexity, wall time, peak memory; :mod:`.records`); ``report`` turns the records
into plots and a page. ``--mode throughput`` times whole training steps and the optimizer step
alone for every optimizer in one process. What the study runs is :mod:`.definition`.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before torch is imported, which --time-budget-s must count

import argparse  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

from . import report  # noqa: E402
from .definition import (DEFAULT_MAX_BYTES, OPTIMIZERS, QUICK_LRS, QUICK_OPTIMIZERS, QUICK_SIZE,  # noqa: E402
                         SIZES, THROUGHPUT_DEFAULTS, summary_line)
from .plan import assign_shards, make_cells, plan_lines  # noqa: E402
from .records import load_finished  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "convergence"
DEFAULT_PAGE = REPO / "benchmarks" / "results" / "convergence.md"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="convergence.py", description=summary_line(),
        epilog="`python benchmarks/convergence.py report --help` describes the report subcommand.")
    p.add_argument("--mode", choices=("sweep", "throughput"), default="sweep")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: a tiny model, {QUICK_SIZE.steps} steps, {', '.join(QUICK_OPTIMIZERS)} "
                        f"x {QUICK_LRS} learning rates, float32")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated model sizes: " + ", ".join(SIZES))
    p.add_argument("--optimizers", default=None,
                   help="comma-separated, default all: " + ", ".join(OPTIMIZERS))
    p.add_argument("--shard", type=int, default=1, help="which shard to run, 1-based")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--plan", action="store_true", help="print the run list and time estimates, run nothing")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="skip runs that would end after this many seconds since the process started")
    p.add_argument("--steps", type=int, default=None, help="override every size's steps (experiments)")
    p.add_argument("--data", default=None, help="text file or folder to train on instead of the Python stdlib")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="corpus size cap")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="autocast dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="folder for one JSON per run; '' writes none (use --bundle)")
    p.add_argument("--bundle", default=None, help="also write every record of this invocation into this one file")
    p.add_argument("--resume", default="",
                   help="comma-separated bundles of earlier invocations: their finished runs are not run "
                        "again (and count for best-lr runs)")
    g = p.add_argument_group("--mode throughput")
    g.add_argument("--size", default="50M", choices=tuple(SIZES), help="model size to time")
    g.add_argument("--warmup-steps", type=int, default=THROUGHPUT_DEFAULTS["warmup_steps"])
    g.add_argument("--timed-steps", type=int, default=THROUGHPUT_DEFAULTS["timed_steps"])
    g.add_argument("--repeats", type=int, default=THROUGHPUT_DEFAULTS["repeats"],
                   help="rounds over all optimizers (median window reported)")
    args = p.parse_args(argv)
    if not 1 <= args.shard <= args.num_shards:
        p.error(f"--shard must be in 1..{args.num_shards}, got {args.shard}")
    names = QUICK_OPTIMIZERS if args.quick and args.optimizers is None else (
        args.optimizers.split(",") if args.optimizers else tuple(OPTIMIZERS))
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        p.error(f"unknown optimizer(s) {unknown}; choose from {', '.join(OPTIMIZERS)}")
    args.optimizer_names = list(names)
    sizes = args.sizes.split(",")
    if not set(sizes) <= set(SIZES):
        p.error(f"unknown size(s) {sorted(set(sizes) - set(SIZES))}; choose from {', '.join(SIZES)}")
    args.size_names = sizes
    args.out = Path(args.out) if args.out else None
    args.bundle = Path(args.bundle) if args.bundle else None
    args.resume = [Path(p) for p in args.resume.split(",") if p]
    missing = [str(p) for p in args.resume if not p.is_file()]
    if missing:
        p.error(f"--resume: no such file(s) {missing}")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def report_main(argv: list[str] | None = None) -> int:
    """``convergence.py report`` and ``plot_convergence.py``."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="convergence.py report", description=report.__doc__.split("\n\n")[0])
    p.add_argument("--inputs", nargs="+", required=True, help="JSON records, bundles or folders of them")
    p.add_argument("--page", default=str(DEFAULT_PAGE), help="the Markdown page to write")
    p.add_argument("--plots-dir", default=None, help="where the PNGs go (default: beside the page, "
                                                     "in a folder named after it)")
    args = p.parse_args(argv)
    page = Path(args.page)
    plots_dir = Path(args.plots_dir) if args.plots_dir else page.with_suffix("")
    study = report.write_report(args.inputs, page, plots_dir, argv)
    print(f"{len(study.runs)} runs, {len(study.throughput)} throughput rows -> {page} (plots in {plots_dir})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``convergence.py``: a sweep, ``--plan``, ``--mode throughput``, or ``report ...``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    args = parse_args(argv)
    import torch  # not before the arguments are checked; the report needs none

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    sizes = [QUICK_SIZE] if args.quick else [SIZES[name] for name in args.size_names]
    if args.steps is not None:
        sizes = [replace(s, steps=args.steps) for s in sizes]
    specs = [OPTIMIZERS[name] for name in args.optimizer_names]
    if args.plan:
        shards = assign_shards(make_cells(sizes, specs, args.quick), args.num_shards)
        print("\n".join(plan_lines(shards, {s.name: s for s in sizes}, load_finished(args.resume))))
        return 0
    if args.mode == "throughput":
        from .throughput import run_throughput
        return run_throughput(args, QUICK_SIZE if args.quick else SIZES[args.size], specs, device)
    from .sweep import run_sweep
    return run_sweep(args, sizes, specs, device, STARTED)
