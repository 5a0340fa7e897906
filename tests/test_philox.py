"""The random-number contract (ALGORITHM.md section 4), bit for bit and statistically.

Known answers: words drawn with cuRAND on an H100 (tests/data) and Random123's kat_vectors.
Each is checked against the test suite's own pure-Python Philox (float64_magma) and against
the package's implementations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import float64_magma as oracle
from magma_ext import philox

CURAND_CASES = json.loads((Path(__file__).parent / "data" / "curand_philox4x32_10.json").read_text())


def _case_id(case: dict) -> str:
    return f"seed={case['seed']}-sub={case['subsequence']}-off={case['offset']}"


# Random123 tests/kat_vectors, "philox4x32 10" lines: counter (4 words), key (2 words) -> 4 words.
RANDOM123_KAT = [
    pytest.param((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8), id="zeros"),
    pytest.param((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD), id="ones"),
    pytest.param((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
                 (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1), id="pi"),
]

# The cuRAND cases whose offset is a multiple of 4 are exactly mask draws:
# subsequence = (tensor_index << 32) | block_index, offset = 4 * step.
MASK_DRAW_CASES = [
    pytest.param(c, id=_case_id(c)) for c in CURAND_CASES if c["offset"] % 4 == 0
]


@pytest.mark.parametrize("counter,key,expected", RANDOM123_KAT)
def test_random123_kat_oracle(counter, key, expected):
    assert oracle.philox4x32_10(counter, key) == expected


@pytest.mark.parametrize("counter,key,expected", RANDOM123_KAT)
def test_random123_kat_package(counter, key, expected):
    words = tuple(torch.tensor([w], dtype=torch.int64) for w in counter)
    seed = key[0] | (key[1] << 32)
    out = philox.philox4x32_10(words, seed)
    assert tuple(int(w) for w in out) == expected


@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c)) for c in CURAND_CASES])
@pytest.mark.parametrize("impl", [
    pytest.param(oracle.curand_words, id="oracle"),
    pytest.param(philox.curand_words, id="package"),
])
def test_curand_known_answers(impl, case):
    assert impl(case["seed"], case["subsequence"], case["offset"], 8) == case["words"]


@pytest.mark.parametrize("case", MASK_DRAW_CASES)
def test_vectorised_first_word_known_answers(case):
    tensor_index, block_index = case["subsequence"] >> 32, case["subsequence"] & 0xFFFFFFFF
    step = case["offset"] // 4
    word = philox.philox_first_word(
        case["seed"],
        torch.tensor([tensor_index], dtype=torch.int64),
        torch.tensor([block_index], dtype=torch.int64),
        torch.tensor([step], dtype=torch.int64),
    )
    assert word.dtype == torch.int64
    assert word.tolist() == [case["words"][0]]


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 0x0123456789ABCDEF, 2**64 - 1])
def test_vectorised_first_word_matches_oracle(seed):
    gen = torch.Generator().manual_seed(seed % 1000)
    n = 200
    tensor_index = torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64)
    tensor_index[n // 2:] = torch.randint(0, 2**62, (n - n // 2,), generator=gen, dtype=torch.int64)  # names'
    block_index = torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64)
    step = torch.randint(1, 2**40, (n,), generator=gen, dtype=torch.int64)
    step[n // 2:] = torch.randint(1, 2**32, (n - n // 2,), generator=gen, dtype=torch.int64)
    # Edges of every field: all-ones indices, steps around the 32-bit carry, the largest index.
    tensor_index[:6] = torch.tensor([0, 2**32 - 1, 0, 2**32 - 1, 2**32, 2**62 - 1])
    block_index[:6] = torch.tensor([0, 2**32 - 1, 2**32 - 1, 0, 0, 2**32 - 1])
    step[:6] = torch.tensor([1, 2**32 - 1, 2**32, 2**32 + 1, 1, 2**32 - 1])
    words = philox.philox_first_word(seed, tensor_index, block_index, step)
    expected = [oracle.first_word(seed, int(t), int(b), int(s))
                for t, b, s in zip(tensor_index, block_index, step)]
    assert words.tolist() == expected
    assert int(words.min()) >= 0 and int(words.max()) < 2**32


def test_first_word_broadcasts():
    blocks = torch.arange(5, dtype=torch.int64)
    words = philox.philox_first_word(7, torch.tensor(3), blocks, torch.tensor(4))
    assert words.tolist() == [oracle.first_word(7, 3, b, 4) for b in range(5)]


@pytest.mark.parametrize("keep_prob", [0.0, 0.1, 0.5, 0.9, 1.0, 1 / 3])
def test_keep_mask_matches_oracle(keep_prob):
    n = 500
    gen = torch.Generator().manual_seed(1)
    tensor_index = torch.randint(0, 50, (n,), generator=gen)
    block_index = torch.randint(0, 10_000, (n,), generator=gen)
    step = torch.randint(1, 1000, (n,), generator=gen)
    mask = philox.keep_mask(123, tensor_index, block_index, step, keep_prob)
    assert mask.dtype == torch.bool
    expected = [oracle.keep_block(123, int(t), int(b), int(s), keep_prob)
                for t, b, s in zip(tensor_index, block_index, step)]
    assert mask.tolist() == expected


@pytest.mark.parametrize("nudge,kept", [(0, False), (1, True)], ids=["p=w/2^32-dropped", "p=(w+1)/2^32-kept"])
def test_keep_mask_threshold_is_strict_and_exact(nudge, kept):
    """z = word < round(p * 2^32): a word equal to the threshold is dropped, one below is kept."""
    args = (torch.tensor([2]), torch.tensor([5]), torch.tensor([9]))
    word = int(philox.philox_first_word(11, *args))
    keep_prob = (word + nudge) / 2**32  # exact in float64
    assert philox.keep_mask(11, *args, keep_prob).tolist() == [kept]
    assert oracle.keep_block(11, 2, 5, 9, keep_prob) is kept


@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.9])
def test_keep_fraction_within_five_sigma(keep_prob):
    n = 20_000
    blocks = torch.arange(n, dtype=torch.int64)
    for step in (1, 2):
        kept = philox.keep_mask(0, torch.tensor(0), blocks, torch.tensor(step), keep_prob)
        sigma = math.sqrt(n * keep_prob * (1 - keep_prob))
        assert abs(int(kept.sum()) - n * keep_prob) < 5 * sigma


@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.9])
def test_consecutive_steps_are_independent(keep_prob):
    """Kept at both t and t+1 with probability p^2: the step really enters the draw."""
    n = 20_000
    blocks = torch.arange(n, dtype=torch.int64)
    a = philox.keep_mask(5, torch.tensor(3), blocks, torch.tensor(10), keep_prob)
    b = philox.keep_mask(5, torch.tensor(3), blocks, torch.tensor(11), keep_prob)
    p2 = keep_prob**2
    assert abs(int((a & b).sum()) - n * p2) < 5 * math.sqrt(n * p2 * (1 - p2))


@pytest.mark.parametrize("keep_prob,expected", [(0.0, False), (1.0, True)], ids=["p=0-none", "p=1-all"])
def test_keep_prob_extremes(keep_prob, expected):
    blocks = torch.arange(20_000, dtype=torch.int64)
    mask = philox.keep_mask(2**64 - 1, torch.tensor(9), blocks, torch.tensor(3), keep_prob)
    assert bool((mask == expected).all())


def _random_draw_inputs(seed: int, n: int = 2000):
    """Indices over the whole 32-bit range and names' indices up to 2**62, with every field's edges."""
    gen = torch.Generator().manual_seed(seed)
    tensor_index = torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64)
    tensor_index[n // 2:] = torch.randint(0, 2**62, (n - n // 2,), generator=gen, dtype=torch.int64)
    block_index = torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64)
    tensor_index[:6] = torch.tensor([0, 2**32 - 1, 0, 2**32 - 1, 2**32, 2**62 - 1])
    block_index[:6] = torch.tensor([0, 2**32 - 1, 2**32 - 1, 0, 0, 2**32 - 1])
    return tensor_index, block_index


@pytest.mark.parametrize("seed", [0, 2**32 - 1, 0x0123456789ABCDEF, 2**64 - 1])
@pytest.mark.parametrize("step", [1, 77, 2**32 - 1, 2**32, 2**40 + 3])
def test_keep_mask_numpy_draws_what_keep_mask_draws(seed, step):
    tensor_index, block_index = _random_draw_inputs(seed % 997)
    words = philox.philox_first_word(seed, tensor_index, block_index, torch.tensor(step))
    # keep_probs at drawn words make a word one off its threshold decide: every bit counts
    probs = [0.0, 0.1, 0.5, 1 / 3, 1.0] + [int(w) / 2**32 for w in words[:3]] + [(int(w) + 1) / 2**32 for w in words[:3]]
    for keep_prob in probs:
        expected = philox.keep_mask(seed, tensor_index, block_index, torch.tensor(step), keep_prob)
        got = philox.keep_mask_numpy(seed, tensor_index.numpy(), block_index.numpy(), step, keep_prob)
        assert got.dtype == bool and got.shape == (len(tensor_index),)
        assert got.tolist() == expected.tolist(), keep_prob


@pytest.mark.parametrize("case", MASK_DRAW_CASES)
def test_keep_mask_numpy_known_answers(case):
    """cuRAND's word w for the block: kept at keep_prob (w + 1) / 2**32, dropped at w / 2**32."""
    import numpy as np

    tensor_index, block_index = case["subsequence"] >> 32, case["subsequence"] & 0xFFFFFFFF
    word, step = case["words"][0], case["offset"] // 4
    for nudge, kept in ((0, False), (1, True)):
        mask = philox.keep_mask_numpy(case["seed"], np.array([tensor_index]), np.array([block_index]), step,
                                      (word + nudge) / 2**32)
        assert mask.tolist() == [kept]


def test_keep_mask_numpy_broadcasts_and_refuses_bad_steps_and_seeds():
    import numpy as np

    blocks = np.arange(6)
    mask = philox.keep_mask_numpy(7, np.int64(3), blocks, 4, 0.5)
    assert mask.tolist() == [oracle.keep_block(7, 3, b, 4, 0.5) for b in range(6)]
    assert philox.keep_mask_numpy(7, np.int64(3), blocks, np.int64(4), 0.5).tolist() == mask.tolist()
    for step, error in ((-1, ValueError), (2**64, ValueError), (1.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="step must be"):
            philox.keep_mask_numpy(7, np.int64(3), blocks, step, 0.5)
    with pytest.raises(ValueError, match="Invalid seed"):
        philox.keep_mask_numpy(-1, np.int64(3), blocks, 4, 0.5)
