"""Scenarios of Magma under tensor parallelism (DTensor's ``parallelize_module``), alone and with
FSDP2 over it on a 2-D ``dp x tp`` mesh, and their DCP checkpoints across layouts.

Each ``*_body`` runs on one rank (``torch.distributed`` already initialized) and returns plain
CPU tensors; :func:`single_process_run` is the run they must equal. The model's odd sizes make
uneven shards: ``up`` (10 rows) is cut 5 + 5 by tp and each half 3 + 2 by dp (FSDP2's
``_StridedShard``), ``head`` (3 rows) leaves a dp-4 rank an empty shard.
"""

from __future__ import annotations

import itertools

import torch

from magma_ext import Magma
from magma_ext.types import BASES, MASKS

DIM, HIDDEN, OUT, BATCH, SEQ = 6, 10, 3, 8, 4
BLOCKS = ["tensor", "row", 7]
COMBOS = list(itertools.product(BASES, MASKS, BLOCKS))
OPTIONS = dict(lr=0.03, weight_decay=0.1, keep_prob=0.5, seed=11)
# cut into column slices by RowwiseParallel, so it cannot take N-element blocks (docs/distributed.md)
COLUMN_SLICED = "down.weight"


class Tiny(torch.nn.Module):
    """norm -> up -> tanh -> down -> head, over (batch, seq, DIM) inputs."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(DIM)
        self.up = torch.nn.Linear(DIM, HIDDEN)
        self.down = torch.nn.Linear(HIDDEN, DIM)
        self.head = torch.nn.Linear(DIM, OUT, bias=False)

    def forward(self, x):
        return self.head(self.down(torch.tanh(self.up(self.norm(x)))))


def tiny(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def optimizer_for(model, combo):
    """Magma over the model's named parameters; under ``block=N`` the column-sliced weight takes
    row blocks in a group of its own (the same groups in every layout)."""
    base, mask, block = combo
    named = list(model.named_parameters())
    if isinstance(block, str):
        groups = [{"params": named}]
    else:
        groups = [{"params": [(n, p) for n, p in named if n != COLUMN_SLICED]},
                  {"params": [(n, p) for n, p in named if n == COLUMN_SLICED], "block": "row"}]
    return Magma(groups, base=base, mask=mask, block=block, **OPTIONS)


def batch(step):
    gen = torch.Generator().manual_seed(9000 + step)
    return torch.randn(BATCH, SEQ, DIM, generator=gen), torch.randn(BATCH, SEQ, OUT, generator=gen)


def full(tensor):
    """A parameter or state tensor as one process holds it."""
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def parallelize(model, tp_mesh, sequence_parallel):
    """Megatron-style TP: ``up`` column-parallel, ``down`` row-parallel; with
    ``sequence_parallel`` the norm runs on sequence shards (its weights ``Replicate()`` on tp)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    plan = {"up": ColwiseParallel(input_layouts=Shard(1) if sequence_parallel else Replicate()),
            "down": RowwiseParallel(output_layouts=Replicate())}
    if sequence_parallel:
        plan["norm"] = SequenceParallel()
    return parallelize_module(model, tp_mesh, plan)


