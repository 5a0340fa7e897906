"""The Magma step in plain PyTorch: the readable statement of docs/ALGORITHM.md.

A step is two halves, so that a sharded run can add the partial sums of blocks split across
ranks between them (docs/ALGORITHM.md section 3):

- :func:`moments_and_sums` computes the new moments (as their state stores them: bfloat16 state
  rounded stochastically, docs/ALGORITHM.md section 6), the direction and, for mask "magma",
  each block's sums ``<m, g>, ||m||^2, ||g||^2`` (``block_sums``, shape (blocks, 3), rows in
  list order); it writes nothing.
- :func:`finalize_and_apply` forms the scores from ``block_sums``, draws the masks and commits
  every new value at once, so a skipped step (``found_inf``) leaves everything untouched.

:func:`magma_step` is the two back to back.  All of it runs with foreach ops and no
host-device synchronisation.  The CUDA kernels are tested against these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import param_remainders
from .layout import BlockLayout
from .philox import keep_mask
from .rounding import EXP_AVG, EXP_AVG_SQ, moment_noise, rounding_words, stochastic_round
from .types import GroupTensors, Hyper


@dataclass
class BlockIndex:
    """Per-block and per-element bookkeeping of a list of layouts, as device tensors."""

    lengths: torch.Tensor  # elements of each block, all tensors' blocks concatenated
    block_index: torch.Tensor  # global block index of each block
    tensor_index: torch.Tensor  # tensor index of each block
    block_counts: torch.Tensor  # blocks of each tensor
    blocks_per_tensor: list[int]
    numels: list[int]


def build_block_index(layouts: list[BlockLayout], tensor_indices: list[int], device) -> BlockIndex:
    """Flatten the blocks of many tensors into one list (cache the result: it allocates)."""
    lengths, block_index, tensor_index = [], [], []
    for layout, index in zip(layouts, tensor_indices):
        lengths += layout.lengths()
        block_index += range(layout.first_block, layout.first_block + layout.num_blocks)
        tensor_index += [index] * layout.num_blocks
    as_long = dict(dtype=torch.int64, device=device)
    return BlockIndex(
        lengths=torch.tensor(lengths, **as_long),
        block_index=torch.tensor(block_index, **as_long),
        tensor_index=torch.tensor(tensor_index, **as_long),
        block_counts=torch.tensor([layout.num_blocks for layout in layouts], **as_long),
        blocks_per_tensor=[layout.num_blocks for layout in layouts],
        numels=[layout.numel for layout in layouts],
    )


@dataclass
class Moments:
    """The first half of a step: new values not yet written, and the blocks' partial sums."""

    steps: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    directions: list[torch.Tensor]  # D_t, without lr and weight decay
    block_sums: torch.Tensor  # (blocks, 3) for mask "magma", else (0, 3)


def block_sums(products: list[list[torch.Tensor]], index: BlockIndex) -> torch.Tensor:
    """Sum each list of per-element products over every block: shape (blocks, len(products)).

    Tensor by tensor, so that a block's sums do not depend on the other tensors of the list
    (a model split into pipeline stages gives each stage's optimizer other lists).
    """
    per_tensor = index.lengths.split(index.blocks_per_tensor)
    sums = [torch.segment_reduce(torch.stack([p[i].reshape(-1) for p in products], dim=1), "sum",
                                 lengths=lengths, axis=0)
            for i, lengths in enumerate(per_tensor) if lengths.numel()]
    return torch.cat(sums) if sums else products[0][0].new_zeros((0, len(products)))


def alignment(dot: torch.Tensor, m_sq: torch.Tensor, g_sq: torch.Tensor) -> torch.Tensor:
    """cos(m, g) per block from its sums; 0 where either norm is 0."""
    defined = (m_sq > 0) & (g_sq > 0)
    cosine = dot / (m_sq.sqrt() * g_sq.sqrt())
    return torch.where(defined, cosine, torch.zeros_like(cosine))


