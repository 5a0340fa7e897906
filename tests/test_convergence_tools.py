"""benchmarks/study (benchmarks/convergence.py and its report): the committed page against its
records, a tiny sweep on the CPU and the next invocation going on from it, a run stopped and
taken up again from its checkpoint, a run that reads its corpus twice, tier 5 (size L) over
several invocations, the corpus builder, the plan, the records, the page with its gap by size,
and the package's layering."""

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
EDITION = definition.EDITION
WORDS = ["def", "class", "return", "import", "self", "x", "(", ")", ":", "\n", "    ", "#", "value"]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine the threads wait for each
    other: one thread runs the CPU sweeps several times faster there."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def _sweep_args(data: Path, tmp: Path, *extra: str) -> list[str]:
    return ["--quick", "--data", str(data), "--work-dir", str(tmp / "work"), *extra]


@pytest.fixture(scope="module")
def first_bundle(corpus_dir, tmp_path_factory) -> Path:
    """Tier 1 of the quick study for AdamW and Magma-Adam, on the CPU."""
    tmp = tmp_path_factory.mktemp("runs")
    bundle = tmp / "first.json"
    assert cli.main(_sweep_args(corpus_dir, tmp, "--tiers", "1", "--bundle", str(bundle))) == 0
    return bundle


# ---------------------------------------------------------------------------- the committed page


def test_committed_page_is_what_the_committed_records_give():
    """The committed bundles still load, and the page built from them is the committed one, but
    for the time it was generated: neither was edited by hand or left behind its records."""
    study, edition, summ = report.load_report([str(RESULTS / "convergence2")])
    assert (len(study.runs), len(study.throughput), len(study.stale_runs)) == (80, 16, 2)
    argv = ["--inputs", "benchmarks/results/convergence2/", "--page", "benchmarks/results/convergence2.md"]
    figures = {name: f"convergence2/{name}.png" for name in ("val_curves", "ppl_vs_lr", "gap_vs_size")}
    built = page.build_page(study, summ, argv, figures, edition=edition).splitlines()
    committed = (RESULTS / "convergence2.md").read_text().splitlines()
    generated = [i for i, line in enumerate(committed) if line.startswith("Page generated ")]
    assert generated and [line for i, line in enumerate(built) if i not in generated] == \
        [line for i, line in enumerate(committed) if i not in generated]


def test_edition_1_records_are_refused_with_where_its_code_went():
    with pytest.raises(ValueError, match="edition 1.*removed after commit 30d8086"):
        records.load_study([str(RESULTS / "convergence")], EDITION.number)


# ---------------------------------------------------------------------------- sweeps on the CPU


def test_tiny_sweep_records_every_planned_run(first_bundle):
    bundle = json.loads(first_bundle.read_text())
    assert len(bundle["runs"]) == len(bundle["meta"]["planned_runs"]) == 6 and not bundle["skipped"]
    assert bundle["meta"]["edition"] == 2 and bundle["meta"]["aggregate"]["tokens_trained"] > 0
    assert {r["optimizer"] for r in bundle["runs"]} == {"AdamW", "Magma-Adam"}
    for r in bundle["runs"]:
        assert r["status"] == "ok" and r["final_val_ppl"] > 1 and r["edition"] == 2 and r["tier"] == 1
        assert len(r["val_loss"]) >= 2 and len(r["train_loss"]) >= 2 and r["tokens_per_s"] > 0
        assert r["data"]["content_sha1"] and r["data"]["file_list_sha1"] and r["data"]["files"] == 5
        assert r["passes"] < 1 and r["env"]["device"] == "cpu" and r["dtype"] == "float32"
    for r in (r for r in bundle["runs"] if r["stage"] == "best_lr"):
        assert r["lr"] == plan.best_lr(bundle["runs"], r["size"], r["optimizer"], 0) and r["lr_rule"] == "best"


def test_resume_runs_only_tier_3_at_the_lrs_tier_1_chose(corpus_dir, first_bundle, tmp_path):
    """Tier 1 is in the earlier bundle: only tier 3 runs, at AdamW's tier-1 best lr and the grid
    point on its other side."""
    second = tmp_path / "second.json"
    args = _sweep_args(corpus_dir, tmp_path, "--tiers", "1,3", "--optimizers", "AdamW", "--bundle", str(second),
                       "--resume", str(first_bundle))
    assert cli.main(args) == 0
    first = json.loads(first_bundle.read_text())["runs"]
    new = json.loads(second.read_text())["runs"]
    assert len(new) == 2 and {r["stage"] for r in new} == {"transfer"}
    grid = EDITION.lrs(EDITION.optimizers["AdamW"], quick=True)
    best = plan.best_lr(first, "tinyS", "AdamW", 0)
    assert {r["lr_rule"]: r["lr"] for r in new} == {"tinyS-best": best,
                                                    "tinyS-best+1": next(lr for lr in grid if lr != best)}


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
    assert records.load_study([str(cut), str(rest)], 2).skipped == []  # the best-lr run too, skipped by its rule


