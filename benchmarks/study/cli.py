"""The command line of the convergence study (``benchmarks/convergence.py``,
``benchmarks/plot_convergence.py`` and ``python -m benchmarks.study`` all land here).

Usage (from the repository root); ``--edition 2``, the paper's protocol scaled down (issue 13),
is the default for new runs, ``--edition 1`` the first study (issue 9)::

    python benchmarks/convergence.py --plan                          # every run, its tokens, GPU minutes
    python benchmarks/convergence.py corpus                          # build the corpus here, print its size
    python benchmarks/convergence.py --tiers 1 --parallel 3 --time-budget-s 540 --out '' --bundle t1a.json
    python benchmarks/convergence.py --tiers 1 --parallel 3 --time-budget-s 540 --resume t1a.json \\
        --out '' --bundle t1b.json                                  # the next device call goes on
    python benchmarks/convergence.py --tiers 3 --resume t1a.json,t1b.json ...   # tier 3 takes tier 1's S-best lr
    python benchmarks/convergence.py --mode throughput --size S --optimizers AdamW,Magma-Adam --out '' --bundle tp.json
    python benchmarks/convergence.py report --inputs benchmarks/results/convergence2/ \\
        --page benchmarks/results/convergence2.md
    python benchmarks/convergence.py --quick --device cpu --out /tmp/conv_smoke    # a CPU smoke test
    python benchmarks/plot_convergence.py --inputs benchmarks/results/convergence/  # = convergence.py report

Edition 2 runs its tiers in order; ``--parallel N`` trains N runs side by side on every GPU of
``--gpus`` (separate processes, one per run). A device call runs at most 10 minutes: give
``--time-budget-s`` and the runs stop there, saving checkpoints that the next invocation on the
same machine (same ``--checkpoint-dir``) goes on from; ``--resume`` takes the bundles of
earlier invocations and leaves out the runs they finished (a diverged run counts as finished),
and a best-lr or transfer run takes its learning rate from the finished sweep in those bundles.
Each run becomes one JSON record (:mod:`.records`); ``report`` turns the records of one edition
into plots and a page that also lists the planned runs still missing. What the study runs is
:mod:`.definition`.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before torch is imported, which --time-budget-s must count

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from . import corpus as corpus_lib  # noqa: E402
from . import report  # noqa: E402
from .definition import DEFAULT_EDITION, EDITIONS, THROUGHPUT_DEFAULTS, edition as edition_by_number  # noqa: E402
from .definition import LARGER_CORPUS_FLAGS, summary_line  # noqa: E402
from .plan import assign_shards, make_cells, plan_lines, split_stale  # noqa: E402
from .records import edition_of, load_finished, load_study, on_corpora, study_corpora  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


def _list(text: str | None) -> list[str] | None:
    return [part for part in text.split(",") if part] if text else None


def _suffixes(p: argparse.ArgumentParser, text: str | None) -> tuple[str, ...]:
    try:
        return corpus_lib.checked_suffixes(_list(text) or corpus_lib.SUFFIXES)
    except ValueError as exc:
        p.error(str(exc))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="convergence.py", description=summary_line(),
        epilog="Subcommands: `report --help` (the page), `corpus --help` (build edition 2's corpus here).")
    p.add_argument("--edition", type=int, choices=sorted(EDITIONS), default=DEFAULT_EDITION,
                   help=f"which study definition (default {DEFAULT_EDITION}; 1 is the first study)")
    p.add_argument("--mode", choices=("sweep", "throughput"), default="sweep")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: the edition's tiers at tiny sizes, the middle learning rates, float32")
    p.add_argument("--tiers", default=None, help="comma-separated tier numbers, default all (edition 2: 1,2,3)")
    p.add_argument("--sizes", default=None, help="comma-separated model sizes, default all of the edition")
    p.add_argument("--optimizers", default=None, help="comma-separated, default all of the edition")
    p.add_argument("--lrs", default=None,
                   help="comma-separated learning rates: only the sweep runs at these (no best-lr or transfer runs)")
    p.add_argument("--shard", type=int, default=1, help="which shard to run, 1-based")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--plan", action="store_true", help="print the run list and time estimates, run nothing")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="seconds since the process started after which no run goes on (edition 2: runs "
                        "stop there with a checkpoint)")
    p.add_argument("--finish-only", action="store_true",
                   help="edition 2: start only runs that the budget lets finish (by the estimates; a run "
                        "with a checkpoint by the steps it has left)")
    p.add_argument("--steps", type=int, default=None, help="override every size's steps (experiments)")
    p.add_argument("--data", default=None, help="text file or folder to train on instead of the default corpus")
    p.add_argument("--corpus-add", default=None,
                   help="edition 2: comma-separated folders whose *.py, *.h, *.rst, *.txt files join the "
                        "default corpus (where the Python tree alone is too small)")
    p.add_argument("--corpus-suffixes", default=None,
                   help="edition 2: comma-separated file name endings of the default corpus "
                        f"(default {','.join(corpus_lib.SUFFIXES)})")
    p.add_argument("--max-bytes", type=int, default=None, help="corpus size cap (edition 1: 48 MiB unless told)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="autocast dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", choices=COMPILE_MODES, default=None,
                   help="torch.compile mode of the model (edition 2; default 'default' on CUDA, 'none' on CPU)")
    p.add_argument("--parallel", type=int, default=1,
                   help="edition 2: runs side by side per GPU (or on the CPU), each its own process")
    p.add_argument("--gpus", type=int, default=None,
                   help="edition 2: how many GPUs to use (default every visible one); for --plan, the "
                        "machine the estimates are for (default 2)")
    p.add_argument("--switch-corpus", action="store_true",
                   help="edition 2: train a size here even though its --resume runs trained on another corpus "
                        "(another machine image); those runs then count for nothing and are run again")
    p.add_argument("--checkpoint-dir", default=None,
                   help="edition 2: where runs keep checkpoints ('' for none; default under the temporary folder)")
    p.add_argument("--cache-dir", default=None, help="edition 2: where the corpus is built (default likewise)")
    p.add_argument("--out", default=None,
                   help="folder for one JSON per run (default benchmarks/results/<the edition's folder>); "
                        "'' writes none (use --bundle)")
    p.add_argument("--bundle", default=None, help="also write every record of this invocation into this one file")
    p.add_argument("--resume", default="",
                   help="comma-separated bundles of earlier invocations: their finished runs are not run "
                        "again (and count for best-lr and transfer runs)")
    g = p.add_argument_group("--mode throughput")
    g.add_argument("--size", default=None, help="model size to time (default: the edition's largest)")
    g.add_argument("--warmup-steps", type=int, default=THROUGHPUT_DEFAULTS["warmup_steps"])
    g.add_argument("--timed-steps", type=int, default=THROUGHPUT_DEFAULTS["timed_steps"])
    g.add_argument("--repeats", type=int, default=THROUGHPUT_DEFAULTS["repeats"],
                   help="rounds over all optimizers (median window reported)")
    args = p.parse_args(argv)

    edition = edition_by_number(args.edition)
    if not 1 <= args.shard <= args.num_shards:
        p.error(f"--shard must be in 1..{args.num_shards}, got {args.shard}")
    names = list(edition.quick_optimizers) if args.quick and args.optimizers is None else (
        _list(args.optimizers) or list(edition.optimizers))
    unknown = [n for n in names if n not in edition.optimizers]
    if unknown:
        p.error(f"unknown optimizer(s) {unknown} in edition {edition.number}; "
                f"choose from {', '.join(edition.optimizers)}")
    args.optimizer_names = names
    args.size_names = _list(args.sizes)
    if args.size_names and not set(args.size_names) <= set(edition.sizes):
        p.error(f"unknown size(s) {sorted(set(args.size_names) - set(edition.sizes))}; choose from "
                f"{', '.join(edition.sizes)}")
    try:
        args.tier_numbers = [int(t) for t in _list(args.tiers)] if args.tiers else None
    except ValueError:
        p.error(f"--tiers takes comma-separated numbers, got {args.tiers!r}")
    try:
        args.lr_values = [float(x) for x in _list(args.lrs)] if args.lrs else None
    except ValueError:
        p.error(f"--lrs takes comma-separated numbers, got {args.lrs!r}")
    tiers = {t.number for t in edition.tiers}
    if args.tier_numbers and not set(args.tier_numbers) <= tiers:
        p.error(f"edition {edition.number} has tiers {sorted(tiers)}, not {sorted(set(args.tier_numbers) - tiers)}")
    if args.size is None:
        args.size = list(edition.sizes)[-1]
    if args.size not in edition.sizes:
        p.error(f"--size {args.size}: choose from {', '.join(edition.sizes)}")
    if args.parallel < 1:
        p.error("--parallel must be at least 1")
    if edition.harness == "demo" and (args.parallel > 1 or args.compile not in (None, "none")):
        p.error("--parallel and --compile need edition 2 (edition 1 trains with the demo's loop)")
    args.corpus_add = _list(args.corpus_add) or []
    if args.corpus_add and args.data:
        p.error("--corpus-add adds to the default corpus; with --data, put everything under one folder")
    args.corpus_suffixes = _suffixes(p, args.corpus_suffixes)
    if args.corpus_suffixes != corpus_lib.SUFFIXES and args.data:
        p.error("--corpus-suffixes chooses the default corpus's files; --data takes every file of its folder")
    args.out = Path(args.out) if args.out else (RESULTS / edition.results if args.out is None else None)
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
    p.add_argument("--page", default=None, help="the Markdown page to write (default: the edition's, "
                                                "benchmarks/results/convergence.md or convergence2.md)")
    p.add_argument("--plots-dir", default=None, help="where the PNGs go (default: beside the page, "
                                                     "in a folder named after it)")
    args = p.parse_args(argv)
    if args.page is None:
        study = load_study(args.inputs)
        args.page = str(RESULTS / f"{edition_by_number(edition_of(study.metas, study.runs)).results}.md")
    page = Path(args.page)
    plots_dir = Path(args.plots_dir) if args.plots_dir else page.with_suffix("")
    study = report.write_report(args.inputs, page, plots_dir, argv)
    print(f"{len(study.runs)} runs, {len(study.throughput)} throughput rows -> {page} (plots in {plots_dir})")
    return 0


def corpus_main(argv: list[str]) -> int:
    """``convergence.py corpus``: build (or find) edition 2's corpus on this machine and say
    whether it feeds every planned run without a byte seen twice."""
    from .sweep import default_work_dir

    p = argparse.ArgumentParser(prog="convergence.py corpus", description=corpus_main.__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a file or folder instead of the installed Python's files")
    p.add_argument("--corpus-add", default=None, help="comma-separated folders whose files of the corpus's "
                                                      "suffixes join the default corpus")
    p.add_argument("--corpus-suffixes", default=None,
                   help=f"comma-separated file name endings (default {','.join(corpus_lib.SUFFIXES)})")
    p.add_argument("--cache-dir", default=None, help="where to build it (default: the sweep's default)")
    p.add_argument("--max-bytes", type=int, default=None)
    args = p.parse_args(argv)
    suffixes = _suffixes(p, args.corpus_suffixes)
    edition = edition_by_number(DEFAULT_EDITION)
    cache = Path(args.cache_dir) if args.cache_dir else default_work_dir(edition.number) / "corpus"
    corpus = corpus_lib.build(args.data, cache, extra_roots=_list(args.corpus_add) or [], suffixes=suffixes,
                              max_bytes=args.max_bytes)
    print(json.dumps(corpus.manifest, indent=1))
    print(f"built in {corpus.folder}")
    try:
        corpus_lib.check_fits(corpus.train_bytes, list(edition.sizes.values()))
    except corpus_lib.CorpusTooSmall as exc:
        print(f"NOT ENOUGH for every size of edition {edition.number}: {exc}")
        return 1
    print(f"enough for every size of edition {edition.number} "
          f"(the largest run needs {max(s.training_bytes_needed for s in edition.sizes.values()):,} training bytes)")
    return 0


def corpus_note(edition, cells, data: str | None, extra_roots: list[str],
                suffixes: tuple[str, ...] = corpus_lib.SUFFIXES) -> list[str]:
    """What ``--plan`` says of this machine's corpus: an upper bound, without reading it."""
    if edition.corpus != "python-tree" or not cells:
        return []
    source, files = corpus_lib.list_files(data, extra_roots, suffixes)
    total = corpus_lib.scan_bytes(files)
    largest = max((c.size for c in cells), key=lambda s: s.training_bytes_needed)
    usable = int(total * (1 - corpus_lib.VAL_FRACTION))
    short = largest.training_bytes_needed - usable
    verdict = ("enough, unless de-duplication removes more than the difference" if short <= 0
               else f"NOT ENOUGH: {short:,} bytes short even before de-duplication (on the GPU machine, "
                    f"tier 3 runs on its own with {LARGER_CORPUS_FLAGS})")
    return [f"corpus on this machine: {len(files):,} files, {total:,} bytes before de-duplication, about {usable:,} "
            f"for training ({source}); the largest planned run (size {largest.name}) needs "
            f"{largest.training_bytes_needed:,} training bytes: {verdict}. A sweep builds and checks the corpus "
            "before its first run; `convergence.py corpus` does only that."]


