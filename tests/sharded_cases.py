"""Scenarios of sharded Magma runs, shared by the multi-process CPU tests and the 2-GPU check.

Each ``*_body`` runs on one rank (``torch.distributed`` already initialized) and returns plain
tensors on the CPU; :func:`single_process_run` is the run they must equal.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from helpers import assert_scaled_close
from magma_ext import Magma
from magma_ext.pieces import declare_piece, number_parameters
from magma_ext.types import BASES, MASKS

# Odd shapes: a one-element tensor, an empty one, rows that pieces cut in the middle.
SHAPES = [(5, 7), (13,), (3, 4, 5), (1,), (0, 3), (6, 6)]
BLOCKS = ["tensor", "row", 7]
COMBOS = list(itertools.product(BASES, MASKS, BLOCKS))
OPTIONS = dict(lr=0.03, weight_decay=0.1, keep_prob=0.5, seed=11)


def initial_params(shapes=SHAPES, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device) for s in shapes]


def grads_at(step, shapes=SHAPES, device="cpu"):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen).to(device) for s in shapes]


def single_process_run(combo, steps, shapes=SHAPES, fused=False, device="cpu", names=None, options=None):
    """Per step, every parameter after the step, and the final state: the sharded runs' oracle
    (``names``: the parameters' names, which key their masks; ``options``: more keywords of
    Magma, the state dtypes say, the same in the sharded runs)."""
    base, mask, block = combo
    params = [torch.nn.Parameter(t) for t in initial_params(shapes, device=device)]
    named = params if names is None else list(zip(names, params))
    optimizer = Magma(named, base=base, mask=mask, block=block, fused=fused, **OPTIONS, **(options or {}))
    history = []
    for step in range(steps):
        for p, g in zip(params, grads_at(step, shapes, device)):
            p.grad = g
        optimizer.step()
        history.append([p.detach().cpu().clone() for p in params])
    final = [{k: v.cpu().clone() for k, v in optimizer.state[p].items() if isinstance(v, torch.Tensor)}
             for p in params]
    return history, final


def flat_cuts(shapes, world_size):
    """Where each rank's range of the concatenated parameters starts and ends, ignoring tensor
    boundaries: odd offsets, a one-element range and an empty one when there are 4 ranks."""
    total = sum(torch.Size(s).numel() for s in shapes)
    if world_size == 2:
        return [0, 71, total]
    if world_size == 4:
        return [0, 37, 38, 38, total]
    return [round(total * r / world_size) for r in range(world_size + 1)]


def _use_device(rank, device):
    if device == "cuda":
        torch.cuda.set_device(rank)


def flat_shard_body(rank, world_size, combos, steps, fused=False, device="cpu", options=None):
    """ZeRO-style: each rank holds a range of the flattened parameters, declared as pieces."""
    _use_device(rank, device)
    cuts = flat_cuts(SHAPES, world_size)
    out = {}
    for combo in combos:
        base, mask, block = combo
        pieces, ranges, start = [], [], 0
        for index, tensor in enumerate(initial_params(device=device)):
            n = tensor.numel()
            lo = min(max(cuts[rank], start), start + n) - start
            hi = min(max(cuts[rank + 1], start), start + n) - start
            piece = torch.nn.Parameter(tensor.reshape(-1)[lo:hi].clone())
            declare_piece(piece, index=index, offset=lo, shape=tensor.shape, group=dist.group.WORLD)
            pieces.append(piece)
            ranges.append((lo, hi))
            start += n
        optimizer = Magma(pieces, base=base, mask=mask, block=block, fused=fused, **OPTIONS, **(options or {}))
        history = []
        for step in range(steps):
            for piece, grad, (lo, hi) in zip(pieces, grads_at(step, device=device), ranges):
                piece.grad = grad.reshape(-1)[lo:hi].clone()
            optimizer.step()
            history.append([piece.detach().cpu().clone() for piece in pieces])
        final = [{k: v.cpu().clone() for k, v in optimizer.state[p].items() if isinstance(v, torch.Tensor)}
                 for p in pieces]
        out[combo] = (ranges, history, final)
    return out


def zero_redundancy_body(rank, world_size, steps, number_first):
    """torch's ZeroRedundancyOptimizer around Magma: each rank steps a subset of whole tensors."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    params = [torch.nn.Parameter(t) for t in initial_params()]
    if number_first:
        number_parameters(params)
    optimizer = ZeroRedundancyOptimizer(params, optimizer_class=Magma, **OPTIONS)
    history = []
    for step in range(steps):
        for p, g in zip(params, grads_at(step)):
            p.grad = g
        optimizer.step()
        history.append([p.detach().clone() for p in params])
    return history