def test_a_sweep_refuses_a_size_whose_resume_runs_trained_on_another_corpus(corpus_dir, first_bundle, tmp_path,
                                                                            capsys):
    first = json.loads(first_bundle.read_text())
    elsewhere = tmp_path / "elsewhere.json"
    records.write_json(elsewhere, {**first, "runs": [{**r, "data": {**r["data"], "content_sha1": "f" * 40}}
                                                     for r in first["runs"]]})
    bundle = tmp_path / "b.json"
    args = _sweep_args(corpus_dir, tmp_path, "--tiers", "1", "--bundle", str(bundle), "--resume", str(elsewhere))
    assert cli.main(args) == 2 and not bundle.exists()
    here = first["runs"][0]["data"]["content_sha1"][:12]
    assert f"trained on corpus ffffffffffff, but this machine builds {here}" in capsys.readouterr().err


def test_tier_5_runs_at_the_s_best_lrs_over_several_invocations_reading_its_corpus_again(
        corpus_dir, first_bundle, tmp_path, monkeypatch):
    """Tier 5 (L) as the quick study has it: each optimizer at the lr its tinyS sweep chose,
    stopped by the budget of one invocation and finished by the next from its checkpoint, both
    reading the same windows in the same order, more than once; the page's gap table then has
    the size, its passes and the tier still missing."""
    from benchmarks.study import sweep

    monkeypatch.setattr(sweep, "STOP_MARGIN_S", 0.0)
    monkeypatch.setattr(sweep, "MIN_LAUNCH_S", -1e9)
    args = _sweep_args(corpus_dir, tmp_path, "--tiers", "5")
    cut, rest = tmp_path / "cut.json", tmp_path / "rest.json"
    assert cli.main(args + ["--time-budget-s", "0.001", "--resume", str(first_bundle), "--bundle", str(cut)]) == 0
    assert [s["reason"].split(";")[0] for s in json.loads(cut.read_text())["skipped"]] == [
        "stopped at step 1 of 40 by the time budget"] * 2
    assert cli.main(args + ["--resume", f"{first_bundle},{cut}", "--bundle", str(rest)]) == 0
    runs = {r["optimizer"]: r for r in json.loads(rest.read_text())["runs"]}
    first = json.loads(first_bundle.read_text())["runs"]
    for name, r in runs.items():
        assert (r["size"], r["stage"], r["lr_rule"], r["tier"]) == ("tinyL", "transfer", "tinyS-best", 5)
        assert r["lr"] == plan.best_lr(first, "tinyS", name, 0) and r["resumed_at"] == [1]
        assert 1 < r["passes"] < 2 and r["status"] == "ok"
    assert runs["AdamW"]["window_order_sha1"] == runs["Magma-Adam"]["window_order_sha1"]

    study, edition, summ = report.load_report([str(first_bundle), str(cut), str(rest)])
    text = page.build_page(study, summ, ["--inputs", "x"], {}, edition=edition)
    label = f"tinyL ({runs['AdamW']['passes']:.2f} passes)"
    assert f"| {label} | AdamW | {runs['AdamW']['lr']:g} |" in text and "- Tier 5: all 2 planned runs are in." in text
    gaps = page.gap_lines(study, summ, edition, {})
    assert "| tinyM | not run yet (tier 3) | 0.01M | | | | |" in gaps
    row = next(line for line in gaps if line.startswith(f"| {label} | "))
    assert f"| {runs['AdamW']['passes']:.2f} |" in row and row in text


def test_a_checkpoint_outlives_a_new_estimate_of_its_size():
    """Measuring a size's tokens/s between two calls must not restart its runs: the checkpoint's
    key ignores the plan's estimates, not what the run trains."""
    from benchmarks.study.trainer import RunJob, checkpoint_key

    size, recipe = EDITION.sizes["L"], EDITION.optimizers["AdamW"]
    key = checkpoint_key(RunJob("r", size, 1e-3, 0, 0.1, "sha"), recipe)
    remeasured = dataclasses.replace(size, tokens_per_s=0.9e6, setup_s=45.0)
    assert checkpoint_key(RunJob("r", remeasured, 1e-3, 0, 0.1, "sha"), recipe) == key
    shorter = dataclasses.replace(size, steps=size.steps - 1)
    assert checkpoint_key(RunJob("r", shorter, 1e-3, 0, 0.1, "sha"), recipe) != key


@pytest.mark.parametrize("argv,message", [
    (["--tiers", "1", "--data", "{small}", "--bundle", "{tmp}/b.json"], "to see no byte twice"),
    (["--tiers", "1,3", "--bundle", "{tmp}/b.json"], "train on different corpora"),
])
def test_a_sweep_fails_before_any_run(tmp_path, capsys, argv, message):
    small = tmp_path / "small.txt"
    small.write_text(_text(random.Random(2), 2000))
    args = [a.format(small=small, tmp=tmp_path) for a in argv] + ["--work-dir", str(tmp_path / "work")]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "b.json").exists()


