"""An independent float64 oracle for Magma, written from ALGORITHM.md alone.

Nothing here imports ``magma_ext``. It is deliberately plain: the RNG is
Philox4x32-10 on Python ints, and the optimizer loops over tensors and over
blocks, doing float64 arithmetic inside one block at a time. It is slow and
meant to be read next to the spec, section by section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
MASK128 = (1 << 128) - 1

# Philox4x32 constants (Salmon et al., SC'11; identical in Random123 and cuRAND).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


# ---------------------------------------------------------------- Philox (section 4)


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """One Philox4x32-10 block: four 32-bit counter words and two key words in, four words out."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(PHILOX_ROUNDS):
        if round_index > 0:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        product0 = PHILOX_M0 * c0
        product1 = PHILOX_M1 * c2
        hi0, lo0 = product0 >> 32, product0 & MASK32
        hi1, lo1 = product1 >> 32, product1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def curand_words(seed: int, subsequence: int, offset: int, n: int) -> list[int]:
    """The first ``n`` results of cuRAND's ``curand()`` after ``curand_init(seed, subsequence, offset)``.

    cuRAND's Philox state is a 128-bit counter (word 0 least significant) plus a
    position 0..3 inside the current four-word output. ``curand_init`` puts the
    subsequence in the upper 64 counter bits and skips ``offset`` words: offset // 4
    whole blocks (added with carry into all 128 bits) plus offset % 4 words.
    """
    key = (seed & MASK32, (seed >> 32) & MASK32)
    counter = (((subsequence & MASK64) << 64) + (offset // 4)) & MASK128
    position = offset % 4
    words: list[int] = []
    while len(words) < n:
        counter_words = tuple((counter >> (32 * i)) & MASK32 for i in range(4))
        block = philox4x32_10(counter_words, key)
        words.extend(block[position:])
        position = 0
        counter = (counter + 1) & MASK128
    return words[:n]


def keep_threshold(keep_prob: float) -> int:
    """threshold(p) = round(p * 2^32), in 0 .. 2^32 (p * 2^32 is exact in float64)."""
    return math.floor(keep_prob * 2.0**32 + 0.5)


def first_word(seed: int, tensor_index: int, block_index: int, step: int) -> int:
    """The contract's draw: the first word after curand_init(seed, (low << 32) | block,
    4 * ((high << 32) + step)), low and high the tensor index's low 32 and high 30 bits."""
    low, high = tensor_index % 2**32, tensor_index >> 32
    return curand_words(seed, (low << 32) | block_index, 4 * ((high << 32) + step), 1)[0]


def keep_block(seed: int, tensor_index: int, block_index: int, step: int, keep_prob: float) -> bool:
    """z_t for one block: True when the block is kept (updated) at ``step``."""
    return first_word(seed, tensor_index, block_index, step) < keep_threshold(keep_prob)


# ---------------------------------------------------------------- blocks (section 3)


def block_ranges(shape: tuple[int, ...], block) -> list[tuple[int, int]]:
    """[start, stop) element ranges of each block in the flattened (row-major) tensor."""
    numel = math.prod(shape)
    if numel == 0:
        return []
    if block == "tensor":
        return [(0, numel)]
    if block == "row":
        if len(shape) < 2:
            return [(0, numel)]
        row = numel // shape[0]
        return [(r * row, (r + 1) * row) for r in range(shape[0])]
    return [(start, min(start + block, numel)) for start in range(0, numel, block)]


# ---------------------------------------------------------------- the optimizer (sections 1, 2, 5)

DEFAULTS = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    base="adam",
    mask="magma",
    keep_prob=0.5,
    tau=2.0,
    score_ema=0.9,
    block="tensor",
    seed=0,
    magma=True,
)


@dataclass
class ParamState:
    """float64 state of one parameter; ``step`` counts the steps it actually took."""

    tensor_index: int
    param: torch.Tensor
    step: int = 0
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    magma_score: list[float] = field(default_factory=list)


class Float64Magma:
    """Magma in float64, one parameter and one block at a time.

    ``groups`` mirrors torch's param groups: dicts with ``params`` (tensors, copied
    to float64) plus any option of ``DEFAULTS``. ``step`` takes one gradient (or
    None, meaning "no grad: skip") per parameter, in parameter order.
    """

    def __init__(self, groups: list[dict]):
        self.groups: list[dict] = []
        self.params: list[ParamState] = []
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group: dict) -> None:
        options = {**DEFAULTS, **{k: v for k, v in group.items() if k != "params"}}
        states = []
        for p in group["params"]:
            # Tensor index = position over all groups in order (section 3).
            state = ParamState(tensor_index=len(self.params), param=p.detach().to(torch.float64).clone())
            self.params.append(state)
            states.append(state)
        self.groups.append({"options": options, "states": states})

    def step(self, grads: list[torch.Tensor | None]) -> None:
        assert len(grads) == len(self.params)
        grad_iter = iter(grads)
        for group in self.groups:
            for state in group["states"]:
                grad = next(grad_iter)
                if grad is not None:
                    self._step_param(state, grad.detach().to(torch.float64), group["options"])

    def _step_param(self, state: ParamState, grad: torch.Tensor, o: dict) -> None:
        shape = tuple(state.param.shape)
        ranges = block_ranges(shape, o["block"])
        if state.exp_avg is None:
            state.exp_avg = torch.zeros(shape, dtype=torch.float64)
            state.exp_avg_sq = torch.zeros(shape, dtype=torch.float64)
            state.magma_score = [0.5] * len(ranges)
        state.step += 1
        t = state.step
        beta1, beta2 = o["betas"]
        bc1 = 1.0 - beta1**t
        bc2 = 1.0 - beta2**t
        mask = o["mask"] if o["magma"] else "none"

        theta = state.param.reshape(-1)
        g_all = grad.reshape(-1)
        m_all = state.exp_avg.reshape(-1)
        v_all = state.exp_avg_sq.reshape(-1)
        for block_index, (start, stop) in enumerate(ranges):
            g = g_all[start:stop]
            m_prev = m_all[start:stop]
            v_prev = v_all[start:stop]

            # Section 2: dense moments and the base direction D_t, for every block.
            v = beta2 * v_prev + (1.0 - beta2) * g * g
            denom = torch.sqrt(v / bc2) + o["eps"]
            if o["base"] == "adam":
                m = beta1 * m_prev + (1.0 - beta1) * g
                direction = (m / bc1) / denom
            elif o["base"] == "rmsprop":
                m = beta1 * m_prev + (1.0 - beta1) * g
                direction = g / denom
            elif o["base"] == "laprop":
                m = beta1 * m_prev + (1.0 - beta1) * g / denom
                direction = m / bc1
            else:
                raise ValueError(o["base"])
            m_all[start:stop] = m
            v_all[start:stop] = v

            # Section 1.2: alignment score of the block, from m_t after this step's update.
            if mask == "magma":
                m_norm = math.sqrt(float((m * m).sum()))
                g_norm = math.sqrt(float((g * g).sum()))
                cosine = 0.0 if m_norm == 0.0 or g_norm == 0.0 else float((m * g).sum()) / (m_norm * g_norm)
                target = 1.0 / (1.0 + math.exp(-cosine / o["tau"]))
                score = o["score_ema"] * state.magma_score[block_index] + (1.0 - o["score_ema"]) * target
                state.magma_score[block_index] = score

            # Sections 1.3-1.5: mask and modulated, decoupled-decay update.
            update = direction + o["weight_decay"] * theta[start:stop]
            if mask == "none":
                scale = 1.0
            else:
                kept = keep_block(o["seed"], state.tensor_index, block_index, t, o["keep_prob"])
                if not kept:
                    continue
                scale = state.magma_score[block_index] if mask == "magma" else 1.0 / o["keep_prob"]
            theta[start:stop] = theta[start:stop] - o["lr"] * scale * update
