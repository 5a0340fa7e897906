"""benchmarks/study (benchmarks/convergence.py and its report): a tiny sweep of the second
edition on the CPU (in this process, then side by side in worker processes with --resume), a
run stopped and taken up again from its checkpoint, the corpus builder, the plan, the records,
the pages of both editions, and the package's layering."""

import ast
import dataclasses
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.study import cli, corpus, definition, page, plan, plots, records, report, summary  # noqa: E402

STUDY = REPO / "benchmarks" / "study"
RESULTS = REPO / "benchmarks" / "results"
WORDS = ["def", "class", "return", "import", "self", "x", "(", ")", ":", "\n", "    ", "#", "value"]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder of a few files (--data takes every file under it): about 100 KB of code-like text."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("data")
    for i, name in enumerate(("pkg/a.py", "pkg/b.txt", "pkg/sub/c.rst", "d.h", "notes.md")):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_text(rng, 4000 + 100 * i))
    return root


def _sweep_args(corpus_dir: Path, tmp: Path, *extra: str) -> list[str]:
    return ["--edition", "2", "--quick", "--device", "cpu", "--data", str(corpus_dir), "--out", "",
            "--cache-dir", str(tmp / "cache"), "--checkpoint-dir", str(tmp / "checkpoints"), *extra]


@pytest.fixture(scope="module")
def first_bundle(corpus_dir, tmp_path_factory) -> Path:
    """Tier 1 of the quick second edition for AdamW and Magma-Adam, in this process."""
    tmp = tmp_path_factory.mktemp("runs")
    bundle = tmp / "first.json"
    assert cli.main(_sweep_args(corpus_dir, tmp, "--tiers", "1", "--bundle", str(bundle))) == 0
    return bundle


def test_tiny_sweep_records_every_planned_run(first_bundle):
    bundle = json.loads(first_bundle.read_text())
    assert len(bundle["runs"]) == len(bundle["meta"]["planned_runs"]) == 6 and not bundle["skipped"]
    assert bundle["meta"]["edition"] == 2 and bundle["meta"]["aggregate"]["tokens_trained"] > 0
    assert {r["optimizer"] for r in bundle["runs"]} == {"AdamW", "Magma-Adam"}
    for r in bundle["runs"]:
        assert r["status"] == "ok" and r["final_val_ppl"] > 1 and r["edition"] == 2 and r["tier"] == 1
        assert len(r["val_loss"]) >= 2 and len(r["train_loss"]) >= 2 and r["tokens_per_s"] > 0
        assert r["data"]["content_sha1"] and r["data"]["file_list_sha1"] and r["data"]["files"] == 5
    for r in (r for r in bundle["runs"] if r["stage"] == "best_lr"):
        assert r["lr"] == plan.best_lr(bundle["runs"], r["size"], r["optimizer"], 0) and r["lr_rule"] == "best"


def test_resume_runs_tier_3_side_by_side(corpus_dir, first_bundle, tmp_path):
    """Tier 1 is in the earlier bundle: only tier 3 runs, at each optimizer's tier-1 best lr and
    the grid point on its other side, two worker processes at a time."""
    second = tmp_path / "second.json"
    args = _sweep_args(corpus_dir, tmp_path, "--tiers", "1,3", "--parallel", "2", "--bundle", str(second),
                       "--resume", str(first_bundle))
    assert cli.main(args) == 0
    first = json.loads(first_bundle.read_text())["runs"]
    new = json.loads(second.read_text())["runs"]
    assert len(new) == 4 and {r["stage"] for r in new} == {"transfer"} and not {r["id"] for r in first} & {
        r["id"] for r in new}
    grid = definition.SECOND.lrs(definition.SECOND.optimizers["AdamW"], quick=True)
    for name in ("AdamW", "Magma-Adam"):
        best = plan.best_lr(first, "tinyS", name, 0)
        mine = {r["lr_rule"]: r["lr"] for r in new if r["optimizer"] == name}
        assert mine["tinyS-best"] == best and mine["tinyS-best+1"] == next(lr for lr in grid if lr != best)
        assert all(r["side_by_side"] == 2 and r["status"] == "ok" for r in new)


@pytest.mark.parametrize("optimizer", ["Magma-Adam", "Muon"])
def test_a_run_taken_up_from_its_checkpoint_ends_as_a_straight_run(corpus_dir, tmp_path, optimizer):
    import torch

    from benchmarks.study.trainer import RunJob, load_split, train_run

    built = corpus.build(str(corpus_dir), tmp_path / "cache", log=lambda _: None)
    data = (load_split(str(built.train_path), torch.device("cpu")), load_split(str(built.val_path), "cpu"))
    size = dataclasses.replace(definition.SECOND_QUICK_SIZES["S"], steps=12, evals=3)
    recipe = definition.SECOND.optimizers[optimizer]

    def job(**kw) -> RunJob:
        return RunJob("r", dataclasses.asdict(size), optimizer, recipe.lrs[3], 0, 0.1, str(built.train_path),
                      str(built.val_path), **kw)

    straight = train_run(job(), recipe, *data, torch.device("cpu"), log=lambda _: None)
    ckpt = tmp_path / "ckpt"
    stopped = train_run(job(checkpoint_dir=str(ckpt), stop_at=0.0), recipe, *data, torch.device("cpu"),
                        log=lambda _: None)
    assert stopped["stopped_at"] == 1 and (ckpt / "r.pt").is_file()
    resumed = train_run(job(checkpoint_dir=str(ckpt)), recipe, *data, torch.device("cpu"), log=lambda _: None)
    assert resumed["resumed_at"] == [1] and not (ckpt / "r.pt").exists()
    for key in ("final_val_loss", "val_loss", "train_loss", "final_train_loss"):
        assert resumed[key] == straight[key], key


