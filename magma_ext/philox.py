"""The random-number contract of docs/ALGORITHM.md section 4, in torch integer ops.

Masks come from cuRAND's Philox4_32_10.  A block's draw at step ``t`` (< 2**32) is the first
word of ``curand()`` after ``curand_init(seed, (low << 32) | block_index, 4 * ((high << 32) + t))``,
where ``low`` and ``high`` are the low 32 and high 30 bits of the tensor index (< 2**62).
Because the offset is a multiple of four, that word is word 0 of the Philox block whose 128-bit
counter is ``(t, high, block_index, low)`` under the 64-bit key ``seed``.  A tensor index below
2**32 draws what the first version of the contract (``(tensor_index << 32) | block_index``,
``4 * t``) drew.

Everything here works on int64 tensors holding unsigned 32-bit values, so it runs on any
device; the 32x32 -> 64-bit products are split into 16-bit halves to stay inside int64.
:func:`keep_mask_numpy` runs the same rounds on numpy uint64 arrays, for host-side planning.
"""

from __future__ import annotations

import math
import operator

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF


def _round_keys(seed: int) -> list[tuple[int, int]]:
    """The (k0, k1) key of each of the ten rounds: the seed's halves, bumped by the Weyl constants."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    keys = []
    for _ in range(PHILOX_ROUNDS):
        keys.append((k0, k1))
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return keys


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * multiplier`` for ``0 <= a < 2**32`` without int64 overflow."""
    product_low = a * (multiplier & 0xFFFF)  # < 2**48
    product_high = a * (multiplier >> 16)  # < 2**48
    low = (product_low + ((product_high & 0xFFFF) << 16)) & MASK32
    high = (product_high + (product_low >> 16)) >> 16
    return high, low


def _rounds(counter: tuple, seed: int, mulhilo, key_word=int) -> tuple:
    """The ten Philox rounds over the words of ``counter`` (arrays of one integer kind), with
    ``mulhilo(a, multiplier) -> (high, low)`` for that kind and the round keys as ``key_word``."""
    c0, c1, c2, c3 = counter
    for k0, k1 in _round_keys(seed):
        high0, low0 = mulhilo(c0, PHILOX_M0)
        high1, low1 = mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = high1 ^ c1 ^ key_word(k0), low1, high0 ^ c3 ^ key_word(k1), low0
    return c0, c1, c2, c3


def philox4x32_10(counter: tuple[torch.Tensor, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of a broadcastable 4-tuple of int64 counter words under a 64-bit key."""
    return _rounds(counter, seed, _mulhilo)


def check_seed(seed) -> int:
    """``seed`` as a Python int if it is a valid unsigned 64-bit key (anything ``operator.index``
    takes, such as a numpy integer), else raise."""
    if isinstance(seed, bool):
        raise TypeError("seed must be an int, got bool")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int, got {type(seed).__name__}") from None
    if not 0 <= seed < 2**64:
        raise ValueError(f"Invalid seed: {seed} (expected 0 <= seed < 2**64)")
    return seed


def philox_first_word(
    seed: int, tensor_index: torch.Tensor, block_index: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """Word 0 of ``curand()`` after ``curand_init(seed, (low << 32) | block_index, 4 * ((high << 32) + step))``,
    ``low`` and ``high`` the tensor index's low 32 and high 30 bits (docs/ALGORITHM.md section 4).

    All three tensors are int64 and broadcast together; the result is int64 in ``[0, 2**32)``.
    """
    seed = check_seed(seed)
    step = step.to(torch.int64)
    tensor_index = tensor_index.to(torch.int64)
    counter = (
        step & MASK32,
        ((step >> 32) + (tensor_index >> 32)) & MASK32,
        block_index.to(torch.int64) & MASK32,
        tensor_index & MASK32,
    )
    return philox4x32_10(counter, seed)[0]


def keep_threshold(keep_prob: float) -> int:
    """``round(keep_prob * 2**32)``, half away from zero: a block is kept when its word is below it."""
    return math.floor(keep_prob * 2**32 + 0.5)


def keep_mask(
    seed: int,
    tensor_index: torch.Tensor,
    block_index: torch.Tensor,
    step: torch.Tensor,
    keep_prob: float,
) -> torch.Tensor:
    """Bernoulli(keep_prob) draw z of each block, as a bool tensor."""
    return philox_first_word(seed, tensor_index, block_index, step) < keep_threshold(keep_prob)


def keep_mask_numpy(seed: int, tensor_index, block_index, step: int, keep_prob: float):
    """:func:`keep_mask` on the host, for numpy integer arrays: the same draw z of each block, bit
    for bit, as a numpy bool array of the broadcast shape of ``tensor_index`` and
    ``block_index``; ``step`` is one int in ``[0, 2**64)``.

    The rounds run in numpy's uint64 arithmetic, where a 32 x 32-bit product needs no splitting:
    about ten times faster than the torch integer ops on a CPU. For host-side planning that needs
    a step's masks of many blocks without touching a device (the sparse parameter gather of
    ``magma_ext.megatron``). Needs numpy.
    """
    import numpy as np

    seed = check_seed(seed)
    if isinstance(step, bool) or not hasattr(step, "__index__"):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    step = operator.index(step)
    if not 0 <= step < 2**64:
        raise ValueError(f"step must be in [0, 2**64), got {step}")
    low = np.uint64(MASK32)
    tensor_words, block_words = np.broadcast_arrays(np.asarray(tensor_index), np.asarray(block_index))
    tensor_words = tensor_words.astype(np.uint64)
    counter = (np.full(tensor_words.shape, step & MASK32, dtype=np.uint64),
               (np.uint64(step >> 32) + (tensor_words >> np.uint64(32))) & low,
               block_words.astype(np.uint64) & low,
               tensor_words & low)

    def mulhilo(a, multiplier):
        product = a * np.uint64(multiplier)  # exact: both factors are below 2**32
        return product >> np.uint64(32), product & low

    word = _rounds(counter, seed, mulhilo, np.uint64)[0]
    return word < np.uint64(keep_threshold(keep_prob))


def curand_words(seed: int, subsequence: int, offset: int, n: int) -> list[int]:
    """The first ``n`` words of ``curand()`` after ``curand_init(seed, subsequence, offset)``.

    Plain-Python statement of cuRAND's Philox state machine (128-bit counter = offset // 4 plus
    subsequence << 64; the first ``offset % 4`` words of that block are skipped).  For tests and
    tools; masks use :func:`philox_first_word`.
    """
    seed = check_seed(seed)
    counter = ((subsequence % 2**64) << 64) + offset // 4
    skip = offset % 4
    words: list[int] = []
    while len(words) < n:
        parts = tuple(torch.tensor([(counter >> (32 * i)) & MASK32]) for i in range(4))
        block = [int(w) for w in philox4x32_10(parts, seed)]
        words.extend(block[skip:])
        skip = 0
        counter = (counter + 1) % 2**128
    return words[:n]
