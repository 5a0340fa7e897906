"""The demo: its command line, its optimizers' groups and learning rates, and an end-to-end run."""

import json

import pytest
import torch

from magma_ext import Magma, decay_groups, param_groups
from magma_ext.demo import __main__ as demo_main
from magma_ext.demo.model import Llama, LlamaConfig
from magma_ext.demo.train import ADAMW_LR, MAGMA_LR, adamw_factory, magma_factory

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
        ([id(p) for p in g["params"]], g["weight_decay"], g.get("magma", True)) for g in expected]
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
