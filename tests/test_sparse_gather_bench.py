"""benchmarks/sparse_gather_bench.py on 2 CPU ranks (gloo): it checks every step of every sparse
variant against a dense all-gather and writes its table; the unpadded in-place route moves no more
than the padded packed route, whatever its chunks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from sparse_gather_record import synthetic_record  # noqa: E402

pytestmark = pytest.mark.multiprocess

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sparse_gather_bench.py"


def test_the_route_benchmark_checks_every_step_and_writes_its_table(tmp_path):
    layout, table = tmp_path / "layout.json", tmp_path / "table.md"
    layout.write_text(json.dumps(synthetic_record(5)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29731", str(SCRIPT), str(layout), "--keep-probs", "0.5", "0.1",
                           "--steps", "6", "--warmup", "1", "--out", str(table)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in table.read_text().splitlines() if line.startswith("| 0.")]
    names = ("dense", "in place", "packed (one chunk)", "packed (64 MiB chunks)")
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [(k, name) for k in ("0.5", "0.1") for name in names]
    for k in range(2):
        dense, in_place, packed, chunked = (float(r[5]) for r in rows[len(names) * k:len(names) * (k + 1)])
        assert dense == 1.0 and 0 < in_place <= packed == chunked <= 1.0
