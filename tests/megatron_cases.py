"""Megatron-style tensor x data parallelism built by hand on gloo: the pieces
``magma_ext.megatron.layout`` declares, checked against one process without megatron-core.

Ranks are numbered as Megatron numbers them, tensor-parallel rank fastest: rank = dp * TP + tp.
Each logical tensor is cut as Megatron cuts it (dimension 0 for column-parallel, dimension 1
for row-parallel, not at all for replicated ones); with a distributed optimizer each rank then
holds a range of its flattened TP-local tensor, cut at odd offsets.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from helpers import assert_scaled_close
from magma_ext import Magma, declare_piece
from magma_ext.megatron.layout import TensorParallelSlice, piece_arguments
from magma_ext.megatron.scores import gather_block_scores, install_block_scores
from magma_ext.types import BASES, MASKS

# (logical shape, partition dim): column-parallel weight and bias, row-parallel weights, a norm
TENSORS = [((8, 6), 0), ((8,), 0), ((6, 8), 1), ((6,), None), ((4, 10), 1), ((10, 3), 0)]
OPTIONS = dict(lr=0.03, weight_decay=0.1, keep_prob=0.5, seed=5)
STEPS = 12
COMBOS = list(itertools.product(BASES, MASKS, ["tensor", "row"]))


def logical_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape, _ in TENSORS]


def logical_grads(step):
    gen = torch.Generator().manual_seed(500 + step)
    return [torch.randn(shape, generator=gen) for shape, _ in TENSORS]


def tp_local(tensor: torch.Tensor, dim, tp_rank: int, tp_size: int) -> torch.Tensor:
    if dim is None or tp_size == 1:
        return tensor
    return tensor.chunk(tp_size, dim=dim)[tp_rank].contiguous()


def dp_range(numel: int, dp_rank: int, dp_size: int, salt: int) -> tuple[int, int]:
    """An uneven cut of ``numel`` elements among ``dp_size`` ranks (some ranges empty)."""
    cuts = [0] + [min(numel, (numel * k) // dp_size + (salt % 3) - 1) for k in range(1, dp_size)] + [numel]
    cuts = [max(0, c) for c in cuts]
    for k in range(1, len(cuts)):
        cuts[k] = max(cuts[k], cuts[k - 1])
    return cuts[dp_rank], cuts[dp_rank + 1]


def single_process(combo, steps, device="cpu"):
    """The oracle: the logical tensors stepped by one process (on ``device``; CPU results)."""
    base, mask, block = combo
    params = [torch.nn.Parameter(t.to(device)) for t in logical_params()]
    optimizer = Magma(params, base=base, mask=mask, block=block, **OPTIONS)
    history = []
    for step in range(steps):
        for p, g in zip(params, logical_grads(step)):
            p.grad = g.to(device)
        optimizer.step()
        history.append([p.detach().cpu().clone() for p in params])
    return history, [optimizer.state[p]["magma_score"].cpu().clone() for p in params]


def tp_dp_body(rank, world_size, tp_size, distributed_optimizer, combos, steps, device="cpu"):
    """One rank of a TP x DP run; returns, per combo, each held tensor's (index, TP rank, range)
    with its values at every step (on the CPU), and the gathered scores. On ``device="cuda"``
    the fused kernels run (one GPU per rank)."""
    if device == "cuda":
        torch.cuda.set_device(rank)
    dp_size = world_size // tp_size
    tp_rank, dp_rank = rank % tp_size, rank // tp_size
    dp_groups = [dist.new_group([t + tp_size * d for d in range(dp_size)]) for t in range(tp_size)]
    tp_groups = [dist.new_group([tp_size * d + t for t in range(tp_size)]) for d in range(dp_size)]
    dp_group, tp_group = dp_groups[tp_rank], tp_groups[dp_rank]
    if distributed_optimizer:
        split_group, replica_group = dist.group.WORLD, dp_group
    else:
        split_group, replica_group = tp_group, None
    out = {}
    for combo in combos:
        base, mask, block = combo
        held = []
        for index, (tensor, (_, dim)) in enumerate(zip(logical_params(), TENSORS)):
            local = tp_local(tensor, dim, tp_rank, tp_size)
            start, stop = dp_range(local.numel(), dp_rank, dp_size, index) if distributed_optimizer else (0, local.numel())
            shard = torch.nn.Parameter(local.reshape(-1)[start:stop].clone().to(device))
            tp = TensorParallelSlice(dim, tp_rank, tp_size)
            declare_piece(shard, **piece_arguments(index, tuple(local.shape), start, stop, tp,
                                                   split_group=split_group, replica_group=replica_group))
            held.append((index, dim, start, stop, shard))
        groups = [g for g in (split_group, replica_group) if g is not None]
        optimizer = Magma([h[-1] for h in held], base=base, mask=mask, block=block,
                          process_group=groups, **OPTIONS)
        history = []
        for step in range(steps):
            for (index, dim, start, stop, shard), grad in zip(held, logical_grads(step)):
                shard.grad = tp_local(grad, dim, tp_rank, tp_size).reshape(-1)[start:stop].clone().to(device)
            optimizer.step()
            history.append([h[-1].detach().cpu().clone() for h in held])
        scores = gather_block_scores(optimizer)
        for p in optimizer.state:  # a round trip through install restores them exactly
            optimizer.state[p]["magma_score"].fill_(-1.0)
        missing = install_block_scores(optimizer, scores)
        reinstalled = gather_block_scores(optimizer)
        out[combo] = dict(held=[(i, d, a, b) for i, d, a, b, _ in held], history=history, scores=scores,
                          reinstalled=reinstalled, missing=missing, tp_rank=tp_rank)
    return out


def expected_piece(logical: torch.Tensor, dim, tp_rank, tp_size, start, stop) -> torch.Tensor:
    return tp_local(logical, dim, tp_rank, tp_size).reshape(-1)[start:stop]


def check_tp_dp_run(results, tp_size, device="cpu"):
    """Every rank's pieces at every step, and the scores, against one process on ``device``."""
    for combo in COMBOS:
        history, final_scores = single_process(combo, STEPS, device)
        for result in results:
            run = result[combo]
            for k, (index, dim, start, stop) in enumerate(run["held"]):
                for step in range(STEPS):
                    want = expected_piece(history[step][index], dim, run["tp_rank"], tp_size, start, stop)
                    got = run["history"][step][k]
                    assert_scaled_close(got, want, f"{combo}, tensor {index}, step {step + 1}")
                    before = (expected_piece(history[step - 1][index], dim, run["tp_rank"], tp_size, start, stop)
                              if step else expected_piece(logical_params()[index], dim, run["tp_rank"],
                                                                 tp_size, start, stop))
                    moved = run["history"][step - 1][k] != got if step else None
                    if moved is not None:  # the same elements moved: the same masks
                        assert torch.equal(moved, want != before), f"{combo}, tensor {index}, step {step + 1}"
            for index, entry in run["scores"].items():
                if combo[1] == "magma":
                    assert_scaled_close(entry["scores"], final_scores[index], f"{combo}: scores of {index}")
                assert torch.equal(run["reinstalled"][index]["scores"], entry["scores"])
            assert run["missing"] == []