def updated_scores(old: torch.Tensor, sums: torch.Tensor, hyper: Hyper) -> torch.Tensor:
    """Score EMA of every block (section 1.2); a block whose sums are not all finite keeps its score."""
    dot, m_sq, g_sq = sums.unbind(dim=1)
    instant = torch.sigmoid(alignment(dot, m_sq, g_sq) / hyper.tau)
    new = hyper.score_ema * old + (1 - hyper.score_ema) * instant
    return torch.where(torch.isfinite(sums).all(dim=1), new, old)


def _per_element(per_block: torch.Tensor, index: BlockIndex, like: list[torch.Tensor]):
    """Spread a per-block value over the elements of its block, shaped like ``like``."""
    flat = torch.repeat_interleave(per_block, index.lengths)
    return [piece.view(t.shape) for piece, t in zip(flat.split(index.numels), like)]


def _as_float32(state: list[torch.Tensor]) -> list[torch.Tensor]:
    return [s if s.dtype == torch.float32 else s.to(torch.float32) for s in state]


def _rounding_words(tensors: GroupTensors, seed: int, steps: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Each entry's words of the rounding stream at this step (None where both moments are float32)."""
    return [
        rounding_words(seed, index, layout.offset, layout.numel, step)
        if torch.bfloat16 in (m.dtype, v.dtype) else None
        for m, v, index, layout, step in zip(tensors.exp_avgs, tensors.exp_avg_sqs, tensors.tensor_indices,
                                             tensors.layouts, steps)
    ]


def _as_stored(values: list[torch.Tensor], state: list[torch.Tensor], words: list[torch.Tensor | None],
               moment: int) -> list[torch.Tensor]:
    """New float32 moment values as their state stores them: unchanged for float32 state,
    stochastically rounded (:mod:`magma_ext.rounding`) for bfloat16 state."""
    return [x if s.dtype == torch.float32 else stochastic_round(x, moment_noise(w, moment))
            for x, s, w in zip(values, state, words)]


def moments_and_sums(
    tensors: GroupTensors, hyper: Hyper, index: BlockIndex, grad_scale: torch.Tensor | None = None
) -> Moments:
    """First half of a step: dense moments and direction (section 2), and the blocks' sums."""
    h = hyper
    grads = [g.to(torch.float32) for g in tensors.grads]
    if grad_scale is not None:
        grads = torch._foreach_div(grads, grad_scale)
    steps = torch._foreach_add(tensors.steps, 1)
    bias1 = torch._foreach_add(torch._foreach_neg(torch._foreach_pow(h.beta1, steps)), 1)
    bias2 = torch._foreach_add(torch._foreach_neg(torch._foreach_pow(h.beta2, steps)), 1)

    # Each new moment is read back as its state stores it (bfloat16 state: stochastically
    # rounded, section 6) before anything else uses it.
    exp_avg_sqs = torch._foreach_mul(_as_float32(tensors.exp_avg_sqs), h.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - h.beta2)
    words = _rounding_words(tensors, h.seed, steps)
    exp_avg_sqs = _as_stored(exp_avg_sqs, tensors.exp_avg_sqs, words, EXP_AVG_SQ)
    denoms = torch._foreach_sqrt(torch._foreach_div(exp_avg_sqs, bias2))
    torch._foreach_add_(denoms, h.eps)
    exp_avgs = torch._foreach_mul(_as_float32(tensors.exp_avgs), h.beta1)
    if h.base == "laprop":
        torch._foreach_add_(exp_avgs, torch._foreach_div(grads, denoms), alpha=1 - h.beta1)
    else:
        torch._foreach_add_(exp_avgs, grads, alpha=1 - h.beta1)
    exp_avgs = _as_stored(exp_avgs, tensors.exp_avgs, words, EXP_AVG)
    if h.base == "laprop":
        directions = torch._foreach_div(exp_avgs, bias1)
    else:
        numerators = torch._foreach_div(exp_avgs, bias1) if h.base == "adam" else grads
        directions = torch._foreach_div(numerators, denoms)

    if h.mask == "magma":
        products = [
            torch._foreach_mul(exp_avgs, grads),
            torch._foreach_mul(exp_avgs, exp_avgs),
            torch._foreach_mul(grads, grads),
        ]
        sums = block_sums(products, index)
    else:
        sums = torch.zeros((0, 3), dtype=torch.float32, device=grads[0].device)
    return Moments(steps, exp_avgs, exp_avg_sqs, directions, sums)


def finalize_and_apply(
    tensors: GroupTensors,
    hyper: Hyper,
    index: BlockIndex,
    moments: Moments,
    found_inf: torch.Tensor | None = None,
) -> None:
    """Second half of a step: scores from ``moments.block_sums``, masks, update; commits all."""
    h = hyper
    directions = moments.directions
    scores = list(tensors.scores)
    keep = None
    if h.mask != "none":
        block_steps = torch.repeat_interleave(torch.stack(moments.steps).to(torch.int64), index.block_counts)
        keep_block = keep_mask(h.seed, index.tensor_index, index.block_index, block_steps, h.keep_prob)
        if h.mask == "magma":
            # tensor by tensor, as the sums: a block's score does not depend on the other tensors
            sums = moments.block_sums.split(index.blocks_per_tensor)
            scores = [updated_scores(old, block_sums, h) for old, block_sums in zip(tensors.scores, sums)]
            new_scores = torch.cat(scores)
            scale_block = torch.where(keep_block, new_scores, torch.zeros_like(new_scores))
        else:
            scale_block = keep_block.to(torch.float32) / h.keep_prob
        keep = _per_element(keep_block, index, tensors.params)
        scales = _per_element(scale_block, index, tensors.params)

    # Sections 1.4-1.5: masked, modulated update with decoupled weight decay.
    thetas = [
        m if m is not None else param_remainders.join(p, r) if r is not None
        else p.to(torch.float64 if p.dtype == torch.float64 else torch.float32)
        for p, m, r in zip(tensors.params, tensors.master_params, _remainders(tensors))
    ]
    if h.weight_decay != 0:
        directions = torch._foreach_add(directions, torch._foreach_mul(thetas, h.weight_decay))
    if keep is not None:
        directions = torch._foreach_mul(directions, scales)
    new_thetas = torch._foreach_sub(thetas, torch._foreach_mul(directions, h.lr))
    if keep is not None:
        new_thetas = [torch.where(k, new, old) for k, new, old in zip(keep, new_thetas, thetas)]

    _commit(tensors, moments, scores, new_thetas, found_inf)


def magma_step(
    tensors: GroupTensors,
    hyper: Hyper,
    index: BlockIndex,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One Magma step (docs/ALGORITHM.md section 1) over one group's tensors, in place."""
    if tensors.params:
        moments = moments_and_sums(tensors, hyper, index, grad_scale)
        finalize_and_apply(tensors, hyper, index, moments, found_inf)


def _commit(tensors: GroupTensors, moments: Moments, scores, thetas, found_inf) -> None:
    """Write the new values into the optimizer's tensors, or keep the old ones if found_inf."""

    def put(targets, values):
        if found_inf is not None:
            values = [torch.where(found_inf > 0, old, new.to(old.dtype)) for old, new in zip(targets, values)]
        torch._foreach_copy_(targets, values)

    put(tensors.steps, moments.steps)
    put(tensors.exp_avgs, moments.exp_avgs)
    put(tensors.exp_avg_sqs, moments.exp_avg_sqs)
    put(tensors.scores, scores)
    masters = [(m, t) for m, t in zip(tensors.master_params, thetas) if m is not None]
    if masters:
        put([m for m, _ in masters], [t for _, t in masters])
    new_params, remainders, lows = list(thetas), [], []
    for i, remainder in enumerate(_remainders(tensors)):
        if remainder is not None:  # the parameter is the master's high half
            new_params[i], low = param_remainders.split(thetas[i])
            remainders.append(remainder)
            lows.append(low)
    if remainders:
        put(remainders, lows)
    put(tensors.params, new_params)


def _remainders(tensors: GroupTensors) -> list[torch.Tensor | None]:
    return tensors.master_remainders or [None] * len(tensors.params)