def test_runs_stopped_by_the_budget_go_on_in_the_next_invocation(corpus_dir, tmp_path, monkeypatch):
    from benchmarks.study import sweep

    monkeypatch.setattr(sweep, "STOP_MARGIN_S", 0.0)
    monkeypatch.setattr(sweep, "MIN_LAUNCH_S", -1e9)  # start every run, however little time is left
    args = _sweep_args(corpus_dir, tmp_path, "--tiers", "1", "--optimizers", "AdamW")
    cut = tmp_path / "cut.json"
    assert cli.main(args + ["--time-budget-s", "0.001", "--bundle", str(cut)]) == 0
    saved = json.loads(cut.read_text())
    assert not saved["runs"] and [s["reason"].split(";")[0] for s in saved["skipped"]] == [
        "stopped at step 1 of 24 by the time budget", "stopped at step 1 of 24 by the time budget",
        "the tinyS sweep of AdamW (seed 0) is not complete: no finished run at lr 0.001, 0.005"]
    rest = tmp_path / "rest.json"
    assert cli.main(args + ["--resume", str(cut), "--bundle", str(rest)]) == 0
    runs = json.loads(rest.read_text())["runs"]
    assert [(r["stage"], r["resumed_at"]) for r in runs] == [("sweep", [1]), ("sweep", [1]), ("best_lr", [])]
    assert records.load_study([str(cut), str(rest)]).skipped == []  # the best-lr run too, skipped by its rule


def test_finish_only_judges_a_run_by_the_walls_of_finished_runs(corpus_dir, first_bundle, tmp_path, capsys):
    """--finish-only starts a run only if it can finish: by the median wall time of the size's
    finished runs on this device when there are enough, not by the plan's estimate."""
    first = json.loads(first_bundle.read_text())
    slow = tmp_path / "slow.json"
    records.write_json(slow, {**first, "runs": [{**r, "wall_s": 1e6} for r in first["runs"]
                                                if r["optimizer"] == "Magma-Adam"]})
    budget = ["--tiers", "1", "--bundle", str(tmp_path / "b.json"), "--finish-only", "--time-budget-s", "1000"]
    assert cli.main(_sweep_args(corpus_dir, tmp_path, *budget, "--resume", str(slow))) == 0
    skipped = json.loads((tmp_path / "b.json").read_text())["skipped"]
    assert [s["id"].split("__")[1] for s in skipped] == ["AdamW"] * 3
    assert "the run needs about 1000000 s" in skipped[0]["reason"]
    assert cli.main(_sweep_args(corpus_dir, tmp_path, *budget, "--optimizers", "AdamW")) == 0  # the estimate
    assert len(json.loads((tmp_path / "b.json").read_text())["runs"]) == 3


def test_finish_only_counts_only_the_steps_a_checkpoint_leaves(corpus_dir, first_bundle, tmp_path):
    """A run with a checkpoint needs its start-up and the share of its steps still to train:
    --finish-only starts it where the whole run would not fit (one of another set-up is then
    trained afresh)."""
    import torch

    first = json.loads(first_bundle.read_text())
    slow = tmp_path / "slow.json"
    records.write_json(slow, {**first, "runs": [{**r, "wall_s": 2000.0} for r in first["runs"]
                                                if r["optimizer"] == "Magma-Adam"]})
    sweep = sorted((r for r in first["runs"] if r["optimizer"] == "AdamW" and r["stage"] == "sweep"),
                   key=lambda r: r["lr"])
    steps = sweep[0]["steps"]
    (tmp_path / "checkpoints").mkdir()
    torch.save({"key": "another set-up", "step": steps - 1}, tmp_path / "checkpoints" / f"{sweep[0]['id']}.pt")
    bundle = tmp_path / "b.json"
    assert cli.main(_sweep_args(corpus_dir, tmp_path, "--tiers", "1", "--optimizers", "AdamW", "--finish-only",
                                "--time-budget-s", "1000", "--resume", str(slow), "--bundle", str(bundle))) == 0
    out = json.loads(bundle.read_text())
    assert [r["id"] for r in out["runs"]] == [sweep[0]["id"]] and out["runs"][0]["resumed_at"] == []
    reasons = {s["id"]: s["reason"] for s in out["skipped"]}
    assert reasons[sweep[1]["id"]].endswith("the run needs about 2000 s")


def _tree(root: Path) -> dict[str, bytes]:
    rng = random.Random(1)
    files = {"pkg/a.py": _text(rng, 300).encode(), "pkg/b.txt": _text(rng, 200).encode(),
             "pkg/sub/c.rst": _text(rng, 250).encode(), "pkg/d.h": _text(rng, 100).encode(),
             "pkg/e.json": b'{"not": "in the corpus"}', "pkg/__pycache__/f.py": b"cached = 1",
             "pkg/empty.txt": b""}
    files["pkg/dup.py"] = files["pkg/a.py"]  # the same bytes as an earlier file: dropped
    for name, blob in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    return files


def test_corpus_builder_on_a_small_tree(tmp_path, monkeypatch):
    tree = tmp_path / "python"
    files = _tree(tree)
    monkeypatch.setattr(corpus, "python_roots", lambda: [tree.resolve()])
    built = corpus.build(None, tmp_path / "cache", log=lambda _: None)
    m = built.manifest
    used = ["pkg/a.py", "pkg/b.txt", "pkg/d.h", "pkg/sub/c.rst"]  # sorted paths; no json, cache, copy or empty
    stream = b"".join(files[name] for name in used)
    assert (m["files"], m["duplicates_dropped"], m["empty_skipped"], m["bytes"]) == (4, 1, 1, len(stream))
    assert m["content_sha1"] == hashlib.sha1(stream).hexdigest()
    assert m["file_list_sha1"] == hashlib.sha1("\n".join(str((tree / n).resolve()) for n in used).encode()).hexdigest()
    # The validation chunks, spread over the stream, and the training split are disjoint and
    # together the whole stream.
    chunk, val_chunks = corpus.split_chunks(len(stream), corpus.VAL_FRACTION)
    pieces = [stream[i:i + chunk] for i in range(0, len(stream), chunk)]
    assert len(val_chunks) >= 2 and val_chunks[-1] > len(pieces) // 2
    assert built.val_path.read_bytes() == b"".join(pieces[i] for i in val_chunks)
    assert built.train_path.read_bytes() == b"".join(p for i, p in enumerate(pieces) if i not in val_chunks)
    assert m["train_bytes"] + m["val_bytes"] == len(stream)
    # The same files give the same build, found again; a changed file gives another.
    assert corpus.build(None, tmp_path / "cache", log=pytest.fail).folder == built.folder
    (tree / "pkg/b.txt").write_bytes(b"changed " * 50)
    assert corpus.build(None, tmp_path / "cache", log=lambda _: None).folder != built.folder
    # A run fits when its windows fit; the message of one that does not says what it needs.
    tiny = dataclasses.replace(definition.SECOND_QUICK_SIZES["S"], steps=2, batch_size=2, seq_len=64)
    corpus.check_fits(m["train_bytes"], [tiny])
    with pytest.raises(corpus.CorpusTooSmall, match=f"needs {definition.SECOND_SIZES['M'].tokens + 1:,} "
                                                    "training bytes"):
        corpus.check_fits(m["train_bytes"], [tiny, definition.SECOND_SIZES["M"]])