class FakeFloat16Wrapper:
    """Stands in for Megatron's Float16Optimizer/FP32Optimizer: checkpoints the inner optimizer's
    state dict under "optimizer" and loads it back."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict["optimizer"])


def checkpoint_body(rank, world_size):
    """Scores through a wrapper's checkpoint on DP-sharded pieces: saved without the per-tensor
    Magma state, resumed into a fresh optimizer that then steps exactly as the original."""
    import warnings

    from magma_ext.megatron.scores import MAGMA_STATE_KEYS, SCORES_KEY, CarriesMagmaScores

    class Wrapped(CarriesMagmaScores, FakeFloat16Wrapper):
        pass

    def build(block):
        held = []
        for index, tensor in enumerate(logical_params()):
            start, stop = dp_range(tensor.numel(), rank, world_size, index)
            shard = torch.nn.Parameter(tensor.reshape(-1)[start:stop].clone())
            declare_piece(shard, index=index, offset=start, shape=tuple(tensor.shape), group=dist.group.WORLD)
            held.append((start, stop, shard))
        return held, Wrapped(Magma([h[-1] for h in held], block=block, process_group=dist.group.WORLD, **OPTIONS))

    def step(held, wrapper, at):
        for (start, stop, shard), grad in zip(held, logical_grads(at)):
            shard.grad = grad.reshape(-1)[start:stop].clone()
        wrapper.optimizer.step()

    held, wrapper = build("row")
    for at in range(4):
        step(held, wrapper, at)
    saved = wrapper.state_dict()
    stripped = all(not set(entry) & set(MAGMA_STATE_KEYS) for entry in saved["optimizer"]["state"].values())
    fresh, resumed = build("row")
    for (_, _, a), (_, _, b) in zip(held, fresh):
        b.data.copy_(a.data)
    resumed.load_state_dict(saved)
    scores_equal = all(torch.equal(wrapper.optimizer.state[a]["magma_score"], resumed.optimizer.state[b]["magma_score"])
                       for (_, _, a), (_, _, b) in zip(held, fresh))
    for at in range(4, 8):
        step(held, wrapper, at)
        step(fresh, resumed, at)
    same_run = all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(held, fresh))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build("row")[1].load_state_dict({k: v for k, v in saved.items() if k != SCORES_KEY})
    other = build("tensor")[1].optimizer
    other.init_state()
    try:
        install_block_scores(other, saved[SCORES_KEY])  # row-block scores for tensor blocks
        mismatch = None
    except ValueError as error:
        mismatch = str(error)
    return dict(stripped=stripped, has_scores=SCORES_KEY in saved, scores_equal=scores_equal, same_run=same_run,
                warned=[str(w.message) for w in caught], mismatch=mismatch)
