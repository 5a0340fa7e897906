"""Shared pieces of the GPU tests: twin optimizers (fused and reference) fed the same grads."""

from __future__ import annotations

import pytest
import torch

from magma_ext import Magma, has_cuda_extension

requires_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_cuda_extension()),
    reason="needs a CUDA GPU and magma_ext's CUDA extension",
)

# Tolerances of fused vs reference.  Moments and scores are float32 in both and depend only on
# the gradients, so they differ by a few ulps however many steps ran (the betas decay older
# rounding): STATE_TOL.  After one step the parameters differ by the rounding of one update:
# PARAM_TOL (one ulp of a bfloat16/float16 parameter is 2**-8/2**-11 relative).  Over a run the
# kernels' fused multiply-adds round each update differently from the reference's separate
# ops, and a low-precision parameter re-rounded every step can flip one ulp either way, so the
# differences of a parameter random-walk: TRAJECTORY_TOL allows about 200 float32 roundings
# at |param| ~ 4 (200 * 2**-24 * 4 = 5e-5), and 8 ulps at |param| ~ 2 for bfloat16/float16
# (seen on an H100: at most 4 bfloat16 ulps, on 1 element in 16385, after 200 steps).
STATE_TOL = dict(rtol=2e-5, atol=1e-6)
PARAM_TOL = {
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
}
TRAJECTORY_TOL = {
    torch.float32: dict(rtol=1e-5, atol=5e-5),
    torch.bfloat16: dict(rtol=2**-5, atol=2**-3),
    torch.float16: dict(rtol=2**-8, atol=2**-6),
}

# Odd sizes: empty, one element, work-item edges (kChunk = 8192), rows above the single-pass
# limit (8192 elements).
SHAPES = [(5, 7), (13,), (0,), (1,), (3, 4, 5), (33, 257), (8193,), (16385,), (3, 9000), (2, 16384), (0, 4)]


def random_params(shapes, dtype, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, device="cuda", generator=generator).to(dtype) for s in shapes]


def twins(shapes, dtype=torch.float32, master_weights=False, seed=0, **options):
    """A fused and a reference Magma over identical copies of the same parameters."""
    fused_params = [p.requires_grad_() for p in random_params(shapes, dtype, seed)]
    reference_params = [p.detach().clone().requires_grad_() for p in fused_params]
    fused = Magma(fused_params, fused=True, master_weights=master_weights, **options)
    reference = Magma(reference_params, fused=False, master_weights=master_weights, **options)
    return fused, reference


def params_of(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def feed_same_grads(fused, reference, step, grad_dtype=None):
    """Fresh random grads, identical for both optimizers."""
    generator = torch.Generator(device="cuda").manual_seed(1000 + step)
    for p, q in zip(params_of(fused), params_of(reference)):
        grad = torch.randn(p.shape, device="cuda", generator=generator).to(grad_dtype or p.dtype)
        if grad.dtype != p.dtype:  # torch >= 2.10 wants the param to allow another grad dtype
            p.grad_dtype = q.grad_dtype = None
        p.grad = grad
        q.grad = grad.clone()


def assert_same_state(fused, reference, where="", trajectory=False):
    """Every state tensor and every parameter of the two optimizers agree.

    ``trajectory``: compare parameters (and master weights) with the tolerance of a long run.
    """
    for p, q in zip(params_of(fused), params_of(reference)):
        fs, rs = fused.state[p], reference.state[q]
        assert fs.keys() == rs.keys()
        for key, value in fs.items():
            if not isinstance(value, torch.Tensor):
                assert value == rs[key], (where, key)
            elif key != "master_param":
                torch.testing.assert_close(value, rs[key], **STATE_TOL, msg=lambda m: f"{where} {key}: {m}")
        param_tol = (TRAJECTORY_TOL if trajectory else PARAM_TOL)[p.dtype]
        if "master_param" in fs:
            master_tol = (TRAJECTORY_TOL if trajectory else PARAM_TOL)[torch.float32]
            torch.testing.assert_close(fs["master_param"], rs["master_param"], **master_tol,
                                       msg=lambda m: f"{where} master_param: {m}")
        torch.testing.assert_close(p, q, **param_tol, msg=lambda m: f"{where} param: {m}")


def changed_blocks(before, after, optimizer):
    """Per parameter, which blocks changed on the last step (a block is kept iff it changed)."""
    from magma_ext.layout import layout_for

    result = []
    for old, p, group in zip(before, params_of(optimizer), _groups_per_param(optimizer)):
        layout = layout_for(tuple(p.shape), group["block"])
        changed = (old != p.detach()).reshape(-1)
        pieces = changed.split(layout.lengths()) if layout.numel else []
        result.append([bool(piece.any()) for piece in pieces])
    return result


def _groups_per_param(optimizer):
    return [group for group in optimizer.param_groups for _ in group["params"]]
