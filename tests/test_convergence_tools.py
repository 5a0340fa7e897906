"""benchmarks/study (benchmarks/convergence.py and its report): a tiny sweep, --resume, the
records, the page it feeds, and the package's layering."""

import ast
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.study import cli, definition, page, plan, plots, records, summary  # noqa: E402

STUDY = REPO / "benchmarks" / "study"
RESULTS = REPO / "benchmarks" / "results"


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
    assert cli.main(args) == 0
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
    assert cli.main(args) == 0
    earlier = {r["id"] for r in json.loads(first_bundle.read_text())["runs"]}
    new = json.loads(second.read_text())["runs"]
    assert new and {r["optimizer"] for r in new} == {"Muon"}
    assert not earlier & {r["id"] for r in new}


def test_not_finished_counts_best_lr_runs_by_cell():
    runs = [plan.RunSpec("10M", "AdamW", 1e-3, 0, "sweep"),
            plan.RunSpec("10M", "AdamW", 2e-3, 0, "sweep"),
            plan.RunSpec("10M", "AdamW", None, 1, "best_lr")]
    finished = [{"id": "10M__AdamW__lr0.001__seed0", "size": "10M", "optimizer": "AdamW", "seed": 0,
                 "stage": "sweep"},
                {"id": "10M__AdamW__lr0.002__seed1", "size": "10M", "optimizer": "AdamW", "seed": 1,
                 "stage": "best_lr"}]
    assert plan.not_finished(runs, finished) == [runs[1]]


def test_resume_refuses_a_missing_bundle(tmp_path):
    with pytest.raises(SystemExit):
        cli.parse_args(["--resume", str(tmp_path / "absent.json")])


def _run(optimizer, lr, seed, ppl, size="s", status="ok"):
    return {"kind": "run", "id": records.run_id(size, optimizer, lr, seed), "size": size, "optimizer": optimizer,
            "lr": lr, "seed": seed, "stage": "sweep", "status": status, "error": None, "final_val_ppl": ppl,
            "final_val_loss": 0.0, "num_parameters": 1000, "val_loss": [[0, 1.0], [10, 0.5]],
            "train_loss": [[0, 1.0], [10, 0.5]], "wall_s": 1.0, "peak_mem_bytes": None, "magma_fused": False}


def test_summary_picks_the_best_lr_and_the_stable_range():
    ppls = {1e-3: 3.0, 2e-3: 3.2, 4e-3: 3.5, 8e-3: 9.0}
    runs = [_run("AdamW", lr, seed, p + 0.01 * seed) for lr, p in ppls.items() for seed in (0, 1)]
    cell = summary.summarize(runs)["s"]["AdamW"]
    assert cell.best_lr == 1e-3 and cell.edge == "lowest"
    assert cell.near_best(0.10) == [1e-3, 2e-3]  # 3.5 is more than 10% above 3.005
    lines = "\n".join(page.ordering_statement(summary.summarize(runs)))
    assert "AdamW 2 of 4 (0.001 to 0.002)" in lines


def test_report_page_lists_the_runs_and_the_seeds(first_bundle, tmp_path):
    pytest.importorskip("matplotlib")  # the report's plots; `make test` installs it
    page_path = tmp_path / "page.md"
    assert cli.report_main(["--inputs", str(first_bundle), "--page", str(page_path)]) == 0
    text = page_path.read_text()
    runs = json.loads(first_bundle.read_text())["runs"]
    assert f"{len(runs)} runs: {len(runs)} finished" in text
    assert "[0] at every lr; [1] at the best lr of seed 0" in text
    assert (tmp_path / "page" / "ppl_vs_lr.png").is_file()
    assert "![final validation perplexity against learning rate](page/ppl_vs_lr.png)" in text


