"""Master weights stored as 16-bit remainders beside bfloat16 parameters (``store_param_remainders``).

A float32 master weight is 32 bits; its bfloat16 parameter already holds (nearly) the high 16.
With ``store_param_remainders=True`` a bfloat16 parameter's state keeps only the low 16 bits,
``master_param_remainder`` (int16), and the pair is the float32 master exactly, in 2 bytes of
state instead of 4 (Transformer Engine's ``FusedAdam`` offers the same option; the encoding
below is magma_ext's own statement of it):

    split:  low   = bits(master) mod 2**16                     (the remainder, as int16)
            param = bits(master) >> 16, plus 1 where low >= 2**15   (mod 2**16)
    join:   bits(master) = ((bits(param) - [remainder < 0]) mod 2**16) * 2**16 + low

So the parameter is the master rounded to nearest bfloat16, ties away from zero (where
``master.to(torch.bfloat16)`` would round a tie to even: the two differ only where the low 16
bits are exactly 0x8000), and join undoes split for every bit pattern.
"""

from __future__ import annotations

import torch

REMAINDER_KEY = "master_param_remainder"
REMAINDER_DTYPE = torch.int16


def join(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The float32 master weight of a bfloat16 ``param`` and its int16 ``remainder``."""
    low = remainder.to(torch.int64) & 0xFFFF
    high = (param.contiguous().view(torch.int16).to(torch.int64) - (low >> 15)) & 0xFFFF
    bits = (high << 16) | low
    return _signed(bits, 32).to(torch.int32).view(torch.float32).view(param.shape)


def split(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(param, remainder)`` of a float32 master weight: the bfloat16 parameter (rounded to
    nearest, ties away from zero) and the int16 remainder that :func:`join` takes back to it."""
    bits = master.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    low = bits & 0xFFFF
    high = ((bits >> 16) + (low >> 15)) & 0xFFFF
    param = _signed(high, 16).to(torch.int16).view(torch.bfloat16).view(master.shape)
    return param, _signed(low, 16).to(REMAINDER_DTYPE).view(master.shape)


def _signed(unsigned: torch.Tensor, width: int) -> torch.Tensor:
    """Unsigned ``width``-bit values (int64) as the signed values of the same bits."""
    return unsigned - ((unsigned >> (width - 1)) << width)
