"""The table of several step_ab.py processes: each tree's step times and ratios to fused AdamW.

    python benchmarks/step_ab_summary.py /tmp/raw/*.json --out $OUT/step_ab.md

Per process, every case's median of each measure (event, device and host ms); the ratio to
AdamW is taken within the process.  A tree's cell is the median of its processes' values with
their range, so two trees differ beyond noise only where their ranges do not overlap.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

MEASURES = {
    "event_ms": "event ms: the step from an idle device, host time before the first kernel included "
                "(what step_bench.py reports)",
    "device_ms": "device ms: the step queued behind a GPU sleep, kernels only",
    "host_ms": "host ms: the host's time to enqueue the step",
}


def process_medians(record: dict) -> dict[str, dict[str, float]]:
    """{case: {measure: median}} of one process."""
    return {case: {m: statistics.median(values) for m, values in measures.items()}
            for case, measures in record["times"].items()}


def cell(values: list[float], digits: int) -> str:
    """Median of ``values`` and their range."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(records: list[dict], measure: str, ratio: bool) -> list[str]:
    """Rows of one measure: a case per row, a tree per column."""
    labels = list(dict.fromkeys(r["label"] for r in records))
    cases = list(records[0]["times"])
    baseline = cases[0]
    lines = ["| case | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for case in cases:
        cells = []
        for label in labels:
            values = []
            for record in (r for r in records if r["label"] == label):
                medians = process_medians(record)
                value = medians[case][measure]
                values.append(value / medians[baseline][measure] if ratio else value)
            cells.append(cell(values, 3))
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines


def host_bound_share(record: dict) -> float:
    """Share of the queued steps whose host time reached 90% of the GPU sleep ahead of them."""
    host = [h for measures in record["times"].values() for h in measures["host_ms"]]
    return sum(h >= 0.9 * record["sleep_ms"] for h in host) / len(host)


def report(records: list[dict]) -> list[str]:
    order = " ".join(r["label"] for r in records)
    lines = [
        "# Step A/B: one optimizer step of each source tree, float32 Llama-1B shapes",
        "",
        f"- device: {records[0]['device']}; torch {records[0]['torch']}",
        f"- processes in the order run: {order}",
        f"- per process: {records[0]['warmup']} warm-up steps, then {records[0]['turns']} turns; each "
        "turn times every case twice (idle start, queued), the cases taking turns",
        f"- queued steps whose host time neared the {records[0]['sleep_ms']:.0f} ms GPU sleep "
        f"(device ms then holds host time): {max(host_bound_share(r) for r in records):.1%} at most",
        "- a cell: median over the tree's processes of the per-process median (range over processes)",
        "",
    ]
    for measure, title in MEASURES.items():
        if measure != "host_ms":
            lines += [f"## {title}: ratio to AdamW fused, same process", ""] + table(records, measure, True) + [""]
        lines += [f"## {title}: milliseconds", ""] + table(records, measure, False) + [""]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="step_ab.py outputs, in the order they ran")
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument("--raw", type=Path, help="also write all records here as one JSON list")
    args = parser.parse_args(argv)
    records = [json.loads(path.read_text()) for path in args.files]
    text = "\n".join(report(records)) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.raw:
        args.raw.write_text(json.dumps(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
