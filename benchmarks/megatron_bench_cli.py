"""The command line of benchmarks/megatron_bench.py and the runs it asks for.

No megatron-core import: CPU tests check the arguments it refuses and the runs it orders.
"""

from __future__ import annotations

import argparse
import os

VOCAB_SIZE = 256  # byte-level tokens
LABELS = {"adam": "Adam", "magma": "Magma", "magma+sparse": "Magma+sparse"}


def parse_block(text: str) -> str | int:
    """Magma's masking unit: ``tensor``, ``row`` or a chunk size N >= 1."""
    if text in ("tensor", "row"):
        return text
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'tensor', 'row' or an integer >= 1, got {text!r}")
    if size < 1:
        raise argparse.ArgumentTypeError(f"a block of {size} elements: it must be at least 1")
    return size


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The benchmark's arguments, checked against each other and against ``WORLD_SIZE`` (set by
    torchrun); exits with a usage error naming the argument otherwise."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--dp", type=int, default=None,
                   help="data-parallel size; must equal world size / --tp (the default)")
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="shard the optimizer over DP ranks with Megatron's DistributedOptimizer")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="dtype", action="store_const", const="bf16",
                           help="bf16 model, fp32 main parameters (the default)")
    precision.add_argument("--fp16", dest="dtype", action="store_const", const="fp16",
                           help="fp16 model, fp32 main parameters, dynamic loss scaling")
    p.set_defaults(dtype="bf16")
    p.add_argument("--optimizer", choices=("magma", "adam", "both"), default="both",
                   help="both: Adam, then Magma, from the same initial weights and data order")
    p.add_argument("--adam-impl", choices=("fused", "foreach"), default="fused",
                   help="the implementation of Megatron's Adam where it is torch.optim.AdamW (without Transformer "
                        "Engine or apex): fused (one kernel, as TE's FusedAdam, which Megatron users run) or "
                        "foreach (torch's default, which Megatron takes without TE or apex)")
    p.add_argument("--magma-first", action="store_true", help="with --optimizer both: run Magma (both Magma "
                   "runs with --param-gather both) before Adam")
    p.add_argument("--param-gather", choices=("dense", "sparse", "both"), default="dense",
                   help="the distributed optimizer's parameter all-gather in the Magma run: dense (Megatron's), "
                        "sparse (only the kept blocks: sparse_param_gather=True) or both (two Magma runs)")
    p.add_argument("--overlap-param-gather", action="store_true",
                   help="Megatron's overlap_grad_reduce and overlap_param_gather: each bucket group's parameter "
                        "all-gather runs from the next forward pass's pre-hooks (no param-sync time column: the "
                        "gather is inside the forward)")
    p.add_argument("--layout-json", default=None,
                   help="write the sparse gather's bucket layout record as JSON to this file "
                        "(for benchmarks/sparse_gather_projection.py and sparse_gather_bench.py)")
    p.add_argument("--keep-prob", type=float, default=0.5, help="Magma: probability of keeping a block")
    p.add_argument("--block", type=parse_block, default="tensor", help="Magma: tensor, row or N elements")
    p.add_argument("--seed", type=int, default=1234, help="weights, data order and Magma's masks")
    p.add_argument("--init", choices=("cpu", "gpu"), default="cpu",
                   help="where the weights are initialised: cpu (the same on every rank and TP size) or gpu "
                        "(faster; every run of the process starts from the first run's weights either way)")
    p.add_argument("--steps", type=int, default=100, help="training iterations per optimizer")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every optimizer this many times, the order reversed every other round; the table gives "
                        "the medians over rounds and each round's ratios")
    p.add_argument("--warmup-steps", type=int, default=10, help="first iterations left out of the timings")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512, help="tokens (bytes) per sequence")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per DP rank per iteration")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's peak learning rate")
    p.add_argument("--magma-lr", type=float, default=2e-3, help="Magma's peak learning rate")
    p.add_argument("--table", default=None, help="also write the results as Markdown to this file")
    p.add_argument("--log-every", type=int, default=10, help="iterations between progress lines")
    args = p.parse_args(argv)

    if "WORLD_SIZE" not in os.environ:
        p.error("run me under torchrun, e.g. torchrun --nproc-per-node 2 benchmarks/megatron_bench.py --tp 2")
    world = int(os.environ["WORLD_SIZE"])
    if args.tp < 1 or world % args.tp:
        p.error(f"--tp {args.tp} does not divide the world size {world}")
    if args.dp is None:
        args.dp = world // args.tp
    if args.dp != world // args.tp:
        p.error(f"--dp {args.dp} does not match the world size: {world} ranks / --tp {args.tp} "
                f"= {world // args.tp} data-parallel ranks (pipeline parallelism is 1 here)")
    for name in ("steps", "rounds", "layers", "hidden", "heads", "seq_len", "micro_batch", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.warmup_steps < args.steps:
        p.error(f"--warmup-steps {args.warmup_steps} must be in [0, --steps {args.steps})")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    if args.heads % args.tp or VOCAB_SIZE % args.tp:
        p.error(f"--tp {args.tp} must divide --heads {args.heads} and the vocabulary ({VOCAB_SIZE})")
    if args.tp > 1 and args.seq_len % args.tp:
        p.error(f"--seq-len {args.seq_len}: sequence parallelism splits it over --tp {args.tp} ranks")
    if not 0.0 < args.keep_prob <= 1.0:
        p.error(f"--keep-prob {args.keep_prob} is not in (0, 1]: at 0 Magma would change no masked weight")
    if args.lr <= 0 or args.magma_lr <= 0:
        p.error("--lr and --magma-lr must be positive")
    if args.param_gather != "dense" and not args.distributed_optimizer:
        p.error(f"--param-gather {args.param_gather} needs --distributed-optimizer: the sparse gather replaces "
                "the distributed optimizer's parameter all-gather")
    if args.param_gather != "dense" and args.optimizer == "adam":
        p.error(f"--param-gather {args.param_gather} needs a Magma run (--optimizer magma or both)")
    if args.overlap_param_gather and not args.distributed_optimizer:
        p.error("--overlap-param-gather needs --distributed-optimizer (without it there is no parameter all-gather)")
    if args.init == "gpu" and world > 1:
        p.error("--init gpu draws other weights on every rank and TP size: use it on one GPU")
    if args.layout_json and args.param_gather == "dense":
        p.error("--layout-json records the sparse gather's layout: it needs --param-gather sparse or both")
    return args


def run_names(args: argparse.Namespace) -> list[str]:
    """The runs, in order: Adam, then Magma with the dense and/or the sparse parameter gather
    (``--magma-first``: the Magma runs first)."""
    adam = ["adam"] if args.optimizer in ("adam", "both") else []
    magma = [] if args.optimizer == "adam" else {
        "dense": ["magma"], "sparse": ["magma+sparse"], "both": ["magma", "magma+sparse"]}[args.param_gather]
    return magma + adam if args.magma_first else adam + magma


def run_order(args: argparse.Namespace) -> list[list[str]]:
    """Each round's runs: :func:`run_names`, reversed in every other round (so that a drift of the
    machine over the process, warming up or throttling, does not favour one optimizer)."""
    names = run_names(args)
    return [names if r % 2 == 0 else names[::-1] for r in range(args.rounds)]


def is_magma(name: str) -> bool:
    return name != "adam"


def is_sparse(name: str) -> bool:
    """Whether the run's parameter all-gather moves only the kept blocks."""
    return name == "magma+sparse"