def main(argv: list[str] | None = None) -> int:
    """``convergence.py``: a sweep, ``--plan``, ``--mode throughput``, or a subcommand."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    if argv[:1] == ["corpus"]:
        return corpus_main(argv[1:])
    if argv[:1] == ["worker"]:  # one run of edition 2 in its own process (the sweep starts these)
        from .sweep import worker_main
        return worker_main(*argv[1:3])
    args = parse_args(argv)
    edition = edition_by_number(args.edition)
    cells = make_cells(edition, quick=args.quick, tiers=args.tier_numbers, sizes=args.size_names,
                       optimizers=args.optimizer_names, steps=args.steps, only_lrs=args.lr_values)
    if args.mode == "sweep" and not cells:
        print("error: the filters leave no run of this edition", file=sys.stderr)
        return 2
    if args.plan:
        shards = assign_shards(cells, args.num_shards)
        finished = load_finished(args.resume)
        corpora = study_corpora(finished)
        finished, elsewhere = on_corpora(finished, corpora)
        finished, stale = split_stale(finished, cells)
        lines = plan_lines(edition, shards, finished, gpus=args.gpus or 2,
                           corpus_note=corpus_note(edition, cells, args.data, args.corpus_add, args.corpus_suffixes))
        if elsewhere:
            lines.insert(1, "The plan counts the --resume records on each size's corpus (most of its runs: "
                            + ", ".join(f"{size} {sha[:12]}" for size, sha in sorted(corpora.items()))
                            + f"); {len(elsewhere)} trained on another corpus count as not run. A machine of "
                            "another image builds another corpus, and a sweep there refuses those sizes.")
        if stale:
            lines.insert(1, f"{len(stale)} --resume best-lr or transfer runs ran at another lr than their rule picks "
                            f"from the sweep now, and count as not run: {', '.join(r['id'] for r in stale)}.")
        print("\n".join(lines))
        return 0
    import torch  # not before the arguments are checked; the report needs none

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.compile is None:
        args.compile = "default" if device.type == "cuda" and edition.harness == "study" else "none"
    if args.mode == "throughput":
        from .throughput import run_throughput
        size = edition.quick_sizes[args.size] if args.quick else edition.sizes[args.size]
        return run_throughput(args, edition, size, [edition.optimizers[n] for n in args.optimizer_names], device)
    from .sweep import run_sweep
    return run_sweep(args, edition, cells, device, STARTED)