def test_records_round_trip_a_bundle(tmp_path):
    meta = {"command": "python benchmarks/convergence.py", "date": "2026-01-01 00:00 UTC", "mode": "sweep",
            "shard": 1, "num_shards": 1, "optimizers": {"AdamW": {"lrs": [1e-3, 2e-3], "description": "d"}}}
    runs = [_run("AdamW", 1e-3, 0, 3.0), _run("AdamW", 2e-3, 0, 3.5)]
    throughput = {"kind": "throughput", "size": "s", "optimizer": "AdamW", "date": meta["date"], "tokens_per_s": 1.0}
    skipped = {"id": records.run_id("s", "AdamW", None, 1), "reason": "time budget"}
    writer = records.RecordWriter(tmp_path / "out", tmp_path / "bundle.json", meta)
    for r in runs:
        writer.add("runs", r, f"{r['id']}.json")
    writer.add("throughput", throughput, records.throughput_filename("s", "AdamW"))
    writer.add("skipped", skipped)

    bundle = json.loads((tmp_path / "bundle.json").read_text())
    assert bundle == {"kind": "bundle", "meta": meta, "runs": runs, "throughput": [throughput], "skipped": [skipped]}
    assert records.load_finished([tmp_path / "bundle.json"]) == runs
    loaded = records.load_study([str(tmp_path / "bundle.json")])
    assert (loaded.runs, loaded.throughput, loaded.metas, loaded.skipped) == (runs, [throughput], [meta], [skipped])
    # The folder of per-run files and the bundle together: every record once, the meta from both.
    both = records.load_study([str(tmp_path / "out"), str(tmp_path / "bundle.json")])
    assert sorted(r["id"] for r in both.runs) == sorted(r["id"] for r in runs)
    assert both.throughput == [throughput] and both.metas == [meta, meta]
    assert records.merged_meta(both.metas, "optimizers") == meta["optimizers"]


def test_records_merge_invocations(tmp_path):
    failed = _run("AdamW", 1e-3, 0, None, status="error")
    first = {"kind": "bundle", "meta": {"mode": "sweep", "date": "2026-01-01 00:00 UTC", "sizes": {"s": {"steps": 1}}},
             "runs": [failed], "throughput": [], "skipped": [{"id": records.run_id("s", "AdamW", 2e-3, 0),
                                                              "reason": "time budget"}]}
    second = {"kind": "bundle", "meta": {"mode": "sweep", "date": "2026-01-02 00:00 UTC", "sizes": {"s": {"steps": 2}}},
              "runs": [_run("AdamW", 1e-3, 0, 3.0), _run("AdamW", 2e-3, 0, 3.1)], "throughput": [], "skipped": []}
    for name, obj in (("a.json", first), ("b.json", second)):
        records.write_json(tmp_path / name, obj)
    study = records.load_study([str(tmp_path)])
    assert {r["id"]: r["status"] for r in study.runs} == {"s__AdamW__lr0.001__seed0": "ok",
                                                          "s__AdamW__lr0.002__seed0": "ok"}
    assert study.skipped == []  # the second invocation finished what the first skipped
    assert records.merged_meta(study.metas, "sizes") == {"s": {"steps": 2}}  # the later invocation wins


def _lion_study() -> records.Study:
    meta = {"mode": "sweep", "date": "2026-01-01 00:00 UTC", "shard": 1, "num_shards": 1, "betas": [0.9, 0.95],
            "weight_decay": 0.1, "optimizers": {name: {"lrs": [1e-3, 2e-3], "description": r.description}
                                                for name, r in definition.OPTIMIZERS.items()}}
    runs = [_run(name, lr, seed, p + 0.01 * seed) for name, base in (("Lion", 2.0), ("AdamW", 3.0))
            for lr, p in ((1e-3, base), (2e-3, base + 0.5)) for seed in (0, 1)]
    env = {"device": "cuda:0", "device_name": "GPU", "torch": "2", "python": "3"}
    throughput = [{"kind": "throughput", "size": "s", "optimizer": name, "magma_fused": False, "env": env,
                   "num_parameters": 1e6, "batch_size": 2, "seq_len": 8, "dtype": "bfloat16", "warmup_steps": 1,
                   "repeats": 1, "timed_steps": 2, "opt_step_timer": "cuda events", "date": meta["date"],
                   "tokens_per_s": 100.0, "step_ms": 1.0, "opt_step_ms_median": 0.5, "state_bytes": 2**20,
                   "peak_mem_bytes": None} for name in ("Lion", "AdamW")]
    return records.Study(runs=runs, throughput=throughput, metas=[meta])


