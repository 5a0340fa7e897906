"""benchmarks/step_ab_summary.py: a tree's cell is the median over its processes of each process's
own median, ratios taken to AdamW within the process, with the range over processes."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_ab_summary as summary  # noqa: E402


def _record(label, adamw_ms, magma_ms, host_ms=1.0):
    def measures(values):
        return {"event_ms": values, "device_ms": [v - 0.5 for v in values], "host_ms": [host_ms] * len(values)}

    return {"label": label, "device": "test GPU", "torch": "x", "sleep_ms": 6.0, "turns": 3, "warmup": 1,
            "times": {"AdamW fused (baseline)": measures(adamw_ms), "Magma keep 0.5": measures(magma_ms)}}


def _rows(lines, heading):
    start = lines.index(heading) + 4  # heading, blank line, header row, separator
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_cells_are_medians_over_processes_of_in_process_ratios():
    records = [
        # per-process medians: AdamW 10, 20, 10; Magma 9, 16, 8.5 -> ratios 0.9, 0.8, 0.85
        _record("old", [10.0, 9.0, 11.0], [9.0, 100.0, 8.0]),
        _record("new", [20.0, 20.0, 20.0], [16.0, 16.0, 16.0]),
        _record("old", [20.0, 20.0, 20.0], [16.0, 16.0, 16.0]),
        _record("old", [10.0, 10.0, 10.0], [8.5, 8.5, 8.5], host_ms=7.0),
    ]
    lines = summary.report(records)
    assert "- processes in the order run: old new old old" in lines
    ratios = _rows(lines, f"## {summary.MEASURES['event_ms']}: ratio to AdamW fused, same process")
    assert ratios["AdamW fused (baseline)"] == ["1.000 (1.000-1.000)", "1.000"]
    assert ratios["Magma keep 0.5"] == ["0.850 (0.800-0.900)", "0.800"]
    times = _rows(lines, f"## {summary.MEASURES['event_ms']}: milliseconds")
    assert times["Magma keep 0.5"] == ["9.000 (8.500-16.000)", "16.000"]
    device = _rows(lines, f"## {summary.MEASURES['device_ms']}: milliseconds")
    assert device["AdamW fused (baseline)"] == ["9.500 (9.500-19.500)", "19.500"]
    host = _rows(lines, f"## {summary.MEASURES['host_ms']}: milliseconds")
    assert host["Magma keep 0.5"] == ["1.000 (1.000-7.000)", "1.000"]
    assert any("6 ms GPU sleep" in line and "100.0% at most" in line for line in lines)
