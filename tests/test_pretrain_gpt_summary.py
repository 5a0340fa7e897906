"""benchmarks/pretrain_gpt_summary.py: Megatron-LM's log lines read, and each check able to fail."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pretrain_gpt_summary as summary  # noqa: E402


def _line(iteration: int, loss: float, skipped: int = 0, total: int = 40) -> str:
    """A line as megatron/training/training.py (megatron-core 0.19.2) writes it."""
    return (f" [2026-12-08 04:40:00.123456] iteration {iteration:8d}/{total:8d} | consumed samples: "
            f"{8 * iteration:12d} | elapsed time per iteration (ms): 41.7 | learning rate: 1.000000E-03 |"
            f" global batch size:     8 | lm loss: {loss:.6E} | loss scale: 1.0 | grad norm: 1.234 |"
            f" number of skipped iterations: {skipped:3d} | number of nan iterations:   0 |")


def _runs(resumed_shift=0.0, last_magma=1.0, skipped_at=None):
    magma = "\n".join(_line(i, 7.0 - (6.0 - last_magma) * i / 40) for i in range(1, 41))
    resumed = "\n".join(_line(i, (7.0 - (6.0 - last_magma) * i / 40) * (1 + resumed_shift)) for i in range(21, 41))
    adam = "\n".join(_line(i, 7.0 - 6.5 * i / 40, skipped=int(i == skipped_at)) for i in range(1, 41))
    return {name: summary.iterations("noise: a line without iterations\n" + text)
            for name, text in (("magma", magma), ("magma_resumed", resumed), ("adam", adam))}


def test_log_lines_are_read_field_by_field():
    fields = summary.iterations(_line(7, 2.5))[7]
    assert fields["lm loss"] == 2.5 and fields["elapsed time per iteration (ms)"] == 41.7
    assert fields["number of skipped iterations"] == 0 and fields["consumed samples"] == 56


def test_good_runs_pass_and_the_table_shows_them():
    runs = _runs()
    assert summary.checks(runs) == []
    text = summary.table(runs)
    assert "| magma_resumed |" in text and "largest relative loss difference 0.00e+00" in text


@pytest.mark.parametrize("runs,problem", [
    (_runs(resumed_shift=2e-3), "magma_resumed: iteration 21 loss"),
    (_runs(last_magma=4.0), "not halved"),
    (_runs(skipped_at=5), "adam: iteration 5 skipped or NaN"),
    ({k: v for k, v in _runs().items() if k != "adam"}, "adam: no iteration logged"),
])
def test_each_check_fails_when_it_should(runs, problem):
    assert any(problem in p for p in summary.checks(runs)), summary.checks(runs)


def test_magma_scores_are_found_anywhere_in_a_checkpoint():
    assert summary.holds_magma_scores({"optimizer": [{"state": {}}, {"magma_scores": {}}]})
    assert not summary.holds_magma_scores({"optimizer": {"state": {"exp_avg": 1}}})