def test_page_is_built_from_the_recipe_data(monkeypatch):
    """An optimizer added to the definition reaches the title, the tables, the fused column and
    the plots' colours, and the paper's claim is the definition's, without a change to the page."""
    lion = definition.Recipe("Lion", (1e-3, 2e-3), "a sign-based optimizer (test recipe)", "lion",
                             color="tab:purple", fused="none", fused_note="torch Lion")
    monkeypatch.setitem(definition.OPTIMIZERS, "Lion", lion)
    monkeypatch.setattr(definition, "PAPER", definition.PaperClaim(
        "Lion < AdamW", (("Lion", "AdamW"),), "claimed wider for Lion", "Not the paper's data (test)."))
    study = _lion_study()
    summ = summary.summarize(study.runs)
    assert list(summ["s"]) == ["AdamW", "Lion"]  # the definition's order, Lion last
    text = page.build_page(study, summ, ["--inputs", "x"], {})
    assert text.startswith("# Convergence: Magma against AdamW, RMSProp, SkipUpdate, Muon and Lion\n")
    assert "| Lion | a sign-based optimizer (test recipe) | s: 0.001, 0.002 |" in text
    assert "| s | Lion | 0.001 (lowest of grid) | 2.0050 [2.0000, 2.0100] (2 seeds) |" in text
    assert "| Lion | n/a (torch Lion) | 100 | 1.000x |" in text
    assert "| AdamW | torch fused |" in text
    assert "The paper reports the ordering Lion < AdamW" in text
    assert "- Lion < AdamW: holds (2.0050 vs 3.0050; separated)." in text
    assert "Stable range (claimed wider for Lion)" in text and "Not the paper's data (test)." in text
    assert "The paper's ordering holds in full at: s." in text
    assert "Magma-based optimizers ran on" not in text  # neither Lion nor AdamW is Magma-based
    assert plots.color("Lion") == "tab:purple"
    assert "Lion" in cli.parse_args(["--optimizers", "Lion"]).optimizer_names
    cells = plan.make_cells([definition.QUICK_SIZE], [lion], quick=True)
    assert [r.run_id for r in cells[0].runs] == ["tiny__Lion__lr0.001__seed0", "tiny__Lion__lr0.002__seed0",
                                                 "tiny__Lion__lrbest__seed1"]


def test_committed_page_is_what_the_committed_records_give():
    """The bundles under benchmarks/results/convergence/ still load, and the page built from
    them is the committed one, but for the time it was generated."""
    study = records.load_study([str(RESULTS / "convergence")])
    assert (len(study.runs), len(study.throughput)) == (63, 2)
    argv = ["--inputs", "benchmarks/results/convergence/", "--page", "benchmarks/results/convergence.md"]
    figures = {"val_curves": "convergence/val_curves.png", "ppl_vs_lr": "convergence/ppl_vs_lr.png"}
    built = page.build_page(study, summary.summarize(study.runs), argv, figures).splitlines()
    committed = (RESULTS / "convergence.md").read_text().splitlines()
    generated = [i for i, line in enumerate(committed) if line.startswith("Page generated ")]
    assert generated and [line for i, line in enumerate(built) if i not in generated] == \
        [line for i, line in enumerate(committed) if i not in generated]


# Each module's layer: a module imports only modules of lower layers (imports run one way).
LAYERS = {"definition": 0, "records": 0, "summary": 1, "environment": 1, "optimizers": 1, "plan": 1,
          "plots": 2, "page": 2, "sweep": 2, "throughput": 2, "report": 3, "cli": 4, "__main__": 5, "__init__": 5}


def test_imports_run_one_way():
    modules = {p.stem for p in STUDY.glob("*.py")}
    assert modules == set(LAYERS), "give a new module of benchmarks/study a layer here"
    for module in modules:
        tree = ast.parse((STUDY / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                targets = [node.module] if node.module else [a.name for a in node.names]
                for target in targets:
                    assert LAYERS[target] < LAYERS[module], f"{module} imports {target}, a layer up"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("benchmarks") for n in names), f"{module}: import relatively"


def test_the_report_side_imports_no_torch():
    code = ("import sys; import benchmarks.study.cli, benchmarks.study.report; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'magma_ext')); "
            "sys.exit(f'imported {heavy[:5]}' if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", ["convergence.py", "plot_convergence.py"])
def test_entry_scripts_answer_help(script):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--inputs" in done.stdout if script == "plot_convergence.py" else "--resume" in done.stdout