def test_throughput_times_every_optimizer(tmp_path):
    bundle = tmp_path / "tp.json"
    assert cli.main(["--quick", "--mode", "throughput", "--size", "S", "--repeats", "1", "--bundle", str(bundle)]) == 0
    rows = json.loads(bundle.read_text())["throughput"]
    assert [r["optimizer"] for r in rows] == list(EDITION.quick_optimizers)
    assert all(r["size"] == "tinyS" and r["tokens_per_s"] > 0 and r["opt_step_ms_min"] > 0 for r in rows)
    assert page.throughput_table(rows, EDITION)[0].startswith("Model tinyS")


@pytest.mark.parametrize("argv,message", [
    (["--tiers", "1"], "--bundle is needed"),
    (["--plan", "--tiers", "9"], "there are tiers [1, 2, 3, 4, 5], not [9]"),
    (["--plan", "--optimizers", "Adam"], "unknown ['Adam']"),
    (["--mode", "throughput", "--bundle", "b.json"], "--mode throughput needs --size"),
    (["--plan", "--resume", "absent.json"], "no such file(s) ['absent.json']"),
])
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------- one run


def _data(corpus_root: Path, cache: Path):
    import torch

    from benchmarks.study.trainer import load_split

    built = corpus.build(str(corpus_root), cache, log=lambda _: None)
    return built, (load_split(str(built.train_path), torch.device("cpu")),
                   load_split(str(built.val_path), torch.device("cpu")))


@pytest.mark.parametrize("optimizer", ["Magma-Adam", "Muon"])
def test_a_run_taken_up_from_its_checkpoint_ends_as_a_straight_run(corpus_dir, tmp_path, optimizer):
    import torch

    from benchmarks.study.trainer import RunJob, train_run

    built, data = _data(corpus_dir, tmp_path / "cache")
    size = dataclasses.replace(EDITION.quick_sizes["S"], steps=12, evals=3)
    recipe = EDITION.optimizers[optimizer]

    def job(**kw) -> RunJob:
        return RunJob("r", size, recipe.lrs[3], 0, 0.1, built.manifest["content_sha1"], **kw)

    cpu, quiet = torch.device("cpu"), (lambda _: None)
    straight = train_run(job(), recipe, *data, cpu, log=quiet)
    ckpt = tmp_path / "ckpt"
    stopped = train_run(job(checkpoint_dir=str(ckpt), stop_at=0.0), recipe, *data, cpu, log=quiet)
    assert stopped["stopped_at"] == 1 and (ckpt / "r.pt").is_file()
    resumed = train_run(job(checkpoint_dir=str(ckpt)), recipe, *data, cpu, log=quiet)
    assert resumed["resumed_at"] == [1] and not (ckpt / "r.pt").exists()
    for key in ("final_val_loss", "val_loss", "train_loss", "final_train_loss"):
        assert resumed[key] == straight[key], key


def test_a_size_that_allows_two_passes_reads_a_short_corpus_again(tmp_path):
    """Size L's runs read more tokens than M's corpus holds: a second pass, in a new order, where
    the size allows it; the record says how often, and a size that allows one pass refuses."""
    import torch

    from benchmarks.study.trainer import RunJob, train_run, window_order

    first = window_order(10, 10, seed=3)
    assert sorted(first.tolist()) == list(range(10))
    twice = window_order(10, 17, seed=3)
    assert twice[:10].tolist() == first.tolist() and len(set(twice[10:].tolist())) == 7  # a pass without repeats

    short = tmp_path / "short.txt"
    short.write_text(_text(random.Random(4), 2000))  # about 10 KB: ~150 windows of 64, the run reads 192
    built, data = _data(short, tmp_path / "cache")
    once = EDITION.quick_sizes["S"]
    assert definition.SIZES["L"].max_passes == 2 and once.max_passes == 1
    with pytest.raises(corpus.CorpusTooSmall, match="to see no byte twice"):
        corpus.check_fits(built.train_bytes, [once])
    twice_allowed = dataclasses.replace(once, max_passes=2)
    corpus.check_fits(built.train_bytes, [twice_allowed])
    result = train_run(RunJob("r", twice_allowed, 1e-3, 0, 0.1), EDITION.optimizers["AdamW"], *data,
                       torch.device("cpu"), log=lambda _: None)
    assert 1 < result["passes"] < 2 and result["passes"] == corpus.passes(built.train_bytes, twice_allowed)
    with pytest.raises(ValueError, match="more than 1 pass"):
        train_run(RunJob("r", once, 1e-3, 0, 0.1), EDITION.optimizers["AdamW"], *data, torch.device("cpu"))


