"""The table of benchmarks/pretrain_gpt_device_run.sh: Megatron-LM's pretrain_gpt.py with Magma.

Reads the runs' logs (Megatron-LM's per-iteration lines, ``--log-interval 1``) and a checkpoint:

    python3 benchmarks/pretrain_gpt_summary.py LOGS_DIR CHECKPOINT_DIR > summary.md

and prints, as Markdown, each run's loss at a few iterations, whether the resumed run
(``magma_resumed``) repeats the uninterrupted one (``magma``) past the checkpoint, and whether the
checkpoint holds Magma's scores. Exits 1 when a check fails (a run without iterations, a skipped
or NaN iteration, Magma's loss not halved, a resumed loss off by more than RESUME_RTOL, no
scores in the checkpoint).
"""

from __future__ import annotations

import pathlib
import re
import sys

RUNS = ("magma", "magma_resumed", "adam")
# Run to run, the same GPU gives the same masks (they depend on the seed, the names and the step
# only) but not always the same bits (atomics in some backward kernels): losses a few 1e-5 apart.
RESUME_RTOL = 1e-3
_ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|")
_FIELD = re.compile(r"\| ([^|:]+):\s+([-+0-9.Ee]+)")


def iterations(text: str) -> dict[int, dict[str, float]]:
    """Megatron-LM's per-iteration log lines: iteration -> {"lm loss": ..., "number of skipped
    iterations": ..., ...}."""
    found = {}
    for line in text.splitlines():
        match = _ITERATION.search(line)
        if match:
            fields = {name.strip(): float(value) for name, value in _FIELD.findall(line[match.end() - 1:])}
            found[int(match.group(1))] = fields
    return found


def holds_magma_scores(value) -> bool:
    """Whether a loaded checkpoint object has a ``magma_scores`` entry anywhere inside."""
    if isinstance(value, dict):
        return "magma_scores" in value or any(holds_magma_scores(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_magma_scores(v) for v in value)
    return False


def checks(runs: dict[str, dict[int, dict[str, float]]]) -> list[str]:
    """What is wrong with the runs' iterations (empty when all is well)."""
    problems = []
    for name in RUNS:
        its = runs.get(name, {})
        if not its:
            problems.append(f"{name}: no iteration logged")
            continue
        for i, fields in its.items():
            if fields.get("number of skipped iterations", 0) or fields.get("number of nan iterations", 0):
                problems.append(f"{name}: iteration {i} skipped or NaN")
    magma, resumed = runs.get("magma", {}), runs.get("magma_resumed", {})
    if magma and magma[max(magma)]["lm loss"] > 0.5 * magma[min(magma)]["lm loss"]:
        problems.append(f"magma: loss {magma[min(magma)]['lm loss']:.4f} -> {magma[max(magma)]['lm loss']:.4f}, not halved")
    for i, fields in resumed.items():
        expected = magma.get(i, {}).get("lm loss")
        if expected is None:
            problems.append(f"magma_resumed: iteration {i} not in the uninterrupted run")
        elif abs(fields["lm loss"] - expected) > RESUME_RTOL * abs(expected):
            problems.append(f"magma_resumed: iteration {i} loss {fields['lm loss']:.6f}, uninterrupted {expected:.6f}")
    return problems


def table(runs: dict[str, dict[int, dict[str, float]]]) -> str:
    """Loss of each run at its first, middle and last logged iterations, and the resumed run's
    largest relative difference from the uninterrupted one."""
    every = sorted({i for its in runs.values() for i in its})
    shown = sorted({every[0], every[len(every) // 2], every[-1]}) if every else []
    lines = ["| run | " + " | ".join(f"loss at {i}" for i in shown) + " | ms/iteration (last) |",
             "|---|" + "---|" * (len(shown) + 1)]
    for name in RUNS:
        its = runs.get(name, {})
        cells = [f"{its[i]['lm loss']:.4f}" if i in its else "" for i in shown]
        last = its[max(its)].get("elapsed time per iteration (ms)", float("nan")) if its else float("nan")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {last:.1f} |")
    magma, resumed = runs.get("magma", {}), runs.get("magma_resumed", {})
    gaps = [abs(f["lm loss"] - magma[i]["lm loss"]) / abs(magma[i]["lm loss"]) for i, f in resumed.items() if i in magma]
    if gaps:
        lines.append(f"\nResumed against uninterrupted, iterations {min(resumed)}-{max(resumed)}: largest relative "
                     f"loss difference {max(gaps):.2e} (limit {RESUME_RTOL:g}).")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    logs, checkpoint = pathlib.Path(argv[0]), pathlib.Path(argv[1])
    runs = {name: iterations((logs / f"pretrain_gpt_{name}.log").read_text(errors="replace"))
            for name in RUNS if (logs / f"pretrain_gpt_{name}.log").exists()}
    print(table(runs))
    problems = checks(runs)
    import torch

    commons = sorted(checkpoint.glob("iter_*/common.pt"))
    scored = any(holds_magma_scores(torch.load(path, map_location="cpu", weights_only=False)) for path in commons)
    print(f"\nCheckpoint {', '.join(str(p.parent.name) for p in commons) or '(none)'}: Magma's scores "
          f"{'found' if scored else 'not found'} in common.pt.")
    if not scored:
        problems.append("no magma_scores in the checkpoint's common.pt")
    print("\n" + ("All checks passed." if not problems else "Failed:\n" + "\n".join(f"- {p}" for p in problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