def layout_model(dp, tp, sequence_parallel=True, replicas=1):
    """The model on a ``dp x tp`` mesh (``replicas x dp x tp`` for HSDP): TP on ``tp`` (if > 1),
    then FSDP2 over ``dp`` (if > 1; HSDP over ``("replicate", "dp")`` with ``replicas``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny()
    if replicas == 1:
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    else:
        mesh = init_device_mesh("cpu", (replicas, dp, tp), mesh_dim_names=("replicate", "dp", "tp"))
    if tp > 1:
        parallelize(model, mesh["tp"], sequence_parallel)
    if dp > 1:
        data_mesh = mesh["dp"] if replicas == 1 else mesh["replicate", "dp"]
        for layer in (model.up, model.down):
            fully_shard(layer, mesh=data_mesh)
        fully_shard(model, mesh=data_mesh)
    return model, mesh


def _local_inputs(model_mesh, step, sequence_parallel):
    """This rank's rows of the batch (by its coordinates but the last, tp) and, under sequence
    parallelism, its sequence positions (by its tp coordinate)."""
    *data, tp = model_mesh.shape
    *place, t = model_mesh.get_coordinate()
    dp, d = 1, 0
    for size, i in zip(data, place):
        dp, d = dp * size, d * size + i
    inputs, targets = batch(step)
    rows = slice(d * BATCH // dp, (d + 1) * BATCH // dp)
    inputs, targets = inputs[rows], targets[rows]
    if sequence_parallel and tp > 1:
        inputs = inputs[:, t * SEQ // tp:(t + 1) * SEQ // tp]
    return inputs, targets


def train(model, mesh, optimizer, first, steps, sequence_parallel=True):
    """``steps`` steps from step ``first``; every parameter, whole, after each."""
    history = []
    for step in range(first, first + steps):
        inputs, targets = _local_inputs(mesh, step, sequence_parallel)
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append([full(p) for p in model.parameters()])
    return history


def final_scores(optimizer, model):
    """Every parameter's scores, whole (``state_dict()`` gathers N-element blocks' scores)."""
    state = optimizer.state_dict()["state"]
    return [full(state[i]["magma_score"]) for i in range(len(list(model.parameters())))]


def single_process_run(combo, steps):
    """The model trained by one process on the whole batch: the oracle. Per step every
    parameter, and the final scores."""
    model = tiny()
    optimizer = optimizer_for(model, combo)
    history = []
    for step in range(steps):
        inputs, targets = batch(step)
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append([p.detach().clone() for p in model.parameters()])
    return history, final_scores(optimizer, model)


def layout_body(rank, dp, tp, cases, steps, replicas=1):
    """``cases``: (combo, sequence_parallel) pairs, each trained for ``steps`` steps on a
    ``dp x tp`` layout (``replicas x dp x tp``: HSDP over TP); their histories and final scores."""
    out = {}
    for combo, sequence_parallel in cases:
        model, mesh = layout_model(dp, tp, sequence_parallel, replicas)
        optimizer = optimizer_for(model, combo)
        history = train(model, mesh, optimizer, 0, steps, sequence_parallel)
        out[(combo, sequence_parallel)] = history, final_scores(optimizer, model)
    return out


def _checkpoint_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def dcp_save_body(rank, dp, tp, paths, steps):
    """Per block option (``paths``: block -> directory), ``steps`` steps on ``dp x tp`` and a DCP
    checkpoint."""
    import torch.distributed.checkpoint as dcp

    out = {}
    for block, path in paths.items():
        model, mesh = layout_model(dp, tp)
        optimizer = optimizer_for(model, ("adam", "magma", block))
        out[block] = train(model, mesh, optimizer, 0, steps)
        dcp.save(_checkpoint_state(model, optimizer), checkpoint_id=path)
    return out


def dcp_resume_body(rank, dp, tp, paths, first, steps):
    """Per block option, a fresh ``dp x tp`` run that loads its checkpoint and goes on from step
    ``first`` (dp = tp = 1: one process, plain tensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    out = {}
    for block, path in paths.items():
        model, mesh = layout_model(dp, tp)
        optimizer = optimizer_for(model, ("adam", "magma", block))
        state = _checkpoint_state(model, optimizer)
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        out[block] = train(model, mesh, optimizer, first, steps)
    return out


def refused_body(rank, world_size, cases):
    """DTensor layouts Magma cannot honour, per ``(placements, shape, block)`` case: what each
    rank raised, and whether the parameter and the optimizer's state stayed untouched."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, distribute_tensor

    def dtensor(shape, placements):
        if isinstance(placements[0], Partial):  # not something distribute_tensor makes
            return DTensor.from_local(torch.randn(shape), mesh, placements)
        return distribute_tensor(torch.randn(shape), mesh, placements)

    mesh = init_device_mesh("cpu", (world_size,))
    out = []
    for placements, shape, block in cases:
        param = torch.nn.Parameter(dtensor(shape, placements))
        param.grad = dtensor(shape, placements)
        optimizer = Magma([("layer.weight", param)], block=block, **OPTIONS)
        before = param.detach().to_local().clone()
        try:
            optimizer.step()
            out.append(None)
        except ValueError as error:
            unchanged = torch.equal(param.detach().to_local(), before) and not any(optimizer.state.values())
            out.append((str(error), unchanged))
    return out


def group_body(rank):
    """:func:`magma_ext.mesh_groups.group_over` on a (2, 2, 1) mesh: dimensions 1 and 2 are not
    the whole world, so a group is made (once) over ranks {0, 1} or {2, 3}; its all-reduce adds
    those ranks' numbers."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from magma_ext.mesh_groups import group_over

    mesh = init_device_mesh("cpu", (2, 2, 1))
    group = group_over(mesh, (1, 2))
    total = torch.tensor([float(rank)])
    dist.all_reduce(total, group=group)
    return dist.get_process_group_ranks(group), total.item(), group_over(mesh, (2, 1)) is group