# ---------------------------------------------------------------- models: DDP and FSDP2

def mlp(seed=0, device="cpu"):
    """Odd widths: over 4 ranks a (3, 5) weight and a (3,) bias leave one rank an empty shard."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.Tanh(),
        torch.nn.Linear(3, 9, bias=False),
    ).to(device)


def batch(step, device="cpu"):
    gen = torch.Generator().manual_seed(5000 + step)
    return torch.randn(8, 7, generator=gen).to(device), torch.randn(8, 9, generator=gen).to(device)


def _loss(model, step, rank, world_size, device):
    inputs, targets = batch(step, device)
    rows = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    return torch.nn.functional.mse_loss(model(inputs[rows]), targets[rows])


def single_process_model_run(combo, steps, fused=False, device="cpu", options=None):
    """The model trained by one process on the whole batch: what DDP and FSDP2 must equal."""
    base, mask, block = combo
    model = mlp(device=device)
    optimizer = Magma(model.parameters(), base=base, mask=mask, block=block, fused=fused, **OPTIONS,
                      **(options or {}))
    history = []
    for step in range(steps):
        _loss(model, step, 0, 1, device).backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append([p.detach().cpu().clone() for p in model.parameters()])
    return history


def ddp_body(rank, world_size, combos, steps):
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for combo in combos:
        base, mask, block = combo
        model = DistributedDataParallel(mlp())
        optimizer = Magma(model.parameters(), base=base, mask=mask, block=block, **OPTIONS)
        history = []
        for step in range(steps):
            _loss(model, step, rank, world_size, "cpu").backward()
            optimizer.step()
            optimizer.zero_grad()
            history.append([p.detach().clone() for p in model.parameters()])
        out[combo] = history
    return out


def _mesh(world_size, hsdp, device_type):
    from torch.distributed.device_mesh import init_device_mesh

    if hsdp:
        return init_device_mesh(device_type, (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (world_size,))


def fsdp_model(mesh, device="cpu"):
    from torch.distributed.fsdp import fully_shard

    model = mlp(device=device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_steps(model, optimizer, first, steps, rank, world_size, device):
    history = []
    for step in range(first, first + steps):
        _loss(model, step, rank, world_size, device).backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append([p.full_tensor().cpu().clone() for p in model.parameters()])
    return history


def fsdp_body(rank, world_size, combos, steps, hsdp=False, fused=False, device="cpu", options=None):
    """FSDP2 (fully_shard, Shard(0)) or HSDP ((Replicate(), Shard(0)) on a 2-D mesh)."""
    _use_device(rank, device)
    mesh = _mesh(world_size, hsdp, torch.device(device).type)
    out = {}
    for combo in combos:
        base, mask, block = combo
        model = fsdp_model(mesh, device)
        optimizer = Magma(model.parameters(), base=base, mask=mask, block=block, fused=fused, **OPTIONS,
                          **(options or {}))
        history = _fsdp_steps(model, optimizer, 0, steps, rank, world_size, device)
        out[combo] = history, replicated_scores(optimizer)
    return out


def replicated_scores(optimizer):
    """The local copies of every replicated (one-block) score: equal on every rank, or a
    checkpoint could save a stale one."""
    from torch.distributed.tensor import DTensor, Replicate

    scores = [state["magma_score"] for state in optimizer.state.values()]
    return [s.to_local().cpu() for s in scores
            if isinstance(s, DTensor) and all(isinstance(pl, Replicate) for pl in s.placements)]


def _checkpoint_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def dcp_save_body(rank, world_size, combo, steps, path, options=None):
    """FSDP2 on ``world_size`` ranks for ``steps`` steps, then a DCP checkpoint in ``path``."""
    import torch.distributed.checkpoint as dcp

    base, mask, block = combo
    model = fsdp_model(_mesh(world_size, False, "cpu"))
    optimizer = Magma(model.parameters(), base=base, mask=mask, block=block, **OPTIONS, **(options or {}))
    history = _fsdp_steps(model, optimizer, 0, steps, rank, world_size, "cpu")
    dcp.save(_checkpoint_state(model, optimizer), checkpoint_id=path)
    return history


def dcp_resume_body(rank, world_size, combo, first, steps, path, options=None):
    """A fresh FSDP2 run on ``world_size`` ranks that loads ``path`` and goes on from step ``first``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    base, mask, block = combo
    model = fsdp_model(_mesh(world_size, False, "cpu"))
    optimizer = Magma(model.parameters(), base=base, mask=mask, block=block, **OPTIONS, **(options or {}))
    state = _checkpoint_state(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return _fsdp_steps(model, optimizer, first, steps, rank, world_size, "cpu")


# ---------------------------------------------------------------- helpers of the comparisons

def assemble(rank_results, combo):
    """Each step's whole parameters from every rank's pieces of :func:`flat_shard_body`."""
    steps = len(rank_results[0][combo][1])
    history = []
    for step in range(steps):
        tensors = []
        for index, shape in enumerate(SHAPES):
            flat = torch.empty(torch.Size(shape).numel())
            for result in rank_results:
                ranges, rank_history, _ = result[combo]
                lo, hi = ranges[index]
                flat[lo:hi] = rank_history[step][index]
            tensors.append(flat.view(shape))
        history.append(tensors)
    return history


def moved(history):
    """Per step after the first, per parameter: which elements changed on that step."""
    return [[a != b for a, b in zip(now, before)] for before, now in zip(history, history[1:])]


# ---------------------------------------------------------------- the demo's Llama under FSDP2

LLAMA_BATCH, LLAMA_SEQ = 8, 64


def demo_llama(device):
    from magma_ext.demo import Llama, LlamaConfig

    torch.manual_seed(0)
    return Llama(LlamaConfig(dim=128, n_layers=2, n_heads=4, max_seq_len=LLAMA_SEQ)).to(device)


def llama_tokens(step, device):
    gen = torch.Generator().manual_seed(7000 + step)
    data = torch.randint(0, 256, (LLAMA_BATCH, LLAMA_SEQ + 1), generator=gen).to(device)
    return data[:, :-1], data[:, 1:]


def _llama_optimizer(model, fused):
    from magma_ext import param_groups

    return Magma(param_groups(model, weight_decay=0.1), lr=2e-3, keep_prob=0.5, seed=3, fused=fused)


def llama_single_gpu_run(steps, world_size):
    """The demo Llama on one GPU, each batch as ``world_size`` micro-batches whose gradients add
    up to what FSDP2's reduce-scatter averages (halving is exact, so the gradients agree)."""
    model = demo_llama("cuda")
    optimizer = _llama_optimizer(model, True)
    losses, history = [], []
    for step in range(steps):
        inputs, targets = llama_tokens(step, "cuda")
        total = 0.0
        for part in range(world_size):
            rows = slice(part * LLAMA_BATCH // world_size, (part + 1) * LLAMA_BATCH // world_size)
            loss = model(inputs[rows], targets[rows])
            (loss / world_size).backward()
            total += loss.item() / world_size
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
        history.append([p.detach().cpu().clone() for p in model.parameters()])
    return losses, history


def llama_fsdp_body(rank, world_size, steps):
    """The demo Llama under FSDP2 on ``world_size`` GPUs with fused Magma."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.cuda.set_device(rank)
    mesh = init_device_mesh("cuda", (world_size,))
    model = demo_llama("cuda")
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = _llama_optimizer(model, True)
    losses, history = [], []
    rows = slice(rank * LLAMA_BATCH // world_size, (rank + 1) * LLAMA_BATCH // world_size)
    for step in range(steps):
        inputs, targets = llama_tokens(step, "cuda")
        loss = model(inputs[rows], targets[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world_size)
        history.append([p.full_tensor().cpu().clone() for p in model.parameters()])
    exchanges = optimizer._planner.exchanges()
    traffic = dict(collectives=sum(e.collectives_per_step for e in exchanges),
                   bytes=sum(e.bytes_per_step for e in exchanges))
    return losses, (history if rank == 0 else None), traffic


def bad_piece_body(rank, world_size, case):
    """Pieces that cannot be honoured: every rank must raise, naming the piece, with no state made."""
    params = [torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(3))]
    group = dist.group.WORLD
    if case == "overlap":  # rank 1 claims elements rank 0 holds
        declare_piece(params[0], index=0, offset=0 if rank == 0 else 10, shape=(8, 5), group=group)
    elif case == "shape":  # the ranks disagree on the logical shape
        declare_piece(params[0], index=0, offset=20 * rank, shape=(8, 5) if rank == 0 else (40,), group=group)
    elif case == "kind":  # one logical index claimed by two different tensors on one rank
        declare_piece(params[0], index=0, offset=20 * rank, shape=(8, 5), group=group)
        declare_piece(params[1], index=0, offset=40 * rank, shape=(80,), group=group)
    optimizer = Magma(params, **OPTIONS)
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    try:
        optimizer.step()
    except (ValueError, TypeError) as error:
        unchanged = all(torch.equal(a, p) for a, p in zip(before, params)) and not any(optimizer.state.values())
        return type(error).__name__, str(error), unchanged
    return None


def shard_dim_1_body(rank, world_size, block, steps, options=None):
    """A (5, 6) DTensor named 'encoder.weight' sharded along dim 1 (3 + 3 columns; 2 + 2 + 2 + 0
    on 4 ranks): Magma takes it with one block per tensor, with row blocks where the column
    slices are equal, and refuses it otherwise, naming it."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _mesh(world_size, False, "cpu")
    param = torch.nn.Parameter(distribute_tensor(initial_params([(5, 6)])[0], mesh, [Shard(1)]))
    optimizer = Magma([("encoder.weight", param)], block=block, **OPTIONS, **(options or {}))
    history = []
    for step in range(steps):
        param.grad = distribute_tensor(grads_at(step, [(5, 6)])[0], mesh, [Shard(1)])
        try:
            optimizer.step()
        except ValueError as error:
            return str(error), not any(optimizer.state.values())
        history.append([param.full_tensor().clone()])
    return history


def assert_same_history(actual, expected, what, **tolerance):
    """Every step's parameters within tolerance (``assert_scaled_close``'s, or ``tolerance``),
    and the same elements moved at every step."""
    assert len(actual) == len(expected)
    for step, (got, want) in enumerate(zip(actual, expected)):
        for i, (a, e) in enumerate(zip(got, want)):
            assert_scaled_close(a, e, f"{what}: step {step + 1}, parameter {i}", **tolerance)
    for step, (got, want) in enumerate(zip(moved(actual), moved(expected)), start=2):
        for i, (a, e) in enumerate(zip(got, want)):  # the same elements moved: the same masks
            assert torch.equal(a, e), f"{what}: step {step}, parameter {i}: different blocks moved"