def test_a_sweep_fails_before_any_run_when_the_corpus_is_too_small(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text(_text(random.Random(2), 2000))
    assert cli.main(_sweep_args(small, tmp_path, "--tiers", "1", "--bundle", str(tmp_path / "b.json"))) == 2
    assert "training bytes to see no byte twice" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_plan_prints_every_run_with_tokens_and_minutes(corpus_dir, capsys):
    assert cli.main(["--edition", "2", "--plan", "--data", str(corpus_dir)]) == 0
    out = capsys.readouterr().out
    assert "10.82M parameters" in out and "29.17M parameters" in out
    for size, where in definition.MEASURED_TOKENS_PER_S.items():
        rate = definition.TOKENS_PER_S[size] / 1e6
        assert f"{size} {rate:.2f}M (" + (f"measured on {where})" if where else "PLACEHOLDER") in out
    assert "  tier 1: 36 runs, 7.08B tokens," in out and "  tier 2: 36 runs, 7.08B tokens," in out
    assert "  tier 3: 8 runs, 5.24B tokens," in out and "total: 80 runs, 19.40B tokens" in out
    assert "per GPU planned" in out and "NOT ENOUGH" in out  # the test corpus feeds no real run
    assert out.count("per GPU planned (measured,") == sum(definition.MEASURED_SIDE_BY_SIDE.values())
    assert "M__AdamW__lrS-best+1__seed0" in out and "S__Muon__lr0.05__seed0" in out


def test_plan_flags_a_throughput_not_measured_yet(corpus_dir, monkeypatch, capsys):
    monkeypatch.setitem(plan.MEASURED_TOKENS_PER_S, "M", None)
    monkeypatch.setitem(plan.MEASURED_SIDE_BY_SIDE, "S", False)
    assert cli.main(["--edition", "2", "--plan", "--data", str(corpus_dir)]) == 0
    out = capsys.readouterr().out
    assert f"M {definition.TOKENS_PER_S['M'] / 1e6:.2f}M (PLACEHOLDER, not measured)" in out
    assert "measure a placeholder with --mode throughput" in out
    assert out.count("1 run per GPU planned (not measured, definition.SIDE_BY_SIDE)") == 2


def test_plan_counts_each_size_on_its_corpus(first_bundle, tmp_path, capsys):
    first = json.loads(first_bundle.read_text())
    sweep = [r for r in first["runs"] if r["stage"] == "sweep" and r["optimizer"] == "AdamW"]
    elsewhere = tmp_path / "elsewhere.json"
    records.write_json(elsewhere, {**first, "runs": [{**r, "data": {**r["data"], "content_sha1": "f" * 40}}
                                                     for r in sweep]})
    plan_args = ["--edition", "2", "--quick", "--tiers", "1", "--optimizers", "AdamW", "--plan", "--resume"]
    assert cli.main(plan_args + [f"{first_bundle},{elsewhere}"]) == 0
    out = capsys.readouterr().out
    here = first["runs"][0]["data"]["content_sha1"][:12]
    assert f"0 runs to go ({len(first['runs'])} finished runs from --resume left out)" in out
    assert f"(most of its runs: tinyS {here}); 2 trained on another corpus count as not run" in out
    assert cli.main(plan_args + [str(elsewhere)]) == 0  # alone, the other corpus is the size's
    assert "1 runs to go (2 finished runs from --resume left out)" in capsys.readouterr().out


def test_measured_walls_are_an_optimizers_own_once_it_has_enough():
    """Muon's step costs far more than the others': a size's median wall would under-estimate its
    runs, so an optimizer's own straight runs set its estimate once there are MEASURED_WALLS."""
    def run(optimizer, wall, **extra):
        return {"size": "S", "optimizer": optimizer, "status": "ok", "wall_s": wall, **extra}
    others = [run("AdamW", w) for w in (70.0, 80.0, 90.0)]
    muon = [run("Muon", w) for w in (170.0, 180.0)] + [run("Muon", 1.0, resumed_at=[5000])]
    assert plan.measured_wall_s(others + muon, "S", "Muon") == 90.0  # 2 straight of its own: the size's
    assert plan.measured_wall_s(others + muon + [run("Muon", 200.0)], "S", "Muon") == 180.0
    assert plan.measured_wall_s(others + muon, "S", "AdamW") == 80.0
    assert plan.measured_wall_s(others, "S", "AdamW", lambda r: r["wall_s"] > 75) is None
    assert plan.measured_wall_s(others + [run("AdamW", 1e9, status="diverged")], "M", "AdamW") is None


def test_plan_estimates_runs_left_by_the_walls_of_finished_ones(first_bundle, tmp_path, capsys):
    first = json.loads(first_bundle.read_text())
    sweep = tmp_path / "sweep.json"
    records.write_json(sweep, {**first, "runs": [{**r, "wall_s": 60.0 if r["optimizer"] == "AdamW" else 600.0}
                                                 for r in first["runs"] if r["stage"] == "sweep"]})
    assert cli.main(["--edition", "2", "--quick", "--tiers", "1", "--plan", "--resume", str(sweep)]) == 0
    best_lr_lines = [line for line in capsys.readouterr().out.splitlines() if "__lrbest__" in line]
    assert best_lr_lines and all(line.endswith(" 5.50") for line in best_lr_lines)  # the median of 60 and 600


def test_transfer_takes_the_point_below_at_the_top_of_the_grid():
    grid = (1e-3, 2e-3, 4e-3)
    cells = plan.make_cells(dataclasses.replace(definition.SECOND, optimizers={
        "AdamW": dataclasses.replace(definition.SECOND.optimizers["AdamW"], lrs=grid)}), tiers=[3],
        optimizers=["AdamW"])
    sweep = [{"size": "S", "optimizer": "AdamW", "seed": 0, "stage": "sweep", "status": "ok", "lr": lr,
              "final_val_loss": loss} for lr, loss in zip(grid, (3.0, 2.0, 1.0))]
    best, above = cells[0].runs
    assert plan.resolve_lr(best, cells[0], sweep) == (4e-3, "")
    lr, note = plan.resolve_lr(above, cells[0], sweep)
    assert lr == 2e-3 and "end of the grid" in note
    assert plan.resolve_lr(above, cells[0], sweep[:2])[0] is None  # the sweep is not complete


def test_not_finished_counts_best_lr_runs_by_cell():
    runs = [plan.RunSpec("10M", "AdamW", 1e-3, 0, "sweep"),
            plan.RunSpec("10M", "AdamW", 2e-3, 0, "sweep"),
            plan.RunSpec("10M", "AdamW", None, 1, "best_lr", rule="best")]
    finished = [{"id": "10M__AdamW__lr0.001__seed0", "size": "10M", "optimizer": "AdamW", "seed": 0,
                 "stage": "sweep"},
                {"id": "10M__AdamW__lr0.002__seed1", "size": "10M", "optimizer": "AdamW", "seed": 1,
                 "stage": "best_lr"}]
    assert plan.not_finished(runs, finished) == [runs[1]]


def test_resume_refuses_a_missing_bundle(tmp_path):
    with pytest.raises(SystemExit):
        cli.parse_args(["--resume", str(tmp_path / "absent.json")])


def test_the_first_edition_still_runs(corpus_dir, tmp_path):
    bundle = tmp_path / "first_edition.json"
    args = ["--edition", "1", "--quick", "--device", "cpu", "--data", str(corpus_dir / "pkg" / "a.py"),
            "--optimizers", "AdamW", "--out", "", "--bundle", str(bundle)]
    assert cli.main(args) == 0
    saved = json.loads(bundle.read_text())
    assert len(saved["runs"]) == 3 and "edition" not in saved["meta"]
    assert all(r["status"] == "ok" and "edition" not in r for r in saved["runs"])


def _run(optimizer, lr, seed, ppl, size="s", status="ok"):
    return {"kind": "run", "id": records.run_id(size, optimizer, lr, seed), "size": size, "optimizer": optimizer,
            "lr": lr, "seed": seed, "stage": "sweep", "status": status, "error": None, "final_val_ppl": ppl,
            "final_val_loss": 0.0, "num_parameters": 1000, "val_loss": [[0, 1.0], [10, 0.5]],
            "train_loss": [[0, 1.0], [10, 0.5]], "wall_s": 1.0, "peak_mem_bytes": None, "magma_fused": False}


def test_summary_picks_the_best_lr_and_the_stable_range():
    ppls = {2.5e-4: 3.0, 5e-4: 3.2, 1e-3: 3.5, 2e-3: 9.0}  # edition 1's AdamW grid
    runs = [_run("AdamW", lr, seed, p + 0.01 * seed) for lr, p in ppls.items() for seed in (0, 1)]
    cell = summary.summarize(runs, definition.FIRST)["s"]["AdamW"]
    assert cell.best_lr == 2.5e-4 and cell.edge == "lowest" and cell.complete
    assert cell.near_best(0.10) == [2.5e-4, 5e-4]  # 3.5 is more than 10% above 3.005
    lines = "\n".join(page.ordering_statement(summary.summarize(runs, definition.FIRST), definition.FIRST))
    assert "AdamW 2 of 4 (0.00025 to 0.0005)" in lines
    # edition 2's grid has 7 learning rates, of which 0.0005 and 0.001 ran here
    second = summary.summarize(runs, definition.SECOND)["s"]["AdamW"]
    assert second.missing_lrs == [1e-4, 5e-3, 1e-2, 2e-2, 5e-2] and not second.complete
    lines = "\n".join(page.ordering_statement(summary.summarize(runs, definition.SECOND), definition.SECOND))
    assert "within 5% of each" in lines and "AdamW 1 of the 4 run so far (0.00025; grid incomplete)" in lines


def test_an_incomplete_sweep_is_not_judged_against_the_paper():
    """A relation with a side whose grid is not all run is 'not checked yet', with what is missing;
    the results table says of how many learning rates the best is the best."""
    grid = definition.SECOND.optimizers["AdamW"].lrs
    runs = [_run("AdamW", lr, 0, 3.0 + lr) for lr in grid] + [_run("Magma-Adam", lr, 0, 2.0) for lr in grid[:3]]
    summ = summary.summarize(runs, definition.SECOND)
    lines = "\n".join(page.ordering_statement(summ, definition.SECOND))
    assert "- Magma-Adam < AdamW: not checked yet (sweep incomplete: Magma-Adam lacks lr 0.005, 0.01, 0.02, " \
           "0.05; now 2.0000 vs 3.0001)." in lines
    assert "| s | Magma-Adam | 0.0001 (lowest of grid) (best of 3 of 7 lrs run) |" in "\n".join(page.results_table(summ))
    assert "partial grid" in "\n".join(page.paper_table(summ, definition.SECOND))


def test_report_page_lists_the_runs_the_paper_and_what_is_missing(first_bundle, tmp_path):
    pytest.importorskip("matplotlib")  # the report's plots; `make test` installs it
    page_path = tmp_path / "page.md"
    assert cli.report_main(["--inputs", str(first_bundle), "--page", str(page_path)]) == 0
    text = page_path.read_text()
    runs = json.loads(first_bundle.read_text())["runs"]
    assert text.startswith("# Convergence: Magma against AdamW, RMSProp, LaProp, SkipUpdate and Muon (edition 2)\n")
    assert f"{len(runs)} runs: {len(runs)} finished" in text
    assert "[0] at every lr; [1] at the best lr of seed 0" in text
    assert "| AdamW (Adam) | 30.79 (+0.0%) | 24.77 (+0.0%) |" in text
    assert "| Magma-Adam (Adam+Magma) | 29.09 (-5.5%)" in text
    assert "- Tier 1: 6 of 12 planned runs missing:" in text and "  - tinyS__RMSProp__lr0.001__seed0" in text
    assert "- Tier 3: 8 of 8 planned runs missing:" in text and "  - tinyM__AdamW__lrtinyS-best+1__seed0" in text
    assert "Training speed of the runs themselves" in text and "tokens/s per device" in text
    assert (tmp_path / "page" / "ppl_vs_lr.png").is_file()
    assert "![final validation perplexity against learning rate](page/ppl_vs_lr.png)" in text


def test_report_page_gives_each_skip_once(first_bundle, tmp_path):
    """A skipped planned run appears once, with its reason, among the missing runs; a skipped
    run outside the plan (another lr, say) keeps its line under "Runs"."""
    bundle = json.loads(first_bundle.read_text())
    planned, unplanned = "tinyS__RMSProp__lr0.001__seed0", "tinyS__RMSProp__lr0.3__seed0"
    bundle["skipped"] = [{"id": planned, "reason": "time budget: 0 s usable"},
                         {"id": unplanned, "reason": "time budget: 0 s usable"}]
    records.write_json(tmp_path / "b.json", bundle)
    study = records.load_study([str(tmp_path / "b.json")])
    text = page.build_page(study, summary.summarize(study.runs, definition.SECOND), ["--inputs", "x"], {},
                           edition=definition.SECOND)
    assert text.count(planned) == 1 and f"  - {planned} (skipped: time budget: 0 s usable)" in text
    assert f"- {unplanned}: skipped: time budget: 0 s usable" in text
    assert "2 skipped (the planned ones are listed below with the missing runs)." in text


def test_throughput_table_gives_the_fastest_optimizer_step_beside_the_median():
    row = {"opt_step_ms_median": 0.7056, "opt_step_ms_min": 0.1292}
    assert page.opt_step_ms(row) == "0.706 (0.129)"
    assert page.opt_step_ms({"opt_step_ms_median": 0.7056}) == "0.706"  # older records lack the minimum


def test_records_round_trip_a_bundle(tmp_path):
    meta = {"command": "python benchmarks/convergence.py", "date": "2026-01-01 00:00 UTC", "mode": "sweep",
            "shard": 1, "num_shards": 1, "optimizers": {"AdamW": {"lrs": [1e-3, 2e-3], "description": "d"}}}
    runs = [_run("AdamW", 1e-3, 0, 3.0), _run("AdamW", 2e-3, 0, 3.5), _run("AdamW", 4e-3, 0, None, status="diverged")]
    failed = _run("AdamW", 8e-3, 0, None, status="error")
    throughput = {"kind": "throughput", "size": "s", "optimizer": "AdamW", "date": meta["date"], "tokens_per_s": 1.0}
    skipped = {"id": records.run_id("s", "AdamW", None, 1), "reason": "time budget"}
    writer = records.RecordWriter(tmp_path / "out", tmp_path / "bundle.json", meta)
    for r in runs + [failed]:
        writer.add("runs", r, f"{r['id']}.json")
    writer.add("throughput", throughput, records.throughput_filename("s", "AdamW"))
    writer.add("skipped", skipped)

    bundle = json.loads((tmp_path / "bundle.json").read_text())
    assert bundle == {"kind": "bundle", "meta": meta, "runs": runs + [failed], "throughput": [throughput],
                      "skipped": [skipped]}
    assert records.load_finished([tmp_path / "bundle.json"]) == runs  # a diverged run is finished, an error not
    loaded = records.load_study([str(tmp_path / "bundle.json")])
    assert (loaded.runs, loaded.throughput, loaded.metas, loaded.skipped) == (runs + [failed], [throughput], [meta],
                                                                               [skipped])
    # The folder of per-run files and the bundle together: every record once, the meta from both.
    both = records.load_study([str(tmp_path / "out"), str(tmp_path / "bundle.json")])
    assert sorted(r["id"] for r in both.runs) == sorted(r["id"] for r in runs + [failed])
    assert both.throughput == [throughput] and both.metas == [meta, meta]
    assert records.merged_meta(both.metas, "optimizers") == meta["optimizers"]
    assert records.edition_of(both.metas, both.runs) == 1
    with pytest.raises(ValueError, match="editions"):
        records.edition_of([meta, {"edition": 2}], [])


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


def test_a_run_skipped_by_several_invocations_counts_once_with_the_newest_reason(tmp_path):
    """Files named against their dates (an H200 bundle sorts after an H100 one) still give the
    newest invocation's reason, once per run, and the page counts each skipped run once."""
    run = records.run_id("s", "AdamW", 2e-3, 0)
    dates = {"z_old.json": "2026-01-01 00:00 UTC", "a_new.json": "2026-01-03 00:00 UTC",
             "m_mid.json": "2026-01-02 00:00 UTC"}
    for name, date in dates.items():
        records.write_json(tmp_path / name, {"kind": "bundle", "meta": {"mode": "sweep", "date": date},
                                             "runs": [_run("AdamW", 1e-3, 0, 3.0)], "throughput": [],
                                             "skipped": [{"id": run, "reason": f"budget of {date}"}]})
    for order in (sorted(dates), sorted(dates, reverse=True)):
        study = records.load_study([str(tmp_path / name) for name in order])
        assert study.skipped == [{"id": run, "reason": "budget of 2026-01-03 00:00 UTC"}]
    assert page.run_status_lines(study, set())[0] == "1 runs: 1 finished, 0 diverged, 0 failed; 1 skipped."


def _on(corpus: str, record: dict, date: str = "2026-01-01 00:00 UTC") -> dict:
    return {**record, "date": date, "data": {"content_sha1": corpus, "files": 3}, "env": {"device_name": "GPU"}}


def test_a_study_counts_only_the_runs_on_its_corpus(tmp_path):
    """Runs on another corpus (another machine image) have another validation set: the study
    keeps the corpus most runs trained on, whatever the order of the inputs, and sets the rest
    aside, their set-ups and skips too; the page says which and why."""
    main = [_on("a" * 40, _run("AdamW", lr, 0, 3.0 + lr)) for lr in (1e-3, 2e-3, 4e-3)]
    other = [_on("b" * 40, _run("AdamW", 1e-3, 0, 2.0), "2026-02-01 00:00 UTC"),
             _on("b" * 40, _run("AdamW", 8e-3, 0, 2.5), "2026-02-01 00:00 UTC")]
    bundles = {"1.json": ("b" * 40, other, [{"id": "x", "reason": "time budget"}]), "2.json": ("a" * 40, main, [])}
    for name, (corpus_sha1, runs, skipped) in bundles.items():
        meta = {"mode": "sweep", "date": runs[0]["date"], "data": {"content_sha1": corpus_sha1}}
        records.write_json(tmp_path / name, {"kind": "bundle", "meta": meta, "runs": runs, "throughput": [],
                                             "skipped": skipped})
    for order in (["1.json", "2.json"], ["2.json", "1.json"]):
        study = records.load_study([str(tmp_path / name) for name in order])
        assert study.corpora == {"s": "a" * 40} and study.runs == main and study.other_corpus_runs == other
        assert [m["data"]["content_sha1"] for m in study.metas] == ["a" * 40] and study.skipped == []
    lines = "\n".join(page.left_out_lines(study))
    assert "2 runs trained on another corpus (content SHA-1 bbbbbbbbbbbb, 3 files; GPU" in lines
    assert "s__AdamW__lr0.001__seed0, s__AdamW__lr0.008__seed0" in lines
    # With as many runs on each, the corpus used last is the study's; each size has its own.
    larger = [_on("c" * 40, _run("AdamW", 1e-3, 0, 3.0, size="m"))]
    assert records.study_corpora(main[:2] + other + larger) == {"s": "b" * 40, "m": "c" * 40}
    no_corpus = _run("AdamW", 1e-3, 1, 3.0)
    assert records.on_corpora(main + larger + [no_corpus], {"s": "b" * 40}) == (larger + [no_corpus], main)


def test_resume_runs_again_what_trained_on_another_corpus(corpus_dir, first_bundle, tmp_path, capsys):
    """A size whose --resume runs trained on another corpus (another machine image) is refused,
    unless --switch-corpus; runs on a size's minority corpus are run again."""
    first = json.loads(first_bundle.read_text())
    here = first["runs"][0]["data"]["content_sha1"]
    elsewhere = tmp_path / "elsewhere.json"
    records.write_json(elsewhere, {**first, "runs": [{**r, "data": {**r["data"], "content_sha1": "f" * 40}}
                                                     for r in first["runs"]]})
    again = tmp_path / "again.json"
    args = _sweep_args(corpus_dir, tmp_path, "--tiers", "1", "--optimizers", "AdamW", "--bundle", str(again),
                       "--resume", str(elsewhere))
    assert cli.main(args) == 2 and not again.exists()
    assert (f"error: the --resume runs of size tinyS trained on corpus ffffffffffff, but this machine builds "
            f"{here[:12]}") in capsys.readouterr().err
    assert cli.main(args + ["--switch-corpus"]) == 0
    assert "6 --resume records trained on another corpus than their size's (ffffffffffff)" in capsys.readouterr().out
    rerun = json.loads(again.read_text())["runs"]
    assert sorted(r["id"] for r in rerun) == sorted(r["id"] for r in first["runs"] if r["optimizer"] == "AdamW")
    assert {r["data"]["content_sha1"] for r in rerun} == {here}
    # This corpus's records (the first bundle's and the rerun's) outnumber the others: nothing to run.
    args[-1] = f"{first_bundle},{elsewhere},{again}"
    assert cli.main(args) == 0 and json.loads(again.read_text())["runs"] == []


def test_a_best_lr_run_at_a_former_best_is_stale():
    """A best-lr run stands only while its lr is its sweep's best: once the sweep is complete
    and its best is another lr, the run is stale (run again, left off the page)."""
    cells = plan.make_cells(definition.SECOND, tiers=[1], optimizers=["AdamW"])
    grid = cells[0].lrs
    sweep = [dict(_run("AdamW", lr, 0, 3.0), size="S", final_val_loss=1.0 + abs(lr - 1e-3)) for lr in grid]
    at = {lr: dict(_run("AdamW", lr, 1, 3.0), size="S", stage="best_lr", lr_rule="best") for lr in (1e-3, 5e-3)}
    keep, stale = plan.split_stale(sweep + list(at.values()), cells)
    assert stale == [at[5e-3]] and keep == sweep + [at[1e-3]]
    assert plan.split_stale(sweep[1:] + [at[5e-3]], cells) == (sweep[1:] + [at[5e-3]], [])  # sweep incomplete
    runs = [r for r in plan.shard_runs(cells) if r.stage == "best_lr"]
    assert plan.not_finished(runs, keep) == [runs[1]] and plan.not_finished(runs, sweep + [at[5e-3]]) == [runs[1]]


def test_a_best_lr_seed_fills_no_gap_of_the_sweep():
    grid = definition.SECOND.optimizers["AdamW"].lrs
    runs = [_run("AdamW", lr, 0, 3.0) for lr in grid[1:]] + [dict(_run("AdamW", grid[0], 1, 3.0), stage="best_lr")]
    assert summary.summarize(runs, definition.SECOND)["s"]["AdamW"].missing_lrs == [grid[0]]


def _lion_study(edition) -> records.Study:
    meta = {"mode": "sweep", "date": "2026-01-01 00:00 UTC", "shard": 1, "num_shards": 1, "betas": [0.9, 0.95],
            "weight_decay": 0.1, "optimizers": {name: {"lrs": [1e-3, 2e-3], "description": r.description}
                                                for name, r in edition.optimizers.items()}}
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
    """An optimizer added to an edition and its tiers reaches the title, the tables, the fused
    column, the plots' colours, the command line and the plan, and the paper's claim is the
    edition's, without a change to their code."""
    lion = definition.Recipe("Lion", (1e-3, 2e-3), "a sign-based optimizer (test recipe)", "lion",
                             color="tab:purple", fused="none", fused_note="torch Lion")
    first = definition.FIRST
    adamw = dataclasses.replace(first.optimizers["AdamW"], lrs=(1e-3, 2e-3))  # the grid the study ran
    edition = dataclasses.replace(
        first, optimizers={**first.optimizers, "AdamW": adamw, "Lion": lion},
        quick_tiers=(dataclasses.replace(first.quick_tiers[0], optimizers=("Lion",)),),
        paper=definition.PaperClaim("Lion < AdamW", (("Lion", "AdamW"),), "claimed wider for Lion",
                                    "Not the paper's data (test)."))
    monkeypatch.setitem(definition.EDITIONS, 1, edition)
    study = _lion_study(edition)
    summ = summary.summarize(study.runs, edition)
    assert list(summ["s"]) == ["AdamW", "Lion"]  # the edition's order, Lion last
    text = page.build_page(study, summ, ["--inputs", "x"], {}, edition=edition)
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
    assert plots.color("Lion", edition) == "tab:purple"
    assert "Lion" in cli.parse_args(["--edition", "1", "--optimizers", "Lion"]).optimizer_names
    cells = plan.make_cells(edition, quick=True)
    assert [r.run_id for r in cells[0].runs] == ["tiny__Lion__lr0.001__seed0", "tiny__Lion__lr0.002__seed0",
                                                 "tiny__Lion__lrbest__seed1"]


@pytest.mark.parametrize("name,edition_number,counts", [("convergence", 1, (63, 2, 0)), ("convergence2", 2, (80, 16, 2))])
def test_committed_page_is_what_the_committed_records_give(name, edition_number, counts):
    """Each edition's committed bundles still load, and the page built from them is the
    committed one, but for the time it was generated: neither was edited by hand or left behind
    its records."""
    study, edition, summ = report.load_report([str(RESULTS / name)])
    assert edition is definition.edition(edition_number)
    assert (len(study.runs), len(study.throughput), len(study.stale_runs)) == counts
    argv = ["--inputs", f"benchmarks/results/{name}/", "--page", f"benchmarks/results/{name}.md"]
    figures = {"val_curves": f"{name}/val_curves.png", "ppl_vs_lr": f"{name}/ppl_vs_lr.png"}
    built = page.build_page(study, summ, argv, figures, edition=edition).splitlines()
    committed = (RESULTS / f"{name}.md").read_text().splitlines()
    generated = [i for i, line in enumerate(committed) if line.startswith("Page generated ")]
    assert generated and [line for i, line in enumerate(built) if i not in generated] == \
        [line for i, line in enumerate(committed) if i not in generated]


# Each module's layer: a module imports only modules of lower layers (imports run one way).
LAYERS = {"definition": 0, "records": 0, "summary": 1, "environment": 1, "optimizers": 1, "plan": 1, "corpus": 1,
          "trainer": 2, "plots": 2, "page": 2, "sweep": 3, "throughput": 3, "report": 3, "cli": 4, "__main__": 5,
          "__init__": 5}


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


def test_lrs_keeps_only_the_sweep_runs_at_those_learning_rates(corpus_dir, capsys):
    assert cli.main(["--edition", "2", "--plan", "--tiers", "1", "--lrs", "0.001,5e-3", "--data", str(corpus_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Edition 2 of the convergence study: 8 runs to go.")
    planned = [line.split()[0] for line in out.splitlines() if line.startswith("  S__")]
    assert sorted(planned) == sorted(f"S__{name}__lr{lr}__seed0" for name in ("AdamW", "Magma-Adam", "RMSProp",
                                                                           "Magma-RMSProp")
                                     for lr in ("0.001", "0.005"))
    with pytest.raises(SystemExit):
        cli.main(["--edition", "2", "--plan", "--lrs", "fast"])


def test_corpus_suffixes_choose_the_default_corpus_files(tmp_path, monkeypatch, capsys):
    tree = tmp_path / "python"
    files = _tree(tree)
    monkeypatch.setattr(corpus, "python_roots", lambda: [tree.resolve()])
    built = corpus.build(None, tmp_path / "cache", suffixes=(".py", ".json"), log=lambda _: None)
    m = built.manifest
    assert m["suffixes"] == [".py", ".json"] and m["files"] == 2  # a.py and e.json; the copy of a.py dropped
    assert m["bytes"] == len(files["pkg/a.py"]) + len(files["pkg/e.json"])
    assert built.folder != corpus.build(None, tmp_path / "cache", log=lambda _: None).folder
    with pytest.raises(ValueError, match="--corpus-suffixes"):
        corpus.list_files(None, (), ("py",))
    with pytest.raises(SystemExit):
        cli.main(["--edition", "2", "--plan", "--corpus-suffixes", "py,h"])
    with pytest.raises(SystemExit):
        cli.main(["--edition", "2", "--plan", "--corpus-suffixes", ".py", "--data", str(tree)])
    assert "--corpus-suffixes" in capsys.readouterr().err


def _throughput_row(optimizer, when, tokens_per_s, opt_median, opt_min, windows):
    return {"kind": "throughput", "size": "S", "optimizer": optimizer, "magma_fused": optimizer != "AdamW",
            "env": {"device": "cuda:0", "device_name": "GPU"}, "num_parameters": 1e7, "batch_size": 2, "seq_len": 8,
            "dtype": "bfloat16", "warmup_steps": 1, "repeats": len(windows), "timed_steps": 2,
            "opt_step_timer": "cuda events", "date": when, "measurement": when, "tokens_per_s": tokens_per_s,
            "step_ms": sorted(windows)[len(windows) // 2], "step_ms_windows": windows,
            "opt_step_ms_median": opt_median, "opt_step_ms_min": opt_min, "state_bytes": 2**20,
            "peak_mem_bytes": None}


def test_throughput_table_compares_only_rows_measured_together_and_flags_disturbed_ones():
    old, new = "2026-01-01 00:00 UTC", "2026-02-01 00:00 UTC"
    rows = [_throughput_row("AdamW", old, 100.0, 0.2, 0.19, [1.0]),
            _throughput_row("Magma-Adam", old, 50.0, 0.1, 0.09, [2.0]),
            _throughput_row("AdamW", new, 80.0, 0.5, 0.2, [1.0, 1.5, 2.0]),
            _throughput_row("Magma-Adam", new, 60.0, 0.15, 0.1, [1.2, 1.3, 1.4])]
    lines = page.throughput_table(rows, definition.SECOND)
    headers = [i for i, line in enumerate(lines) if line.startswith("Model S")]
    assert len(headers) == 2 and new in lines[headers[0]] and old in lines[headers[1]]  # the newest first
    first, second = lines[headers[0]:headers[1]], lines[headers[1]:]
    assert any(line.startswith("| Magma-Adam |") and "| 0.750x |" in line and "| 1.30 [1.20, 1.40] |" in line
               for line in first)
    assert any(line.startswith("| AdamW |") and "| 1.50 [1.00, 2.00] |" in line for line in first)
    assert any(line.startswith("| Magma-Adam |") and "| 0.500x |" in line and "| 2.00 |" in line for line in second)
    disturbed = [line for line in lines if line.startswith("Disturbed")]
    assert len(disturbed) == 1 and "for AdamW." in disturbed[0] and disturbed[0] in first
    # Records older than the "measurement" field fall back to their own date.
    legacy = [{k: v for k, v in r.items() if k != "measurement"} for r in rows]
    assert page.throughput_table(legacy, definition.SECOND) == lines


def test_run_speeds_compare_optimizers_only_on_the_same_kind_of_device():
    """A study whose runs of one size ran on two kinds of card gives a row per device, each
    against the reference's runs on that device; a run without a device name counts as unknown."""
    def timed(optimizer, device, tokens_per_s):
        env = {"device_name": device} if device else {}
        return {**_run(optimizer, 1e-3, 0, 3.0), "tokens_per_s": tokens_per_s, "env": env}
    runs = [timed("AdamW", "H200", 200.0), timed("AdamW", "H100", 100.0), timed("Magma-Adam", "H100", 110.0),
            timed("Magma-Adam", "H200", 190.0), timed("Magma-Adam", None, 50.0)]
    lines = page.run_speed_table(records.Study(runs=runs), definition.SECOND)
    rows = [line for line in lines if line.startswith("| s |")]
    assert "| s | Magma-Adam | 1 | 1 | H100 | 110 [110, 110] | 1.100x |" in rows
    assert "| s | Magma-Adam | 1 | 1 | H200 | 190 [190, 190] | 0.950x |" in rows
    assert "| s | Magma-Adam | 1 | 1 | unknown | 50 [50, 50] | n/a |" in rows
    assert "| s | AdamW | 1 | 1 | H100 | 100 [100, 100] | 1.000x |" in rows and len(rows) == 5


def test_a_final_evaluation_on_another_sample_is_not_joined_to_the_curve():
    """Edition 2's last evaluation uses more batches (another sample of the validation split)
    than the periodic ones, so the plot marks it apart; runs without those fields, or whose
    final evaluation is the periodic one, are plotted as one line."""
    run = _run("AdamW", 1e-3, 0, 3.0)
    assert plots.final_evaluation_apart([{**run, "eval_batches": 8, "final_eval_batches": 32}]) == (32, 8)
    assert plots.final_evaluation_apart([{**run, "eval_batches": 8, "final_eval_batches": None}]) is None
    assert plots.final_evaluation_apart([{**run, "eval_batches": 8, "final_eval_batches": 8}]) is None
    assert plots.final_evaluation_apart([run]) is None


def test_provenance_lists_each_command_once_in_the_order_it_first_ran():
    """Commands come from bundles' metas and from records; a command that names an earlier
    bundle in --resume sorts by when it ran, not by its text, and an undated one comes last."""
    def meta(command, date):
        return {"command": command, "date": date} if date else {"command": command}
    study = records.Study(
        metas=[meta("z first", "2026-12-03 09:00 UTC"), meta("c third", "2026-12-06 14:30 UTC"),
               meta("b undated", None), meta("a second", "2026-12-06 13:05 UTC")],
        runs=[{**_run("AdamW", 1e-3, 0, 3.0), "command": "z first", "date": "2026-12-07 10:00 UTC"},
              {**_run("AdamW", 5e-3, 0, 3.0), "command": "y own record", "date": "2026-12-06 13:05 UTC"}])
    assert page.commands_in_order(study) == ["z first", "a second", "y own record", "c third", "b undated"]


def test_run_speed_ratios_within_the_spread_of_runs_are_marked():
    """A ratio whose runs' range overlaps the reference's is marked, and the page states the
    widest spread of one optimizer's runs on one device; single runs have no range to judge."""
    def timed(optimizer, tokens_per_s):
        return {**_run(optimizer, 1e-3, 0, 3.0), "tokens_per_s": tokens_per_s, "env": {"device_name": "H200"}}
    runs = [timed("AdamW", 100.0), timed("AdamW", 140.0), timed("Magma-Adam", 90.0), timed("Magma-Adam", 110.0),
            timed("RMSProp", 200.0), timed("RMSProp", 210.0), timed("Muon", 120.0)]
    lines = page.run_speed_table(records.Study(runs=runs), definition.SECOND)
    rows = {line.split(" | ")[1]: line for line in lines if line.startswith("| s |")}
    assert rows["Magma-Adam"].endswith("| 0.833x (overlaps) |")
    assert rows["RMSProp"].endswith("| 1.708x |") and rows["Muon"].endswith("| 1.000x |")
    assert rows["AdamW"].endswith("| 1.000x |")
    spread = [line for line in lines if line.startswith("Runs of one optimizer")]
    assert len(spread) == 1 and "up to 1.40x (AdamW at s on H200)" in spread[0]
    assert spread[0].endswith("says nothing about the optimizers.")  # no end-to-end table to point to
