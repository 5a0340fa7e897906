"""Time the sparse parameter sync's routes against a dense all-gather, on real bucket layouts.

    torchrun --nproc-per-node 2 benchmarks/sparse_gather_bench.py layout.json \
        --keep-probs 0.5 0.1 --steps 60 --warmup 10 --chunk-mib 16 64 --out sparse_gather_bench.md

``layout.json`` is a bucket layout record (``benchmarks/megatron_bench.py ... --layout-json``,
``benchmarks/sparse_gather_record.py``). Each rank allocates the record's buckets (random
values, the record's element sizes as bf16/fp32) on its GPU (or, without one, on the CPU over
gloo: a smoke test) and, per step and keep_prob
(it replaces every masked rule's), changes the changed elements of its own shard, then syncs
the buckets several ways, each timed with CUDA events around the sync alone:

- *dense*: ``all_gather_into_tensor`` of every bucket in place (Megatron's gather without
  overlap), into a copy of the buckets that serves as the oracle;
- *in place*: ``SparseGather.sync`` with the in-place point-to-point route forced;
- *packed (one chunk)*: the packed all-gather route forced, its buffer moved whole;
- *packed (N MiB chunks)*: the packed route in chunks of N MiB per rank
  (``SparseGather.chunk_bytes``), for each N of ``--chunk-mib``.

After every step each sparse copy must equal the dense one bit for bit (the script fails if
not). Reported per keep_prob: median milliseconds after ``--warmup`` steps, the ratio to dense,
and sent + received bytes per step as ``SparseGather`` counts them. The buckets must have been
recorded at the data-parallel size the script runs with, or a multiple of it (each is padded to a
multiple of the ranks, as Megatron pads them).
"""

from __future__ import annotations

import os

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# first: it puts the checkout on sys.path where magma_ext is not installed
from sparse_gather_record import buckets_of_record, padded_numel, with_keep_prob  # noqa: E402
from step_bench import time_call  # noqa: E402

from magma_ext.megatron.buckets import Bucket  # noqa: E402
from magma_ext.megatron.sparse_gather import SparseGather  # noqa: E402

DTYPES = {2: torch.bfloat16, 4: torch.float32}


def variants(chunk_mib: list[int]) -> dict[str, dict]:
    """Each timed sync's name and the SparseGather settings that make it."""
    out = {"in place": dict(route="in place"), "packed (one chunk)": dict(route="packed", max_chunks=1)}
    for mib in chunk_mib:
        out[f"packed ({mib} MiB chunks)"] = dict(route="packed", chunk_bytes=mib * 2**20)
    return out


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("layout")
    p.add_argument("--keep-probs", type=float, nargs="+", default=[0.5, 0.1])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--chunk-mib", type=int, nargs="+", default=[64],
                   help="the packed route's chunk sizes to time, MiB per rank")
    p.add_argument("--out", default=None, help="Markdown table to write (rank 0)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    with open(args.layout) as f:
        record_buckets, rules = buckets_of_record(json.load(f))
    # padded to a multiple of the ranks, as Megatron pads them (a no-op for the recorded DP size)
    record_buckets = [(padded_numel(numel, size), item, tensors) for numel, item, tensors in record_buckets]
    gen = torch.Generator(device=device).manual_seed(1234)
    dense = [torch.randn(numel, generator=gen, device=device).to(DTYPES[item]) for numel, item, _ in record_buckets]
    for d in dense:
        dist.broadcast(d, src=0)
    settings = variants(args.chunk_mib)
    copies = {name: [Bucket(d.clone(), tensors) for d, (_, _, tensors) in zip(dense, record_buckets)]
              for name in settings}
    gathers = {name: SparseGather(buckets, dist.group.WORLD, rank, size) for name, buckets in copies.items()}
    for name, gather in gathers.items():
        for attribute, value in settings[name].items():
            setattr(gather, attribute, value)
    rows = []
    for keep_prob in args.keep_probs:
        step_rules = with_keep_prob(rules, keep_prob)
        times = {"dense": [], **{name: [] for name in settings}}
        moved = {name: [] for name in settings}
        planning = {name: [] for name in settings}  # host ms to work out a step's plan
        for step in range(1, args.steps + 1):
            layout = gathers["in place"].layout(step_rules, step)
            for d, per_rank, buckets in zip(dense, layout, zip(*copies.values())):
                shard = d.numel() // size
                mine = d[rank * shard:(rank + 1) * shard]
                noise = torch.randn(shard, generator=gen, device=device).to(d.dtype)
                for a, b in per_rank[rank].tolist():
                    mine[a:b] += noise[a:b]
                for bucket in buckets:
                    bucket.param_data[rank * shard:(rank + 1) * shard].copy_(mine)
            times["dense"].append(time_call(lambda: [
                dist.all_gather_into_tensor(d, d[rank * (d.numel() // size):(rank + 1) * (d.numel() // size)])
                for d in dense], device))
            for route, gather in gathers.items():
                traffic = []
                times[route].append(time_call(lambda: traffic.append(gather.sync(step_rules, step)), device))
                moved[route].append(traffic[0].sent + traffic[0].received)
                started = time.perf_counter()
                gather.plan(step_rules, step + 1)
                planning[route].append((time.perf_counter() - started) * 1e3)
                same = all(torch.equal(b.param_data.view(torch.int16 if b.param_data.element_size() == 2
                                                         else torch.int32),
                                       d.view(torch.int16 if d.element_size() == 2 else torch.int32))
                           for b, d in zip(copies[route], dense))
                flag = torch.tensor([int(same)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                if not flag.item():
                    raise SystemExit(f"step {step}, keep_prob {keep_prob}: the {route} route differs from dense")
        dense_bytes = gathers["in place"].dense_bytes()
        dense_moved = dense_bytes.dense_sent + dense_bytes.dense_received
        dense_ms = statistics.median(times["dense"][args.warmup:])
        rows.append((keep_prob, "dense", dense_ms, 1.0, dense_moved, 1.0, "-"))
        for route in settings:
            ms = statistics.median(times[route][args.warmup:])
            mean_moved = statistics.fmean(moved[route][args.warmup:])
            plan_ms = f"{statistics.median(planning[route][args.warmup:]):.3f}"
            rows.append((keep_prob, route, ms, ms / dense_ms, mean_moved, mean_moved / dense_moved, plan_ms))
    if rank == 0:
        numel = sum(n for n, _, _ in record_buckets)
        lines = [
            "# Sparse parameter sync: routes against a dense all-gather",
            "",
            f"- device: {size} x {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (gloo)'}; torch {torch.__version__}; "
            f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
            f"- layout: {args.layout}: {len(record_buckets)} bucket(s), {numel:,} elements",
            f"- {args.steps} steps per keep_prob, medians over the last {args.steps - args.warmup}; every sparse "
            "step checked bit for bit against the dense gather",
            "- *host plan ms*: the host's time to work out one step's plan (layout, views, transfers); "
            "each sync does it for the next step while its transfers run, inside the timed sync",
            "",
            "| keep_prob | sync | ms (median) | time vs dense | MiB sent + received (rank 0) | bytes vs dense "
            "| host plan ms |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {k} | {route} | {ms:.3f} | {ratio:.3f} | {b / 2**20:,.1f} | {fraction:.3f} | {plan} |"
                  for k, route, ms, ratio, b, fraction, plan in rows]
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
