"""The command line of the convergence study (``benchmarks/convergence.py`` lands here).

Usage (from the repository root)::

    python benchmarks/convergence.py --plan                        # every run, its tokens, GPU minutes
    python benchmarks/convergence.py --tiers 1 --time-budget-s 540 --bundle c1.json
    python benchmarks/convergence.py --tiers 1 --time-budget-s 540 --resume c1.json --bundle c2.json
    python benchmarks/convergence.py --tiers 3 --resume c1.json,c2.json ...   # tier 3 takes tier 1's S-best lr
    python benchmarks/convergence.py --mode throughput --size S --optimizers AdamW,Magma-Adam --bundle tp.json
    python benchmarks/convergence.py --quick --bundle /tmp/smoke.json           # a smoke test on the CPU
    python benchmarks/convergence.py report --inputs benchmarks/results/convergence2/ \\
        --page benchmarks/results/convergence2.md

The tiers run in order, one run after another on one GPU. A device call runs at most 10 minutes:
give ``--time-budget-s`` and the runs stop there, saving checkpoints that the next invocation on
the same machine (same ``--work-dir``) goes on from; ``--resume`` takes the bundles of earlier
invocations and leaves out the runs they finished (a diverged run counts as finished), and a
best-lr or transfer run takes its learning rate from the finished sweep in those bundles. Each
invocation writes one bundle (:mod:`.records`); ``report`` turns the bundles into plots and a
page that also lists the planned runs still missing. What the study runs is :mod:`.definition`.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before torch is imported, which --time-budget-s must count

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from . import corpus as corpus_lib  # noqa: E402
from . import report  # noqa: E402
from .definition import CORPORA, EDITION, spelled  # noqa: E402
from .plan import make_cells, plan_lines, split_stale  # noqa: E402
from .records import load_finished, on_corpora, study_corpora  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "benchmarks" / "results" / "convergence2.md"
# Where the corpus and the checkpoints go unless told: the machine's temporary folder, which
# outlives a device call on a warm machine but not the machine.
WORK_DIR = Path(tempfile.gettempdir()) / "magma_ext_study"


def _list(text: str | None) -> list[str] | None:
    return [part for part in text.split(",") if part] if text else None


def parse_args(argv: list[str]) -> argparse.Namespace:
    edition = EDITION
    p = argparse.ArgumentParser(
        prog="convergence.py",
        description=f"Convergence study of Magma against other optimizers on byte-level Llama models (edition "
                    f"{edition.number}): {spelled(len(edition.optimizers))} optimizers, "
                    f"{spelled(len(edition.tiers))} tiers.",
        epilog="`convergence.py report --help`: the page.")
    p.add_argument("--mode", choices=("sweep", "throughput"), default="sweep")
    p.add_argument("--quick", action="store_true",
                   help="smoke test on the CPU: the tiers at tiny sizes, the middle learning rates, float32")
    p.add_argument("--plan", action="store_true", help="print the run list and time estimates, run nothing")
    p.add_argument("--tiers", default=None, help="comma-separated tier numbers, default all")
    p.add_argument("--optimizers", default=None, help="comma-separated, default all")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="seconds since the process started at which the runs stop with a checkpoint")
    p.add_argument("--resume", default="",
                   help="comma-separated bundles of earlier invocations: their finished runs are not run "
                        "again (and count for best-lr and transfer runs)")
    p.add_argument("--bundle", default=None, help="the file this invocation's records go to (needed but with --plan)")
    p.add_argument("--data", default=None,
                   help="a text file or folder to train on instead of each size's corpus (the CPU tests)")
    p.add_argument("--work-dir", default=None,
                   help="where the corpus is built and runs keep checkpoints (default: under the temporary folder)")
    p.add_argument("--size", default=None, help="--mode throughput: the model size to time")
    p.add_argument("--repeats", type=int, default=5, help="--mode throughput: rounds over all optimizers "
                                                          "(the median window is reported)")
    args = p.parse_args(argv)

    names = list(edition.quick_optimizers) if args.quick and args.optimizers is None else (
        _list(args.optimizers) or list(edition.optimizers))
    unknown = [n for n in names if n not in edition.optimizers]
    if unknown:
        p.error(f"--optimizers: unknown {unknown}; choose from {', '.join(edition.optimizers)}")
    args.optimizer_names = names
    try:
        args.tier_numbers = [int(t) for t in _list(args.tiers)] if args.tiers else None
    except ValueError:
        p.error(f"--tiers takes comma-separated numbers, got {args.tiers!r}")
    tiers = {t.number for t in edition.tiers}
    if args.tier_numbers and not set(args.tier_numbers) <= tiers:
        p.error(f"--tiers: there are tiers {sorted(tiers)}, not {sorted(set(args.tier_numbers) - tiers)}")
    sizes = edition.quick_sizes if args.quick else edition.sizes
    if args.mode == "throughput" and args.size not in sizes:
        p.error(f"--mode throughput needs --size, one of {', '.join(sizes)}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.bundle is None and not args.plan:
        p.error("--bundle is needed to run anything (--plan runs nothing)")
    args.bundle = Path(args.bundle) if args.bundle else None
    args.resume = [Path(p) for p in args.resume.split(",") if p]
    missing = [str(path) for path in args.resume if not path.is_file()]
    if missing:
        p.error(f"--resume: no such file(s) {missing}")
    args.work_dir = Path(args.work_dir) if args.work_dir else WORK_DIR
    return args


def report_main(argv: list[str]) -> int:
    """``convergence.py report``: the page and its plots from the bundles."""
    p = argparse.ArgumentParser(prog="convergence.py report", description=report.__doc__.split("\n\n")[0])
    p.add_argument("--inputs", nargs="+", required=True, help="bundles or folders of them")
    p.add_argument("--page", default=str(PAGE.relative_to(REPO)),
                   help="the Markdown page to write; the PNGs go beside it, in a folder named after it "
                        "(default: %(default)s)")
    args = p.parse_args(argv)
    page = Path(args.page)
    study = report.write_report(args.inputs, page, page.with_suffix(""), argv)
    print(f"{len(study.runs)} runs, {len(study.throughput)} throughput rows -> {page} (plots in "
          f"{page.with_suffix('')})")
    return 0


def corpus_note(cells, data: str | None) -> list[str]:
    """What ``--plan`` says of this machine's corpora: an upper bound, without reading them."""
    lines = []
    for name in sorted({c.size.corpus for c in cells}) if data is None else [None]:
        sizes = sorted({c.size for c in cells if name is None or c.size.corpus == name}, key=lambda s: s.tokens)
        try:
            source, files = corpus_lib.list_files(data, *CORPORA[name or "python"])
        except FileNotFoundError as exc:
            lines.append(f"corpus {name}: {exc}")
            continue
        total = corpus_lib.scan_bytes(files)
        usable = int(total * (1 - corpus_lib.VAL_FRACTION))
        verdicts = []
        for size in sizes:
            passes = corpus_lib.passes(usable, size)
            verdicts.append(f"size {size.name} reads " + (
                "each byte at most once" if passes <= 1 else
                f"them {passes:.2f} times (it allows {size.max_passes})" if passes <= size.max_passes else
                f"them {passes:.2f} times: NOT ENOUGH, it allows {size.max_passes}"))
        lines.append(f"corpus {name or '--data'} on this machine: {len(files):,} files, {total:,} bytes before "
                     f"de-duplication, about {usable:,} for training ({source}); {'; '.join(verdicts)} (more once "
                     "de-duplication drops repeated files). A sweep builds and checks the corpus before its first run.")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``convergence.py``: a sweep, ``--plan``, ``--mode throughput``, or ``report``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    args = parse_args(argv)
    edition = EDITION
    cells = make_cells(edition, quick=args.quick, tiers=args.tier_numbers, optimizers=args.optimizer_names)
    if args.mode == "sweep" and not cells:
        print("error: the filters leave no run", file=sys.stderr)
        return 2
    if args.plan:
        finished = load_finished(args.resume)
        corpora = study_corpora(finished)
        finished, elsewhere = on_corpora(finished, corpora)
        finished, stale = split_stale(finished, cells)
        lines = plan_lines(edition, cells, finished, corpus_note(cells, args.data))
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

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    args.compile = "default" if device.type == "cuda" else "none"
    if args.mode == "throughput":
        from .throughput import run_throughput
        sizes = edition.quick_sizes if args.quick else edition.sizes
        return run_throughput(args, edition, sizes[args.size], [edition.optimizers[n] for n in args.optimizer_names],
                              device)
    from .sweep import run_sweep
    return run_sweep(args, edition, cells, device, STARTED)
