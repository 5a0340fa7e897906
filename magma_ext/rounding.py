"""Moments stored in bfloat16: the stochastic rounding of docs/ALGORITHM.md section 6.

A new moment value (float32) goes into bfloat16 state by stochastic rounding: a 16-bit random
number ``r`` is added to the value's float32 bits and the low 16 bits are dropped, so the value
rounds up with probability (its distance from the bfloat16 below) / (one bfloat16 ulp), and its
expectation is kept.  The numbers come from a Philox4x32-10 stream of their own (the *rounding
stream*), a pure function of the seed, the tensor index, the element's index in its logical
tensor and the step; nothing of it is stored, so a resumed or resharded run goes on with the
same numbers:

    key     = seed XOR ROUNDING_KEY
    q, w    = e >> 2, e & 3                       (e: the element's index, < 2**36)
    counter = (t mod 2**32, q mod 2**32, i mod 2**32, (i >> 32) | ((q >> 32) << 30))
    x       = word w of Philox4x32-10(counter, key)    (i: tensor index < 2**62, t: step)
    r       = x & 0xFFFF for exp_avg, x >> 16 for exp_avg_sq

csrc/rounding.cuh computes the same words; non-finite values round to nearest (an inf or NaN
stays one).
"""

from __future__ import annotations

import torch

from .philox import MASK32, check_seed, philox4x32_10

# The rounding stream's key is the seed XOR this constant (2**64 / the golden ratio), so that it
# never shares a key with the masks' stream (keyed by the seed itself).
ROUNDING_KEY = 0x9E3779B97F4A7C15
# The state dtypes a moment may have.
STATE_DTYPES = (torch.float32, torch.bfloat16)
# Element indices of a tensor with rounded state stay below this: q = e >> 2 fills 34 bits.
MAX_ROUNDED_NUMEL = 2**36
EXP_AVG, EXP_AVG_SQ = 0, 1  # which moment: the low or the high half of an element's word


def rounding_words(seed: int, tensor_index: int, offset: int, numel: int, step: torch.Tensor) -> torch.Tensor:
    """The rounding stream's word of elements ``[offset, offset + numel)`` of logical tensor
    ``tensor_index`` at step ``step`` (a one-element tensor, read on its device: no host sync).

    Returns an int64 tensor of ``numel`` words in ``[0, 2**32)`` on ``step``'s device.
    """
    key = check_seed(seed) ^ ROUNDING_KEY
    if numel == 0:
        return torch.zeros(0, dtype=torch.int64, device=step.device)
    quads = torch.arange(offset >> 2, ((offset + numel - 1) >> 2) + 1, dtype=torch.int64, device=step.device)
    t = step.reshape(()).to(torch.int64) & MASK32
    counter = (t.expand_as(quads), quads & MASK32, torch.full_like(quads, tensor_index & MASK32),
               (tensor_index >> 32) | ((quads >> 32) << 30))
    words = torch.stack(philox4x32_10(counter, key), dim=1).reshape(-1)
    return words[offset & 3:(offset & 3) + numel]


def stochastic_round(values: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Float32 ``values`` rounded to bfloat16 with the 16-bit random numbers ``noise`` (int64,
    one per element): the bfloat16 whose bits are the high half of ``bits(value) + noise``.
    Non-finite values round to nearest.  Returns float32 holding bfloat16 values."""
    bits = values.contiguous().view(torch.int32)
    rounded = ((bits + noise.reshape(values.shape).to(torch.int32)) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(values), rounded, values.to(torch.bfloat16).to(torch.float32))


def moment_noise(words: torch.Tensor, moment: int) -> torch.Tensor:
    """The 16-bit numbers that round moment ``moment`` (EXP_AVG or EXP_AVG_SQ): the low or the
    high half of each element's word."""
    return words & 0xFFFF if moment == EXP_AVG else words >> 16


def round_moment(values: torch.Tensor, moment: int, seed: int, tensor_index: int, offset: int,
                 step: torch.Tensor) -> torch.Tensor:
    """A new value of moment ``moment`` of a piece at ``offset`` in its logical tensor, as
    bfloat16 state holds it (returned as float32)."""
    words = rounding_words(seed, tensor_index, offset, values.numel(), step)
    return stochastic_round(values, moment_noise(words, moment))


def check_state_dtype(name: str, value) -> None:
    """``exp_avg_dtype`` / ``exp_avg_sq_dtype``: torch.float32 or torch.bfloat16, else ValueError."""
    if not isinstance(value, torch.dtype) or value not in STATE_DTYPES:
        raise ValueError(f"Invalid {name}: {value!r} (expected torch.float32 or torch.bfloat16)")