# ---------------------------------------------------------------------------- the corpus


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
    # The same files give the same build, found again; a changed file or other suffixes give another.
    assert corpus.build(None, tmp_path / "cache", log=pytest.fail).folder == built.folder
    with_json = corpus.build(None, tmp_path / "cache", suffixes=(".py", ".json"), log=lambda _: None)
    assert with_json.manifest["files"] == 2 and with_json.folder != built.folder
    (tree / "pkg/b.txt").write_bytes(b"changed " * 50)
    assert corpus.build(None, tmp_path / "cache", log=lambda _: None).folder != built.folder
    # A run fits when its windows fit; the message of one that does not says what it needs.
    tiny = dataclasses.replace(EDITION.quick_sizes["S"], steps=2, batch_size=2, seq_len=64)
    corpus.check_fits(m["train_bytes"], [tiny])
    with pytest.raises(corpus.CorpusTooSmall, match=f"needs {definition.SIZES['M'].tokens + 1:,} training bytes"):
        corpus.check_fits(m["train_bytes"], [tiny, definition.SIZES["M"]])


# ---------------------------------------------------------------------------- the plan


def test_plan_prints_every_run_with_tokens_and_minutes(corpus_dir, monkeypatch, capsys):
    monkeypatch.setitem(plan.MEASURED_TOKENS_PER_S, "M", None)
    assert cli.main(["--plan", "--data", str(corpus_dir)]) == 0
    out = capsys.readouterr().out
    assert "10.82M parameters" in out and "29.17M parameters" in out
    assert "S 3.20M (measured on one H200, 2026-11-26)" in out and "M 1.78M (PLACEHOLDER, not measured)" in out
    assert "  tier 1: 36 runs, 7.08B tokens," in out and "  tier 2: 36 runs, 7.08B tokens," in out
    assert "  tier 3: 8 runs, 5.24B tokens," in out and "  tier 4: 18 runs, 3.54B tokens," in out
    assert "  tier 5: 2 runs, 1.97B tokens," in out and "total: 100 runs, 24.90B tokens" in out
    assert "49.90M parameters" in out and "L 1.00M (PLACEHOLDER, not measured)" in out
    assert ("Measure L's tokens/s first, in one device call on the kind of GPU that will run it: bash "
            "benchmarks/study_device_run.sh throughput_L 540 --mode throughput --size L --optimizers AdamW,Magma-Adam "
            "--repeats 1") in out
    assert "--size M --optimizers AdamW,Magma-Adam,RMSProp,Magma-RMSProp --repeats 1" in out  # M unmeasured here
    assert "a run takes about 17.0 min: longer than one device call" in out and "one such run fits on one" in out
    assert "NOT ENOUGH" in out  # the test corpus feeds no real run
    assert "M__AdamW__lrS-best+1__seed0" in out and "S__Muon__lr0.05__seed0" in out
    assert "L__AdamW__lrS-best__seed0" in out and "L__Magma-Adam__lrS-best__seed0" in out


def test_plan_counts_each_size_on_its_corpus(corpus_dir, first_bundle, tmp_path, capsys):
    first = json.loads(first_bundle.read_text())
    sweep = [r for r in first["runs"] if r["stage"] == "sweep" and r["optimizer"] == "AdamW"]
    elsewhere = tmp_path / "elsewhere.json"
    records.write_json(elsewhere, {**first, "runs": [{**r, "data": {**r["data"], "content_sha1": "f" * 40}}
                                                     for r in sweep]})
    plan_args = ["--quick", "--tiers", "1", "--optimizers", "AdamW", "--plan", "--data", str(corpus_dir), "--resume"]
    assert cli.main(plan_args + [f"{first_bundle},{elsewhere}"]) == 0
    out = capsys.readouterr().out
    here = first["runs"][0]["data"]["content_sha1"][:12]
    assert f"0 runs to go ({len(first['runs'])} finished runs from --resume left out)" in out
    assert f"(most of its runs: tinyS {here}); 2 trained on another corpus count as not run" in out
    assert cli.main(plan_args + [str(elsewhere)]) == 0  # alone, the other corpus is the size's
    assert "1 runs to go (2 finished runs from --resume left out)" in capsys.readouterr().out


def test_transfer_takes_the_point_below_at_the_top_of_the_grid():
    grid = (1e-3, 2e-3, 4e-3)
    cells = plan.make_cells(dataclasses.replace(EDITION, optimizers={
        "AdamW": dataclasses.replace(EDITION.optimizers["AdamW"], lrs=grid)}), tiers=[3], optimizers=["AdamW"])
    sweep = [{"size": "S", "optimizer": "AdamW", "seed": 0, "stage": "sweep", "status": "ok", "lr": lr,
              "final_val_loss": loss} for lr, loss in zip(grid, (3.0, 2.0, 1.0))]
    best, above = cells[0].runs
    assert plan.resolve_lr(best, cells[0], sweep) == (4e-3, "")
    lr, note = plan.resolve_lr(above, cells[0], sweep)
    assert lr == 2e-3 and "end of the grid" in note
    assert plan.resolve_lr(above, cells[0], sweep[:2])[0] is None  # the sweep is not complete


