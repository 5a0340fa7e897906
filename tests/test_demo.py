"""The demo: its command line, its optimizers' groups and learning rates, and an end-to-end run."""

import json
import re

import pytest
import torch

from magma_ext import Magma, decay_groups, param_groups
from magma_ext.demo import __main__ as demo_main
from magma_ext.demo.model import Llama, LlamaConfig
from magma_ext.demo.train import (ADAMW_LR, MAGMA_LR, TRAIN_LOSS_WINDOW, adamw_factory, magma_factory,
                                  train)

TINY = ["--device", "cpu", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--dim", "32",
        "--layers", "1", "--heads", "2", "--eval-every", "2", "--eval-batches", "1",
        "--max-bytes", "200000"]


def _tiny_llama():
    return Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, max_seq_len=32))


def test_default_learning_rates_differ_per_optimizer():
    """The best of each grid at the convergence study's 10M size (see ADAMW_LR in train.py)."""
    assert (ADAMW_LR, MAGMA_LR) == (1e-3, 2e-3)
    args = demo_main.parse_args([])
    assert (args.adamw_lr, args.magma_lr) == (ADAMW_LR, MAGMA_LR)


@pytest.mark.parametrize("argv, expected", [
    (["--lr", "0.01"], (0.01, 0.01)),
    (["--adamw-lr", "0.004"], (0.004, MAGMA_LR)),
    (["--magma-lr", "0.007"], (ADAMW_LR, 0.007)),
    (["--lr", "0.01", "--magma-lr", "0.02"], (0.01, 0.02)),
    (["--adamw-lr", "0.003", "--lr", "0.01"], (0.003, 0.01)),
], ids=["lr-sets-both", "adamw-only", "magma-only", "lr-then-magma", "adamw-then-lr"])
def test_learning_rate_flags(argv, expected):
    args = demo_main.parse_args(argv)
    assert (args.adamw_lr, args.magma_lr) == expected


def test_factories_use_the_shared_split():
    """AdamW decays exactly what Magma decays (decay_groups); Magma masks per param_groups."""
    model = _tiny_llama()
    adamw = adamw_factory(0.004, weight_decay=0.1)(model)
    assert isinstance(adamw, torch.optim.AdamW)
    expected = decay_groups(model, 0.1)
    assert [([id(p) for p in g["params"]], g["weight_decay"]) for g in adamw.param_groups] == [
        ([id(p) for p in g["params"]], g["weight_decay"]) for g in expected]
    assert any(p is model.lm_head.weight for p in adamw.param_groups[0]["params"])
    assert all(g["lr"] == 0.004 for g in adamw.param_groups)

    magma = magma_factory(0.007, weight_decay=0.1, keep_prob=0.5)(model)
    assert isinstance(magma, Magma)
    expected = param_groups(model, weight_decay=0.1)
    assert [([id(p) for p in g["params"]], g["weight_decay"], g["magma"]) for g in magma.param_groups] == [
        ([id(p) for _, p in g["params"]], g["weight_decay"], g.get("magma", True)) for g in expected]
    unmasked = [p for g in magma.param_groups if not g["magma"] for p in g["params"]]
    assert any(p is model.lm_head.weight for p in unmasked)
    assert all(g["lr"] == 0.007 for g in magma.param_groups)


