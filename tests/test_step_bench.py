"""benchmarks/step_bench.py's state accounting: optimizer state held in tensor subclasses
(torchao's quantized moments) counts the bytes of the tensors they hold."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from step_bench import state_bytes  # noqa: E402


class Codes(torch.Tensor):
    """A float32-shaped tensor stored as one uint8 code per element and one float32 scale per
    32 elements, flattened as torchao's optimizer states are."""

    @staticmethod
    def __new__(cls, codes, scale):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32)

    def __init__(self, codes, scale):
        self.codes, self.scale = codes, scale

    def __tensor_flatten__(self):
        return ["codes", "scale"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{func} on Codes")


class HoldsState:
    def __init__(self, state):
        self.state = state


def test_state_bytes_count_what_a_tensor_subclass_holds():
    n = 4096
    quantized = Codes(torch.zeros(n, dtype=torch.uint8), torch.zeros(n // 32))
    plain = torch.zeros(n)
    totals = state_bytes(HoldsState({0: {"exp_avg": quantized, "exp_avg_sq": plain, "step": 3}}))
    assert totals == {"exp_avg": n + 4 * n // 32, "exp_avg_sq": 4 * n}
