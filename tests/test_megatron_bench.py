"""benchmarks/megatron_bench.py's command line and tables on CPU (no megatron-core): the
arguments it refuses, naming them, the order of its runs, and its table's ratios and
parameter-sync columns on made-up results."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from megatron_bench_cli import parse_args, run_names  # noqa: E402
from megatron_bench_report import RunResult, describe_setup, format_table, markdown_report  # noqa: E402

REFUSED = [  # (arguments, world size, what the usage error names)
    (["--tp", "3"], 4, "--tp 3 does not divide"),
    (["--dp", "4"], 2, "--dp 4 does not match"),
    (["--tp", "2", "--seq-len", "33"], 2, "--seq-len 33"),
    (["--heads", "6", "--hidden", "60", "--tp", "4"], 4, "--tp 4 must divide --heads 6"),
    (["--param-gather", "sparse"], 2, "--param-gather sparse needs --distributed-optimizer"),
    (["--param-gather", "both", "--distributed-optimizer", "--optimizer", "adam"], 2, "needs a Magma run"),
    (["--overlap-param-gather"], 2, "--overlap-param-gather needs --distributed-optimizer"),
    (["--layout-json", "x.json", "--distributed-optimizer"], 2, "--layout-json records"),
    (["--warmup-steps", "5", "--steps", "5"], 2, "--warmup-steps 5"),
    (["--keep-prob", "1.5"], 2, "--keep-prob 1.5"),
    (["--block", "0"], 2, "--block"),
    (["--adam-impl", "slow"], 2, "--adam-impl"),
    (["--rounds", "0"], 2, "--rounds must be at least 1"),
    (["--init", "gpu"], 2, "--init gpu draws other weights"),
]


@pytest.mark.parametrize("argv, world, message", REFUSED, ids=[" ".join(a) for a, _, _ in REFUSED])
def test_bad_arguments_are_refused_by_name(monkeypatch, capsys, argv, world, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_runs_come_in_the_asked_order(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse_args(["--distributed-optimizer", "--param-gather", "both"])
    assert (args.dp, args.adam_impl, args.block) == (2, "fused", "tensor")
    assert run_names(args) == ["adam", "magma", "magma+sparse"]
    assert run_names(parse_args(["--distributed-optimizer", "--param-gather", "both", "--magma-first"])) == [
        "magma", "magma+sparse", "adam"]
    assert run_names(parse_args(["--optimizer", "magma", "--block", "7", "--adam-impl", "foreach"])) == ["magma"]
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit):
        parse_args([])


def result(name, **figures) -> RunResult:
    base = dict(name=name, inner="AdamW (fused)" if name == "adam" else "Magma", wrapper="DistributedOptimizer",
                final_loss=2.0, tokens_per_s=1000.0, iteration_ms=100.0, wrapper_step_ms=20.0, inner_step_ms=10.0,
                skipped_steps=0, parameters=(1000, 600), param_sync_ms=4.0, sync_bytes=None, dense_bytes=None)
    return RunResult(**{**base, **figures})


def test_the_table_gives_ratios_to_adam_and_sync_figures_against_the_dense_gather():
    results = [result("adam"),
               result("magma", tokens_per_s=1250.0, inner_step_ms=5.0, param_sync_ms=4.0,
                      sync_bytes=None, dense_bytes=None),
               result("magma+sparse", tokens_per_s=1500.0, inner_step_ms=5.0, param_sync_ms=1.0,
                      sync_bytes=2 * 2**20, dense_bytes=8 * 2**20)]
    rows = [line.split("|")[1:-1] for line in format_table(results).splitlines()[2:]]
    cells = {row[0].strip(): [c.strip() for c in row] for row in rows}
    assert cells["Adam"][1] == "AdamW (fused)" and cells["Adam"][4] == "1.000"
    assert cells["Magma"][4] == "1.250" and cells["Magma"][8] == "0.500"
    # sync: time over the dense-gather Magma run's; bytes: the sparse run's own, and the dense
    # figure (reported by the sparse run) for the runs that moved densely
    assert cells["Magma+sparse"][9:] == ["1.00", "0.250", "2.0 MiB", "0.250"]
    assert cells["Magma"][9:] == ["4.00", "1.000", "8.0 MiB", "1.000"]
    assert cells["Adam"][9:] == ["4.00", "1.000", "8.0 MiB", "1.000"]
    without_sync = format_table([result("adam", param_sync_ms=None), result("magma", param_sync_ms=None)])
    assert "param sync" not in without_sync


def test_the_markdown_page_states_the_setup_device_and_command(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse_args(["--tp", "2", "--steps", "20"])
    results = [result("adam", param_sync_ms=None), result("magma", param_sync_ms=None, skipped_steps=1)]
    setup = describe_setup(args, results)
    assert "tp 2, dp 1, sequence parallel on" in setup[1] and "Magma 1" in setup[3]
    page = markdown_report(args, results, "2 x GPU", "torch X; megatron-core Y")
    assert "- device: 2 x GPU; torch X; megatron-core Y" in page and "torchrun --nproc-per-node 2 " in page
    assert format_table(results) in page


def test_the_layout_written_is_the_sparse_runs(tmp_path, capsys):
    from megatron_bench_report import write_layout

    path = tmp_path / "layout.json"
    write_layout(str(path), [result("adam"), result("magma", layout=None)])
    assert not path.exists() and "not written" in capsys.readouterr().out
    write_layout(str(path), [result("magma", layout={"from": "dense"}), result("magma+sparse", layout={"from": "sparse"})])
    assert path.read_text() == '{"from": "sparse"}'


def test_rounds_alternate_their_order_and_report_medians(monkeypatch):
    from megatron_bench_cli import run_order
    from megatron_bench_report import median_over_rounds, rounds_table

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert run_order(parse_args(["--rounds", "3"])) == [["adam", "magma"], ["magma", "adam"], ["adam", "magma"]]
    rounds = [[result("adam", inner_step_ms=10.0), result("magma", inner_step_ms=8.0, tokens_per_s=1010.0)],
              [result("magma", inner_step_ms=9.0, tokens_per_s=990.0, skipped_steps=2), result("adam", inner_step_ms=11.0)],
              [result("adam", inner_step_ms=12.0), result("magma", inner_step_ms=7.0, tokens_per_s=1000.0)]]
    adam, magma = median_over_rounds(rounds)
    assert (adam.name, adam.inner_step_ms, magma.inner_step_ms) == ("adam", 11.0, 8.0)
    assert (magma.tokens_per_s, magma.skipped_steps, magma.sync_bytes) == (1000.0, 2, None)
    rows = rounds_table(rounds).splitlines()
    assert rows[3] == "| 2 | Magma, Adam | 0.990 | 0.818 |"
    page = markdown_report(parse_args(["--rounds", "3"]), [adam, magma], "1 x GPU", "v", rounds)
    assert "3 rounds" in page and rounds_table(rounds) in page