def test_each_optimizer_gets_its_learning_rate(monkeypatch, tmp_path):
    """main hands --adamw-lr to AdamW and --magma-lr to Magma, and reports both."""
    pytest.importorskip("matplotlib")
    built = {}

    def fake_train(model_cfg, factory, train_data, val_data, *, name, **kwargs):
        optimizer = factory(Llama(model_cfg))
        built[name] = (type(optimizer), {g["lr"] for g in optimizer.param_groups})
        return {"name": name, "train_loss": [[1, 5.0]], "val_loss": [[0, 5.5], [1, 5.0]],
                "final_train_loss": 5.0, "final_val_loss": 5.0, "final_val_ppl": 148.4,
                "ms_per_step": 1.0, "tokens_per_s": 1.0, "wall_s": 0.0, "peak_mem_bytes": None,
                "num_parameters": 1}

    monkeypatch.setattr(demo_main, "train", fake_train)
    results = demo_main.main(TINY + ["--adamw-lr", "0.004", "--magma-lr", "0.007", "--out", str(tmp_path)])
    assert built == {"AdamW": (torch.optim.AdamW, {0.004}), "Magma": (Magma, {0.007})}
    assert {name: r["peak_lr"] for name, r in results.items()} == {"AdamW": 0.004, "Magma": 0.007}
    table = demo_main.format_table(results)
    assert "| AdamW | 0.004 |" in table and "| Magma | 0.007 |" in table


def test_demo_smoke(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    results = demo_main.main(TINY + ["--out", str(tmp_path)])
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert (curves["config"]["adamw_lr"], curves["config"]["magma_lr"]) == (ADAMW_LR, MAGMA_LR)
    assert {name: run["peak_lr"] for name, run in curves["runs"].items()} == {"AdamW": ADAMW_LR,
                                                                              "Magma": MAGMA_LR}
    assert set(results) == {"AdamW", "Magma"}
    assert all(len(r["train_loss"]) == 4 for r in results.values())
    out = capsys.readouterr().out
    assert "| optimizer | peak lr |" in out
    assert f"| AdamW | {ADAMW_LR:g} |" in out and f"| Magma | {MAGMA_LR:g} |" in out
    assert f"peak lr AdamW {ADAMW_LR:g}, Magma {MAGMA_LR:g}" in out
    # The last progress line of a run shows the table's tokens/s: the mean so far, labelled so.
    table = dict(zip(demo_main.table_columns(4), range(7)))
    assert "| train loss, mean of last 4 steps | val loss, at step 4 |" in out
    for name, r in results.items():
        last_line = [line for line in out.splitlines() if line.startswith(f"[{name}] step 4/4")][-1]
        assert re.search(r"  ([\d,]+) tok/s \(mean so far\)$", last_line).group(1) == f"{r['tokens_per_s']:,.0f}"
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[table["tokens/s, mean of steps 2-4"]] == f"{r['tokens_per_s']:,.0f}"
        assert cells[table["train loss, mean of last 4 steps"]] == f"{r['final_train_loss']:.4f}"


@pytest.mark.parametrize("steps, train_loss, timing", [
    (400, "train loss, mean of last 10 steps", "mean of steps 2-400"),
    (4, "train loss, mean of last 4 steps", "mean of steps 2-4"),
    (1, "train loss, mean of last 1 step", "mean of step 1"),
], ids=["400-steps", "4-steps", "1-step"])
def test_table_columns_say_what_they_measure(steps, train_loss, timing):
    """Losses and speeds are means over named steps; the val loss is the last evaluation's."""
    assert demo_main.table_columns(steps) == [
        "optimizer", "peak lr", train_loss, f"val loss, at step {steps}", "val perplexity per byte",
        f"ms/step, {timing}", f"tokens/s, {timing}"]


def test_final_train_loss_and_speed_are_the_labelled_means():
    """final_train_loss is the mean of the last TRAIN_LOSS_WINDOW steps; ms_per_step and
    tokens_per_s agree with each other over the same steps."""
    train_data = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    run = train(LlamaConfig(dim=32, n_layers=1, n_heads=2, max_seq_len=16), adamw_factory(1e-3),
                train_data, train_data[:1024], steps=12, batch_size=2, seq_len=16, eval_every=6,
                eval_batches=1, progress=False)
    losses = [loss for _, loss in run["train_loss"]]
    assert TRAIN_LOSS_WINDOW == 10
    assert run["final_train_loss"] == pytest.approx(sum(losses[-10:]) / 10)
    assert run["tokens_per_s"] == pytest.approx(2 * 16 / (run["ms_per_step"] / 1000))
