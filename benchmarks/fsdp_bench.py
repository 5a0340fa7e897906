"""Magma against torch.optim.AdamW(fused=True) on the same FSDP2 model, several GPUs, one run.

Usage (from the repository root, on a machine with N GPUs; keep NVLink multicast off)::

    NCCL_NVLS_ENABLE=0 python benchmarks/fsdp_bench.py --gpus 2 --out benchmarks/results/fsdp_....md
    NCCL_NVLS_ENABLE=0 python benchmarks/fsdp_bench.py --gpus 2 --tp 2 --out benchmarks/results/fsdp_tp_....md

The model is the demo's Llama scaled to Llama-1B shapes (vocab 32000, dim 2048, 22 layers,
MLP 5632: 1.26 B float32 parameters), wrapped with ``fully_shard`` per block and at the root,
its forward under bfloat16 autocast.  With ``--tp T`` the GPUs form a ``(gpus / T) x T`` mesh
``("dp", "tp")``: each block's attention and MLP projections are first made tensor-parallel on
``tp`` (``wq``/``wk``/``wv``/``w1``/``w3`` column-wise, ``wo``/``w2`` row-wise; embedding, norms
and head replicated), then ``fully_shard`` runs over ``dp``; the ranks of a ``tp`` group read the
same batches.  For each optimizer the same model (same weights, same
batches) takes warm-up steps, then timed training steps: CUDA events around the whole step
(forward, backward, optimizer) and around ``optimizer.step()`` alone; medians over the timed
steps of rank 0 (every rank runs the same work).  The score all-reduce of Magma's sharded
blocks (``BlockSumExchange.reduce_``) is timed alone on a buffer of its size.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magma_ext import Magma  # noqa: E402
from magma_ext.demo import Llama, LlamaConfig  # noqa: E402

CASES = [
    ("AdamW(fused=True)", None),
    ("Magma keep 0.5, tensor blocks", dict(keep_prob=0.5, block="tensor")),
    ("Magma keep 0.1, tensor blocks", dict(keep_prob=0.1, block="tensor")),
    ("Magma keep 0.5, row blocks", dict(keep_prob=0.5, block="row")),
]
LR = 1e-4


def _timed(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _model(args, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, dim=2048, n_layers=args.layers, n_heads=16, mlp_hidden=5632,
                         max_seq_len=args.seq)
    with torch.device("cuda"):
        model = Llama(config)
    if args.tp > 1:
        plan = {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
                "attn.wo": RowwiseParallel(), "mlp.w1": ColwiseParallel(), "mlp.w3": ColwiseParallel(),
                "mlp.w2": RowwiseParallel()}
        for block in model.blocks:
            parallelize_module(block, mesh["tp"], plan)
        mesh = mesh["dp"]
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _optimizer(model, options):
    if options is None:
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, fused=True)
    return Magma(model.parameters(), lr=LR, weight_decay=0.01, fused=True, **options)


def _exchanges(optimizer):
    return optimizer._planner.exchanges()


def _train_step(model, optimizer, args, generator, opt_ms, host_ms=None):
    tokens = torch.randint(0, 32000, (args.batch, args.seq + 1), device="cuda", generator=generator)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    host = []
    opt_ms.append(_timed(lambda: host.append(_host_ms(optimizer.step))))
    if host_ms is not None:
        host_ms.extend(host)
    optimizer.zero_grad(set_to_none=True)


def _aligned(fn) -> float:
    """``_timed(fn)`` with every rank idle and past a barrier first: the step's own time, without
    the wait for a slower rank that a collective inside it would otherwise absorb."""
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()
    return _timed(fn)


def _host_ms(fn) -> float:
    """Milliseconds the host spends in ``fn`` (launching its work, which runs on asynchronously)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _measure(model, args, rank, world):
    """Every optimizer over the same model, in interleaved rounds so that drift hits all alike."""
    optimizers = {name: _optimizer(model, options) for name, options in CASES}
    generator = torch.Generator(device="cuda").manual_seed(1234 + rank // args.tp)  # tp ranks: one batch
    step_ms = {name: [] for name in optimizers}
    opt_ms = {name: [] for name in optimizers}
    host_ms = {name: [] for name in optimizers}
    for name, optimizer in optimizers.items():  # state, plans and the exchanges' handshakes
        for _ in range(args.warmup):
            _train_step(model, optimizer, args, generator, [])
    for _ in range(args.rounds):
        for name, optimizer in optimizers.items():
            _train_step(model, optimizer, args, generator, [])  # first step after a switch: untimed
            for _ in range(args.steps):
                step_ms[name].append(_timed(
                    lambda: _train_step(model, optimizer, args, generator, opt_ms[name], host_ms[name])))
    aligned_ms = {name: [] for name in optimizers}
    for name, optimizer in optimizers.items():  # the optimizer step alone, ranks aligned
        _train_step(model, optimizer, args, generator, [])
        tokens = torch.randint(0, 32000, (args.batch, args.seq + 1), device="cuda", generator=generator)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(tokens[:, :-1], tokens[:, 1:]).backward()
        aligned_ms[name] = [_aligned(optimizer.step) for _ in range(args.rounds * args.steps)]
        optimizer.zero_grad(set_to_none=True)
    results = {}
    for name, optimizer in optimizers.items():
        median_step = float(np.median(step_ms[name]))
        results[name] = dict(step_ms=median_step, opt_ms=float(np.median(opt_ms[name])),
                             opt_spread=(float(np.min(opt_ms[name])), float(np.max(opt_ms[name]))),
                             host_ms=float(np.median(host_ms[name])),
                             aligned_ms=float(np.median(aligned_ms[name])),
                             tokens_per_s=world // args.tp * args.batch * args.seq / (median_step * 1e-3))
        results[name].update(_exchange_cost(model, optimizer, args, generator))
    results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return results


def _exchange_cost(model, optimizer, args, generator) -> dict:
    """The score all-reduce alone (on a buffer of its size) and inside the optimizer step: the
    step timed with and without it (without, the scores are wrong but the kernels the same)."""
    exchanges = _exchanges(optimizer)
    if not exchanges:
        return {}
    buffers = [torch.zeros((e.num_rows, 3), device="cuda") for e in exchanges]

    def reduce_all():
        for exchange, buffer in zip(exchanges, buffers):
            exchange.reduce_(buffer)

    for _ in range(5):
        reduce_all()
    alone_us = float(np.median([_timed(reduce_all) for _ in range(50)])) * 1e3
    tokens = torch.randint(0, 32000, (args.batch, args.seq + 1), device="cuda", generator=generator)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
    plans = [device for plan in optimizer._planner._plans.values() for device in getattr(plan, "devices", ())
             if device.exchange is not None]
    with_ms, without_ms = [], []
    for _ in range(args.rounds * args.steps):
        with_ms.append(_aligned(optimizer.step))
        for plan in plans:
            plan.exchange, plan.saved = None, plan.exchange
        without_ms.append(_aligned(optimizer.step))
        for plan in plans:
            plan.exchange = plan.saved
    optimizer.zero_grad(set_to_none=True)
    return dict(reduce_us=alone_us, in_step_us=(float(np.median(with_ms)) - float(np.median(without_ms))) * 1e3,
                reduce_bytes=sum(e.bytes_per_step for e in exchanges),
                collectives=sum(e.collectives_per_step for e in exchanges))


def _rank_main(rank, world, port, args, queue):
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        if args.tp > 1:
            mesh = init_device_mesh("cuda", (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
        else:
            mesh = init_device_mesh("cuda", (world,))
        model = _model(args, mesh)
        params = sum(p.numel() for p in model.parameters())
        results = _measure(model, args, rank, world)
        if rank == 0:
            queue.put((params, results))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table(params, results, args, world) -> str:
    base = results[CASES[0][0]]
    lines = [
        "# Magma vs AdamW(fused=True) under FSDP2" + (f" over tensor parallelism (tp {args.tp})" if args.tp > 1 else ""),
        "",
        f"- device: {world} x {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
        f"date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- model: demo Llama at Llama-1B shapes, {params / 1e9:.2f} B float32 parameters, "
        f"{args.layers} layers, fully_shard per block and at the root (Shard(0))"
        + (f" over dp {world // args.tp}, after ColwiseParallel/RowwiseParallel projections on tp {args.tp}"
           if args.tp > 1 else "") + ", bf16 autocast",
        f"- batch {args.batch} x {args.seq} tokens per data-parallel rank; {args.warmup} warm-up steps per optimizer, then "
        f"{args.rounds} interleaved rounds of 1 untimed and {args.steps} timed steps each; medians of rank 0; "
        "lr 1e-4, weight decay 0.01, all parameters masked",
        f"- command: `python benchmarks/fsdp_bench.py {' '.join(sys.argv[1:])}`",
        "",
        "| optimizer | optimizer step, ranks aligned, ms | vs AdamW | optimizer step in the loop, ms (min-max) "
        "| vs AdamW | host ms | whole step ms | tokens/s | vs AdamW "
        "| score all-reduce: collectives, bytes | alone µs | in the step µs (% of aligned step) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, _ in CASES:
        r = results[name]
        reduce = "— | — | —"
        if "reduce_us" in r:
            reduce = (f"{r['collectives']}, {r['reduce_bytes']:,} B | {r['reduce_us']:.1f} | "
                      f"{r['in_step_us']:.1f} ({100 * r['in_step_us'] / 1e3 / r['aligned_ms']:.2f}%)")
        lines.append(
            f"| {name} | {r['aligned_ms']:.3f} | {r['aligned_ms'] / base['aligned_ms']:.3f} | "
            f"{r['opt_ms']:.3f} ({r['opt_spread'][0]:.2f}-{r['opt_spread'][1]:.2f}) | "
            f"{r['opt_ms'] / base['opt_ms']:.3f} | {r['host_ms']:.2f} | {r['step_ms']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.3f} | {reduce} |"
        )
    lines += [
        "",
        f"Peak GPU memory of rank 0 with all four optimizers' state held at once: {results['peak_gib']:.1f} GiB.",
        "Optimizer step, ranks aligned: CUDA events around `optimizer.step()` started after a device sync and a "
        "barrier on every rank (the step's own time). In the loop: events around `optimizer.step()` after each "
        "timed step's backward; a step with a collective inside also waits there for the slower rank's host, "
        "a wait AdamW's step leaves to the next forward's all-gather. Host ms: the host's time inside `step()`. "
        "Whole step: "
        f"events around forward, backward and optimizer step; {args.rounds} rounds of {args.steps} steps per "
        "optimizer, interleaved. Score all-reduce alone: `BlockSumExchange.reduce_` on an idle GPU, median of "
        "50; in the step: median aligned optimizer step with it minus without it (same kernels otherwise).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per optimizer and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (divides --gpus)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tp < 1 or args.gpus % args.tp:
        parser.error(f"--tp {args.tp} must divide --gpus {args.gpus}")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    context = torch.multiprocessing.get_context("spawn")
    queue = context.Queue()
    torch.multiprocessing.start_processes(_rank_main, args=(args.gpus, _free_port(), args, queue),
                                          nprocs=args.gpus, start_method="spawn", join=True)
    params, results = queue.get()
    text = _table(params, results, args, args.gpus)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
