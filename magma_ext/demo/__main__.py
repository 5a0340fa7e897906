"""``python -m magma_ext.demo``: train the same small Llama with AdamW and with Magma.

Both runs share the seed (so the init), the data order, the token budget and the shape of
the learning-rate schedule; only the optimizer and its peak learning rate differ. Each
optimizer has its own default peak rate, the best of its grid in the convergence study
(``ADAMW_LR`` and ``MAGMA_LR`` in :mod:`magma_ext.demo.train` say which run). The run prints
progress, then a table of final losses, learning rates and speed, and writes
``loss_curves.png`` and ``curves.json`` to ``--out``.

The defaults (0.9M parameters, 0.8M tokens per run) finish in about three minutes on two
CPU cores; scale up on a GPU with e.g.
``--steps 2000 --batch-size 64 --seq-len 512 --dim 512 --layers 8 --heads 8 --dtype bfloat16
--max-bytes 40000000`` (at 50M parameters the study's best rates were lower: add
``--adamw-lr 5e-4 --magma-lr 1e-3`` to use those).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import data as data_lib
from .model import LlamaConfig
from .train import ADAMW_LR, BETAS, MAGMA_LR, TRAIN_LOSS_WINDOW, adamw_factory, magma_factory, timed_steps, train

_THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(prog="python -m magma_ext.demo", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=default_device, help="torch device")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16 runs forward and backward under autocast (meant for GPUs)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128, help="bytes per training window")
    p.add_argument("--dim", type=int, default=128, help="model width")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--adamw-lr", type=float, default=None,
                   help=f"peak learning rate of AdamW (default: --lr, else {ADAMW_LR:g})")
    p.add_argument("--magma-lr", type=float, default=None,
                   help=f"peak learning rate of Magma (default: --lr, else {MAGMA_LR:g})")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of both optimizers, unless --adamw-lr / --magma-lr say otherwise")
    p.add_argument("--weight-decay", type=float, default=0.1, help="decay of matrices (both optimizers)")
    p.add_argument("--keep-prob", type=float, default=0.5, help="Magma's probability of keeping a block")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: steps // 10)")
    p.add_argument("--eval-every", type=int, default=40, help="steps between validation evaluations")
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches per evaluation")
    p.add_argument("--seed", type=int, default=0, help="init, data order and Magma's mask seed")
    p.add_argument("--data", default=None,
                   help="text file or folder (all files, recursively) instead of the Python stdlib")
    p.add_argument("--max-bytes", type=int, default=data_lib.DEFAULT_MAX_BYTES, help="corpus size cap")
    p.add_argument("--out", default="demo_out", help="folder for loss_curves.png and curves.json")
    args = p.parse_args(argv)
    for name, default in (("adamw_lr", ADAMW_LR), ("magma_lr", MAGMA_LR)):
        if getattr(args, name) is None:
            setattr(args, name, default if args.lr is None else args.lr)
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def configure_threads(device: torch.device) -> None:
    """Use every CPU core this process may run on, unless the user chose a thread count."""
    if device.type == "cpu" and not any(v in os.environ for v in _THREAD_ENV_VARS):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores or 1))


def table_columns(steps: int) -> list[str]:
    """The headers of :func:`format_table` for runs of ``steps`` steps: each says what it measures."""
    window = min(TRAIN_LOSS_WINDOW, steps)
    timed = timed_steps(steps)
    over = f"steps {timed[0]}-{timed[-1]}" if len(timed) > 1 else f"step {timed[0]}"
    return ["optimizer", "peak lr",
            f"train loss, mean of last {window} step{'s' if window > 1 else ''}",
            f"val loss, at step {steps}", "val perplexity per byte",
            f"ms/step, mean of {over}", f"tokens/s, mean of {over}"]


def format_table(results: dict[str, dict]) -> str:
    """The final comparison as a Markdown table; ``peak_lr`` of each run is its peak learning rate.

    Times are of training steps only (forward, backward, optimizer step), evaluations excluded;
    the headers name the steps each number is over.
    """
    steps = len(next(iter(results.values()))["train_loss"])
    rows = ["| " + " | ".join(table_columns(steps)) + " |", "|---|" + "---:|" * 6]
    for name, r in results.items():
        rows.append(f"| {name} | {r['peak_lr']:g} | {r['final_train_loss']:.4f} | {r['final_val_loss']:.4f} "
                    f"| {r['final_val_ppl']:.3f} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(rows)


def plot_curves(results: dict[str, dict], path: Path, title: str) -> None:
    """Train (raw, faint, plus a smoothed line) and validation loss of every run, one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, r), color in zip(results.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        steps, losses = zip(*r["train_loss"])
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        # Smooth over ~1% of the run: enough to read the trend, little enough lag to compare.
        decay = 1.0 - 1.0 / max(1, len(losses) // 100)
        ax.plot(steps, _ema(losses, decay), color=color, linewidth=1.5, label=f"{name} train (smoothed)")
        val_steps, val_losses = zip(*r["val_loss"])
        ax.plot(val_steps, val_losses, color=color, linestyle="--", marker="o", markersize=4,
                label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    final = min(min(l for _, l in r["val_loss"]) for r in results.values())
    ax.set_ylim(bottom=max(0.0, final - 0.3), top=min(6.0, ax.get_ylim()[1]))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ema(values, decay: float) -> list[float]:
    smoothed, avg = [], values[0]
    for v in values:
        avg = decay * avg + (1 - decay) * v
        smoothed.append(avg)
    return smoothed


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the demo; returns the results of both runs keyed by optimizer name."""
    args = parse_args(argv)
    device = torch.device(args.device)
    configure_threads(device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    train_data, val_data = data_lib.load_corpus(args.data, max_bytes=args.max_bytes)
    source = args.data or f"Python {platform.python_version()} stdlib ({data_lib.stdlib_root()})"
    model_cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                            max_seq_len=args.seq_len)
    print(f"data: {source}: {len(train_data):,} train / {len(val_data):,} val bytes")
    print(f"model: dim {args.dim}, {args.layers} layers, {args.heads} heads, seq {args.seq_len}; "
          f"device {device}, {args.dtype}, {torch.get_num_threads()} CPU threads")
    print(f"budget: {args.steps} steps x {args.batch_size * args.seq_len:,} tokens, "
          f"peak lr AdamW {args.adamw_lr:g}, Magma {args.magma_lr:g}; keep_prob {args.keep_prob}, "
          f"seed {args.seed}",
          flush=True)

    optimizers = {
        "AdamW": (args.adamw_lr, adamw_factory(args.adamw_lr, args.weight_decay)),
        "Magma": (args.magma_lr, magma_factory(args.magma_lr, args.weight_decay,
                                               keep_prob=args.keep_prob, seed=args.seed)),
    }
    results = {}
    for name, (lr, factory) in optimizers.items():
        run = train(model_cfg, factory, train_data, val_data,
                    steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                    warmup_steps=args.warmup, eval_every=args.eval_every,
                    eval_batches=args.eval_batches, seed=args.seed, device=device,
                    dtype=args.dtype, name=name)
        results[name] = {"peak_lr": lr, **run}

    print()
    print(format_table(results))
    for name, r in results.items():
        memory = f", peak CUDA memory {r['peak_mem_bytes'] / 2**20:,.0f} MiB" if r["peak_mem_bytes"] else ""
        print(f"{name}: {r['wall_s']:.1f} s wall for the whole run, evaluations included{memory}")
    title = (f"Llama {args.dim}d x {args.layers}L, {args.steps} steps x {args.batch_size}x{args.seq_len} "
             f"bytes, peak lr AdamW {args.adamw_lr:g} / Magma {args.magma_lr:g}, {device.type}")
    png_path, json_path = out_dir / "loss_curves.png", out_dir / "curves.json"
    plot_curves(results, png_path, title)
    config = dict(vars(args))
    config.update(device=str(device), betas=list(BETAS), model=model_cfg.to_dict(), data_source=source,
                  train_bytes=len(train_data), val_bytes=len(val_data),
                  python=platform.python_version(), torch=torch.__version__,
                  num_threads=torch.get_num_threads())
    json_path.write_text(json.dumps({"config": config, "runs": results}, indent=1))
    print(f"wrote {png_path} and {json_path}  (total {time.perf_counter() - start:.1f} s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