def test_not_finished_counts_best_lr_runs_by_cell():
    runs = [plan.RunSpec("S", "AdamW", 1e-3, 0, "sweep"), plan.RunSpec("S", "AdamW", 2e-3, 0, "sweep"),
            plan.RunSpec("S", "AdamW", None, 1, "best_lr", rule="best")]
    finished = [{"id": "S__AdamW__lr0.001__seed0", "size": "S", "optimizer": "AdamW", "seed": 0, "stage": "sweep"},
                {"id": "S__AdamW__lr0.002__seed1", "size": "S", "optimizer": "AdamW", "seed": 1, "stage": "best_lr"}]
    assert plan.not_finished(runs, finished) == [runs[1]]


def _run(optimizer, lr, seed, ppl, size="s", status="ok"):
    return {"kind": "run", "id": records.run_id(size, optimizer, lr, seed), "size": size, "optimizer": optimizer,
            "lr": lr, "seed": seed, "stage": "sweep", "status": status, "error": None, "final_val_ppl": ppl,
            "final_val_loss": 0.0, "num_parameters": 1000, "val_loss": [[0, 1.0], [10, 0.5]],
            "train_loss": [[0, 1.0], [10, 0.5]], "wall_s": 1.0, "peak_mem_bytes": None, "magma_fused": False}


def test_a_best_lr_run_at_a_former_best_is_stale():
    """A best-lr run stands only while its lr is its sweep's best: once the sweep is complete
    and its best is another lr, the run is stale (run again, left off the page)."""
    cells = plan.make_cells(EDITION, tiers=[1], optimizers=["AdamW"])
    grid = cells[0].lrs
    sweep = [dict(_run("AdamW", lr, 0, 3.0), size="S", final_val_loss=1.0 + abs(lr - 1e-3)) for lr in grid]
    at = {lr: dict(_run("AdamW", lr, 1, 3.0), size="S", stage="best_lr", lr_rule="best") for lr in (1e-3, 5e-3)}
    keep, stale = plan.split_stale(sweep + list(at.values()), cells)
    assert stale == [at[5e-3]] and keep == sweep + [at[1e-3]]
    assert plan.split_stale(sweep[1:] + [at[5e-3]], cells) == (sweep[1:] + [at[5e-3]], [])  # sweep incomplete
    runs = [r for r in plan.ordered_runs(cells) if r.stage == "best_lr"]
    assert plan.not_finished(runs, keep) == [runs[1]] and plan.not_finished(runs, sweep + [at[5e-3]]) == [runs[1]]


# ---------------------------------------------------------------------------- the summary and the page


def test_summary_picks_the_best_lr_and_the_stable_range():
    grid = EDITION.optimizers["AdamW"].lrs
    ppls = dict(zip(grid, (3.0, 3.1, 3.2, 3.5, 4.0, 9.0, 20.0)))
    runs = [_run("AdamW", lr, seed, p + 0.01 * seed) for lr, p in ppls.items() for seed in (0, 1)]
    cell = summary.summarize(runs, EDITION)["s"]["AdamW"]
    assert cell.best_lr == 1e-4 and cell.edge == "lowest" and cell.complete
    assert cell.near_best(0.05) == [1e-4, 5e-4]  # 3.2 is more than 5% above 3.005
    lines = "\n".join(page.ordering_statement(summary.summarize(runs, EDITION), EDITION))
    assert "within 5% of each" in lines and "AdamW 2 of 7 (0.0001 to 0.0005)" in lines
    # a best-lr seed fills no gap of the sweep
    gap = [_run("AdamW", lr, 0, 3.0) for lr in grid[1:]] + [dict(_run("AdamW", grid[0], 1, 3.0), stage="best_lr")]
    assert summary.summarize(gap, EDITION)["s"]["AdamW"].missing_lrs == [grid[0]]


def test_an_incomplete_sweep_is_not_judged_against_the_paper():
    """A relation with a side whose grid is not all run is 'not checked yet', with what is missing;
    the results table says of how many learning rates the best is the best."""
    grid = EDITION.optimizers["AdamW"].lrs
    runs = [_run("AdamW", lr, 0, 3.0 + lr) for lr in grid] + [_run("Magma-Adam", lr, 0, 2.0) for lr in grid[:3]]
    summ = summary.summarize(runs, EDITION)
    lines = "\n".join(page.ordering_statement(summ, EDITION))
    assert "- Magma-Adam < AdamW: not checked yet (sweep incomplete: Magma-Adam lacks lr 0.005, 0.01, 0.02, " \
           "0.05; now 2.0000 vs 3.0001)." in lines
    table = "\n".join(page.results_table(summ))
    assert "| s | Magma-Adam | 0.0001 (lowest of grid) (best of 3 of 7 lrs run) |" in table
    assert "partial grid" in "\n".join(page.paper_table(summ, EDITION))


