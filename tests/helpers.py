"""Assertions and snapshots shared by the CPU tests (imported as ``helpers``)."""

from __future__ import annotations

import torch

# NOTE: [float32 tolerances against float64]
# The package keeps params, moments and scores in float32; the oracle is float64. One
# float32 op rounds with relative error 2**-24 ~ 6e-8; a step chains ~10 such ops and a test
# runs 20-100 steps, so accumulated relative error stays well below 1e-5. Elements near zero
# (a momentum that cancels, say) have no meaningful relative error, so the absolute part is
# scaled to the tensor's magnitude: atol = 1e-6 * max|expected|. A wrong mask, score or
# bias correction moves values by >= 1e-3 relative, far outside these bounds.
RTOL = 1e-5
ATOL_SCALE = 1e-6


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "",
                        rtol: float = RTOL, atol_scale: float = ATOL_SCALE) -> None:
    """assert_close in float64 with atol scaled to ``expected``'s magnitude (see the NOTE above)."""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol_scale * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


def assert_bitwise_equal(actual, expected, what: str = "") -> None:
    """Same dtype, shape and bits (NaNs included)."""
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
        assert torch.equal(actual.view(-1).view(torch.uint8) if actual.numel() else actual,
                           expected.view(-1).view(torch.uint8) if expected.numel() else expected), what
    else:
        assert actual == expected, what


def snapshot(optimizer) -> dict:
    """Deep copy of every param and every state entry, keyed by position, for bitwise comparison."""
    out = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        out[(i, "param")] = p.detach().clone()
        for key, value in optimizer.state.get(p, {}).items():
            out[(i, key)] = value.clone() if isinstance(value, torch.Tensor) else value
    return out


def assert_snapshots_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert_bitwise_equal(actual[key], expected[key], str(key))


def fused_over_cpu_refusal(extension_loaded: bool) -> str:
    """The start of the message refusing ``fused=True`` over CPU parameters: the extension is
    missing, or (loaded) the parameters are not CUDA tensors."""
    return ("fused=True requires every parameter to be a contiguous CUDA tensor" if extension_loaded
            else "fused=True needs magma_ext's CUDA extension")
