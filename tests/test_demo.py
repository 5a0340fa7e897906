"""The demo runs end to end on a tiny configuration and writes its outputs."""

import json

import pytest

pytest.importorskip("matplotlib")

from magma_ext.demo.__main__ import main  # noqa: E402


def test_demo_smoke(tmp_path):
    results = main([
        "--device", "cpu", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--dim", "32",
        "--layers", "1", "--heads", "2", "--eval-every", "2", "--eval-batches", "1",
        "--max-bytes", "200000", "--out", str(tmp_path),
    ])
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert curves
    assert results