def test_every_result_of_a_size_read_twice_says_so():
    runs = [dict(_run(name, 1e-3, 0, p), size="L", stage="transfer", lr_rule="S-best", passes=1.37)
            for name, p in (("AdamW", 2.0), ("Magma-Adam", 2.1))]
    summ = summary.summarize(runs, EDITION)
    text = "\n".join(page.results_table(summ) + page.sweep_table(summ, runs) + page.paper_table(summ, EDITION)
                     + page.ordering_statement(summ, EDITION) + page.passes_lines(records.Study(runs=runs)))
    assert "| L (1.37 passes) | AdamW | 0.001 |" in text and "| L (1.37 passes) | Magma-Adam | 0.001: " in text
    assert "ours L (1.37 passes)" in text and "**L (1.37 passes).** Measured order" in text
    assert "Size L's runs read their training bytes 1.37 times" in text
    assert summary.size_label("S", summary.summarize([_run("AdamW", 1e-3, 0, 2.0, size="S")], EDITION)["S"]) == "S"


def _pair(size, params, dim, ppls, passes=None):
    """AdamW and Magma-Adam at one size: {seed: (AdamW's ppl, Magma-Adam's)} at their best lrs."""
    extra = {"size": size, "num_parameters": params, "model": {"vocab_size": 256, "dim": dim}, "tokens": 20 * params,
             "batch_size": 4, "seq_len": 8}
    extra |= {"passes": passes} if passes else {}
    return [dict(_run(name, lr, seed, pair[i]), **extra, stage="transfer" if size == "L" else "sweep")
            for seed, pair in ppls.items() for i, (name, lr) in enumerate((("AdamW", 1e-3), ("Magma-Adam", 5e-3)))]


def test_the_gap_by_size_has_every_planned_size_and_the_papers():
    """The gap table: each size's gap (with each seed's where several ran), a planned size
    without records as "not run yet", L's passes over its data once it ran, the paper's at its
    sizes on their transformer bodies."""
    s_runs = _pair("S", 10_818_432, 384, {0: (2.00, 2.03), 1: (2.02, 2.04)})
    m_runs = _pair("M", 29_173_248, 512, {0: (1.70, 1.71)})
    l_runs = _pair("L", 49_900_000, 640, {0: (1.60, 1.576)}, passes=1.374)
    before = "\n".join(page.gap_lines(records.Study(runs=s_runs + m_runs), summary.summarize(s_runs + m_runs, EDITION),
                                      EDITION, {}))
    assert "| L | not run yet (tier 5) | 983.04M | | | | |" in before
    assert "| S | 10.82M (10.62M) | 216.37M | at most 1 | 2.0100 [2.0000, 2.0200] (2 seeds) | 2.0350 [2.0300, " \
           "2.0400] (2 seeds) | +1.2% [seed 0 +1.5%; seed 1 +1.0%] |" in before
    assert "| M | 29.17M (28.91M) | 583.46M | at most 1 | 1.7000 (1 seed) | 1.7100 (1 seed) | +0.6% |" in before
    assert "| paper 60M | 58.07M (25.31M) | | | 30.79 | 29.09 | -5.5% |" in before
    assert "| paper 130M | 134.11M (84.95M) | | | 24.77 | 22.08 | -10.9% |" in before
    assert "gap_vs_size" not in before  # no figure given, none linked
    runs = s_runs + m_runs + l_runs
    after = "\n".join(page.gap_lines(records.Study(runs=runs), summary.summarize(runs, EDITION), EDITION,
                                     {"gap_vs_size": "p/gap_vs_size.png"}))
    assert "not run yet" not in after and "| L (1.37 passes) | 49.90M (49.57M) | 998.00M | 1.37 |" in after
    assert "| 1.6000 (1 seed) | 1.5760 (1 seed) | -1.5% |" in after
    assert "![the gap in final validation perplexity against model size](p/gap_vs_size.png)" in after
    assert definition.PAPER.models[0].body_parameters == 25_305_600  # GaLore's llama_60m: 512 x 8, MLP 1376


def test_the_gap_figure_is_drawn_where_a_size_ran_both(tmp_path):
    pytest.importorskip("matplotlib")
    runs = _pair("S", 10_818_432, 384, {0: (2.00, 2.03)}) + _pair("L", 49_900_000, 640, {0: (1.6, 1.58)}, 1.374)
    files = plots.draw(summary.summarize(runs, EDITION), runs, tmp_path, EDITION)
    assert files["gap_vs_size"].is_file() and files["gap_vs_size"].stat().st_size > 0
    only_adamw = [r for r in runs if r["optimizer"] == "AdamW"]
    assert "gap_vs_size" not in plots.draw(summary.summarize(only_adamw, EDITION), only_adamw, tmp_path / "a", EDITION)


