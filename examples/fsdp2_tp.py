"""Magma on a 2-D mesh: tensor parallelism inside each data-parallel replica, FSDP2 over them.

The layout torchtitan trains large models with, built from PyTorch's own APIs only:
``init_device_mesh`` makes a ``("dp", "tp")`` mesh, ``parallelize_module`` cuts the projections
on ``tp`` (column-wise ``up``, row-wise ``down``, the norm sequence-parallel), and ``fully_shard``
shards every parameter further over ``dp``. Magma is then built as AdamW would be. Run it on 4
CPU processes (gloo) or 4 GPUs (NCCL) from the repository root::

    torchrun --nproc-per-node 4 examples/fsdp2_tp.py            # dp 2 x tp 2, CPU
    torchrun --nproc-per-node 4 examples/fsdp2_tp.py --cuda     # the same on 4 GPUs

It trains a tiny residual MLP on a fixed random regression for a few steps, prints the loss,
and saves a ``torch.distributed.checkpoint`` that loads on any other layout (one process, dp 4).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

from magma_ext import Magma


class Block(torch.nn.Module):
    """x + down(gelu(up(norm(x)))), over (batch, sequence, dim) activations."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def build(mesh, dim=64, hidden=256, layers=2) -> torch.nn.Sequential:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(*(Block(dim, hidden) for _ in range(layers)))
    for block in model:
        # the sequence dimension (1) is split across tp outside the projections (sequence parallelism)
        parallelize_module(block, mesh["tp"], {
            "norm": SequenceParallel(),
            "up": ColwiseParallel(input_layouts=Shard(1)),
            "down": RowwiseParallel(output_layouts=Shard(1)),
        })
        fully_shard(block, mesh=mesh["dp"])
    return fully_shard(model, mesh=mesh["dp"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--checkpoint", default="fsdp2_tp_checkpoint")
    args = parser.parse_args()
    device = "cuda" if args.cuda else "cpu"
    dist.init_process_group("nccl" if args.cuda else "gloo")
    if args.cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    world = dist.get_world_size()
    mesh = init_device_mesh(device, (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
    model = build(mesh)  # fully_shard moves the parameters to the mesh's device
    # names key the masks: every layout of this model, one process included, draws the same ones
    optimizer = Magma(model.named_parameters(), lr=3e-3, weight_decay=0.1, keep_prob=0.5, block="row")

    dp_rank, tp_rank = mesh.get_coordinate()
    generator = torch.Generator().manual_seed(dp_rank)  # one batch per dp replica, shared by its tp ranks
    for step in range(args.steps):
        inputs = torch.randn(8, 16, 64, generator=generator)
        targets = torch.sin(inputs).flip(-1)
        sequence = slice(tp_rank * 16 // args.tp, (tp_rank + 1) * 16 // args.tp)  # this tp rank's positions
        loss = torch.nn.functional.mse_loss(model(inputs[:, sequence].to(device)), targets[:, sequence].to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dist.all_reduce(mean := loss.detach().clone())
        if dist.get_rank() == 0:
            print(f"step {step + 1}: loss {mean.item() / world:.4f}")

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=args.checkpoint)
    if dist.get_rank() == 0:
        placements = {name: tuple(p.placements) for name, p in model.named_parameters()}
        print(f"saved {args.checkpoint}; placements on the {tuple(mesh.shape)} mesh:")
        for name, placement in placements.items():
            print(f"  {name}: {placement}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
