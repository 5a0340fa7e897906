"""benchmarks/convergence.py and its report: a tiny sweep, --resume, and the page it feeds."""

import json
import random
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import convergence  # noqa: E402
import plot_convergence  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = ["def", "class", "return", "import", "self", "x", "(", ")", ":", "\n", "    "]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(60000)))
    return path


@pytest.fixture(scope="module")
def first_bundle(corpus, tmp_path_factory) -> Path:
    bundle = tmp_path_factory.mktemp("runs") / "first.json"
    args = ["--quick", "--device", "cpu", "--data", str(corpus), "--optimizers", "AdamW,Magma-Adam",
            "--out", "", "--bundle", str(bundle)]
    assert convergence.main(args) == 0
    return bundle


def test_tiny_sweep_records_every_planned_run(first_bundle):
    bundle = json.loads(first_bundle.read_text())
    assert len(bundle["runs"]) == len(bundle["meta"]["planned_runs"]) and not bundle["skipped"]
    assert {r["optimizer"] for r in bundle["runs"]} == {"AdamW", "Magma-Adam"}
    for r in bundle["runs"]:
        assert r["status"] == "ok" and r["final_val_ppl"] > 1
        assert len(r["val_loss"]) >= 2 and len(r["train_loss"]) >= 2


def test_resume_runs_nothing_twice(corpus, first_bundle, tmp_path, capsys):
    second = tmp_path / "second.json"
    args = ["--quick", "--device", "cpu", "--data", str(corpus), "--optimizers", "AdamW,Magma-Adam,Muon",
            "--out", "", "--bundle", str(second), "--resume", str(first_bundle)]
    assert convergence.main(args) == 0
    earlier = {r["id"] for r in json.loads(first_bundle.read_text())["runs"]}
    new = json.loads(second.read_text())["runs"]
    assert new and {r["optimizer"] for r in new} == {"Muon"}
    assert not earlier & {r["id"] for r in new}


def test_not_finished_counts_best_lr_runs_by_cell():
    runs = [convergence.RunSpec("10M", "AdamW", 1e-3, 0, "sweep"),
            convergence.RunSpec("10M", "AdamW", 2e-3, 0, "sweep"),
            convergence.RunSpec("10M", "AdamW", None, 1, "best_lr")]
    finished = [{"id": "10M__AdamW__lr0.001__seed0", "size": "10M", "optimizer": "AdamW", "seed": 0,
                 "stage": "sweep"},
                {"id": "10M__AdamW__lr0.002__seed1", "size": "10M", "optimizer": "AdamW", "seed": 1,
                 "stage": "best_lr"}]
    assert convergence.not_finished(runs, finished) == [runs[1]]


def test_resume_refuses_a_missing_bundle(tmp_path):
    with pytest.raises(SystemExit):
        convergence.parse_args(["--resume", str(tmp_path / "absent.json")])


def _run(optimizer, lr, seed, ppl):
    return {"kind": "run", "id": f"s__{optimizer}__lr{lr:g}__seed{seed}", "size": "s", "optimizer": optimizer,
            "lr": lr, "seed": seed, "stage": "sweep", "status": "ok", "final_val_ppl": ppl,
            "final_val_loss": 0.0, "num_parameters": 1000, "val_loss": [[0, 1.0], [10, 0.5]],
            "train_loss": [[0, 1.0], [10, 0.5]], "wall_s": 1.0, "peak_mem_bytes": None, "magma_fused": False}


def test_summary_picks_the_best_lr_and_the_stable_range():
    ppls = {1e-3: 3.0, 2e-3: 3.2, 4e-3: 3.5, 8e-3: 9.0}
    runs = [_run("AdamW", lr, seed, p + 0.01 * seed) for lr, p in ppls.items() for seed in (0, 1)]
    cell = plot_convergence.summarize(runs)["s"]["AdamW"]
    assert cell.best_lr == 1e-3 and cell.edge == "lowest"
    assert cell.near_best(0.10) == [1e-3, 2e-3]  # 3.5 is more than 10% above 3.005
    lines = "\n".join(plot_convergence.ordering_statement(plot_convergence.summarize(runs)))
    assert "AdamW 2 of 4 (0.001 to 0.002)" in lines


def test_report_page_lists_the_runs_and_the_seeds(first_bundle, tmp_path):
    pytest.importorskip("matplotlib")  # the report's plots; `make test` installs it
    page = tmp_path / "page.md"
    assert plot_convergence.main(["--inputs", str(first_bundle), "--page", str(page)]) == 0
    text = page.read_text()
    runs = json.loads(first_bundle.read_text())["runs"]
    assert f"{len(runs)} runs: {len(runs)} finished" in text
    assert "[0] at every lr; [1] at the best lr of seed 0" in text
    assert (tmp_path / "page" / "ppl_vs_lr.png").is_file()