def test_report_page_lists_the_runs_the_paper_and_what_is_missing(first_bundle, tmp_path):
    pytest.importorskip("matplotlib")  # the report draws its figures
    page_path = tmp_path / "page.md"
    assert cli.main(["report", "--inputs", str(first_bundle), "--page", str(page_path)]) == 0
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
    study = records.load_study([str(tmp_path / "b.json")], 2)
    text = page.build_page(study, summary.summarize(study.runs, EDITION), ["--inputs", "x"], {}, edition=EDITION)
    assert text.count(planned) == 1 and f"  - {planned} (skipped: time budget: 0 s usable)" in text
    assert f"- {unplanned}: skipped: time budget: 0 s usable" in text
    assert "2 skipped (the planned ones are listed below with the missing runs)." in text


def _lion_study(edition) -> records.Study:
    meta = {"mode": "sweep", "date": "2026-01-01 00:00 UTC", "betas": [0.9, 0.95], "weight_decay": 0.1,
            "optimizers": {name: {"lrs": [1e-3, 2e-3], "description": r.description}
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
    """An optimizer added to the study and its tiers reaches the title, the tables, the fused
    column, the plots' colours, the command line and the plan, and the paper's claim is the
    definition's, without a change to their code."""
    lion = definition.Recipe("Lion", (1e-3, 2e-3), "a sign-based optimizer (test recipe)", "lion",
                             color="tab:purple", fused="none", fused_note="torch Lion")
    adamw = dataclasses.replace(EDITION.optimizers["AdamW"], lrs=(1e-3, 2e-3))  # the grid the study ran
    edition = dataclasses.replace(
        EDITION, optimizers={**EDITION.optimizers, "AdamW": adamw, "Lion": lion},
        quick_tiers=(dataclasses.replace(EDITION.quick_tiers[0], optimizers=("Lion",)),),
        paper=definition.PaperClaim("Lion < AdamW", (("Lion", "AdamW"),), "claimed wider for Lion",
                                    "Not the paper's data (test)."))
    monkeypatch.setattr(cli, "EDITION", edition)
    study = _lion_study(edition)
    summ = summary.summarize(study.runs, edition)
    assert list(summ["s"]) == ["AdamW", "Lion"]  # the definition's order
    text = page.build_page(study, summ, ["--inputs", "x"], {}, edition=edition)
    assert text.startswith("# Convergence: Magma against AdamW, RMSProp, LaProp, SkipUpdate, Muon and Lion "
                           "(edition 2)\n")
    assert "| Lion | a sign-based optimizer (test recipe) | s: 0.001, 0.002 |" in text
    assert "| s | Lion | 0.001 (lowest of grid) | 2.0050 [2.0000, 2.0100] (2 seeds) |" in text
    assert "| Lion | n/a (torch Lion) | 100 | 1.000x |" in text and "| AdamW | torch fused |" in text
    assert "- Lion < AdamW: holds (2.0050 vs 3.0050; separated)." in text
    assert "Stable range (claimed wider for Lion)" in text and "Not the paper's data (test)." in text
    assert "The paper's ordering holds in full at: s." in text
    assert "Magma-based optimizers ran on" not in text  # neither Lion nor AdamW is Magma-based
    assert plots.color("Lion", edition) == "tab:purple"
    assert "Lion" in cli.parse_args(["--plan", "--optimizers", "Lion"]).optimizer_names
    cells = plan.make_cells(edition, quick=True)
    assert [r.run_id for r in cells[0].runs] == ["tinyS__Lion__lr0.001__seed0", "tinyS__Lion__lr0.002__seed0",
                                                 "tinyS__Lion__lrbest__seed1"]


def test_a_final_evaluation_on_another_sample_is_not_joined_to_the_curve():
    """The last evaluation uses more batches (another sample of the validation split) than the
    periodic ones, so the plot marks it apart; runs whose final evaluation is the periodic one
    are plotted as one line."""
    run = _run("AdamW", 1e-3, 0, 3.0)
    assert plots.final_evaluation_apart([{**run, "eval_batches": 8, "final_eval_batches": 32}]) == (32, 8)
    assert plots.final_evaluation_apart([{**run, "eval_batches": 8, "final_eval_batches": 8}]) is None
    assert plots.final_evaluation_apart([run]) is None


# ---------------------------------------------------------------------------- the records


def test_records_round_trip_and_merge_bundles(tmp_path):
    """A bundle holds what was added, in order; several bundles merge into one study, every run
    once (a finished copy over a failed one), a skip that a later bundle finished dropped, and
    the later invocation's set-up winning."""
    meta = {"command": "c", "date": "2026-01-01 00:00 UTC", "mode": "sweep", "edition": 2,
            "sizes": {"s": {"steps": 1}}}
    runs = [_run("AdamW", 1e-3, 0, 3.0), _run("AdamW", 2e-3, 0, None, status="error"),
            _run("AdamW", 4e-3, 0, None, status="diverged")]
    throughput = {"kind": "throughput", "size": "s", "optimizer": "AdamW", "date": meta["date"], "tokens_per_s": 1.0}
    skipped = {"id": records.run_id("s", "AdamW", 8e-3, 0), "reason": "time budget"}
    writer = records.BundleWriter(tmp_path / "a.json", meta)
    for r in runs:
        writer.add("runs", r)
    writer.add("throughput", throughput)
    writer.add("skipped", skipped)
    assert json.loads((tmp_path / "a.json").read_text()) == {"kind": "bundle", "meta": meta, "runs": runs,
                                                             "throughput": [throughput], "skipped": [skipped]}
    assert records.load_finished([tmp_path / "a.json"]) == [runs[0], runs[2]]  # an error is not finished
    later = {**meta, "date": "2026-01-02 00:00 UTC", "sizes": {"s": {"steps": 2}}}
    records.write_json(tmp_path / "b.json", {"kind": "bundle", "meta": later, "throughput": [], "skipped": [],
                                             "runs": [_run("AdamW", 2e-3, 0, 3.1), _run("AdamW", 8e-3, 0, 3.2)]})
    study = records.load_study([str(tmp_path)], 2)
    assert {r["id"]: r["status"] for r in study.runs} == {
        "s__AdamW__lr0.001__seed0": "ok", "s__AdamW__lr0.002__seed0": "ok", "s__AdamW__lr0.004__seed0": "diverged",
        "s__AdamW__lr0.008__seed0": "ok"}
    assert study.throughput == [throughput] and study.skipped == []
    assert records.merged_meta(study.metas, "sizes") == {"s": {"steps": 2}}


def test_a_run_skipped_by_several_invocations_counts_once_with_the_newest_reason(tmp_path):
    """Files named against their dates (an H200 bundle sorts after an H100 one) still give the
    newest invocation's reason, once per run, and the page counts each skipped run once."""
    run = records.run_id("s", "AdamW", 2e-3, 0)
    dates = {"z_old.json": "2026-01-01 00:00 UTC", "a_new.json": "2026-01-03 00:00 UTC",
             "m_mid.json": "2026-01-02 00:00 UTC"}
    for name, date in dates.items():
        records.write_json(tmp_path / name, {"kind": "bundle", "meta": {"mode": "sweep", "date": date, "edition": 2},
                                             "runs": [_run("AdamW", 1e-3, 0, 3.0)], "throughput": [],
                                             "skipped": [{"id": run, "reason": f"budget of {date}"}]})
    for order in (sorted(dates), sorted(dates, reverse=True)):
        study = records.load_study([str(tmp_path / name) for name in order], 2)
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
        meta = {"mode": "sweep", "date": runs[0]["date"], "data": {"content_sha1": corpus_sha1}, "edition": 2}
        records.write_json(tmp_path / name, {"kind": "bundle", "meta": meta, "runs": runs, "throughput": [],
                                             "skipped": skipped})
    for order in (["1.json", "2.json"], ["2.json", "1.json"]):
        study = records.load_study([str(tmp_path / name) for name in order], 2)
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


# ---------------------------------------------------------------------------- the package


# Each module's layer: a module imports only modules of lower layers (imports run one way).
LAYERS = {"definition": 0, "records": 0, "summary": 1, "environment": 1, "optimizers": 1, "plan": 1, "corpus": 1,
          "trainer": 2, "plots": 2, "page": 2, "sweep": 3, "throughput": 3, "report": 3, "cli": 4, "__init__": 5}


def test_bf16_state_recipes_store_what_they_say():
    """Magma-Adam-bf16 keeps bfloat16 moments; Magma-Adam-bf16-nearest float32 ones that hold the
    nearest bfloat16 values after every step (its emulation of round-to-nearest bfloat16 state)."""
    import torch

    from benchmarks.study import optimizers

    for name, dtype in (("Magma-Adam-bf16", torch.bfloat16), ("Magma-Adam-bf16-nearest", torch.float32)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        optimizer = optimizers.build(EDITION.optimizers[name], model, 1e-3, 0, torch.device("cpu"))
        for _ in range(3):
            model(torch.randn(5, 8)).square().mean().backward()
            optimizer.step()
        for state in optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                assert state[key].dtype == dtype, (name, key)
                assert torch.equal(state[key], state[key].to(torch.bfloat16).to(dtype)), (name, key)


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


def test_the_entry_script_answers_help():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "convergence.py"), "--help"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "--resume" in done.stdout, done.stderr
