"""The fused CUDA step against the PyTorch reference on the same GPU: same masks, same numbers."""

from __future__ import annotations

import itertools

import pytest
import torch

from cuda_helpers import (
    SHAPES, STATE_TOL, CapturedStep, assert_same_state, changed_blocks, feed_same_grads, params_of, requires_gpu,
    twins,
)

pytestmark = requires_gpu

BASES = ["adam", "rmsprop", "laprop"]
MASKS = ["magma", "skip", "none"]
BLOCKS = ["tensor", "row", 7, 3000]
DTYPES = {
    "f32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "f16": (torch.float16, False),
    "bf16_master": (torch.bfloat16, True),
}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("base", BASES)
def test_fused_matches_reference_after_1_and_200_steps(base, mask, block, dtype_name):
    dtype, master = DTYPES[dtype_name]
    fused, reference = twins(
        SHAPES, dtype, master_weights=master, base=base, mask=mask, block=block,
        lr=1e-2, weight_decay=0.1, seed=12345,
    )
    for step in range(200):
        feed_same_grads(fused, reference, step)
        fused.step()
        reference.step()
        if step in (0, 199):
            assert_same_state(fused, reference, where=f"step {step + 1}", trajectory=step > 0)


@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("mask", ["magma", "skip"])
def test_masks_identical_every_step(mask, block):
    fused, reference = twins(SHAPES, mask=mask, block=block, lr=1e-2, keep_prob=0.5, seed=7)
    kept_any = dropped_any = False
    for step in range(20):
        feed_same_grads(fused, reference, step)
        before_f = [p.detach().clone() for p in params_of(fused)]
        before_r = [p.detach().clone() for p in params_of(reference)]
        fused.step()
        reference.step()
        masks_f = changed_blocks(before_f, None, fused)
        masks_r = changed_blocks(before_r, None, reference)
        assert masks_f == masks_r, f"step {step + 1}"
        flat = list(itertools.chain.from_iterable(masks_f))
        kept_any |= any(flat)
        dropped_any |= not all(flat)
    assert kept_any and dropped_any


@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.9])
def test_masked_blocks_of_several_work_items(keep_prob):
    # Row blocks of 20000 and 9001 elements span 3 and 2 work items of the apply pass, which
    # steps over a masked block's items together; many such blocks sit side by side here.
    shapes = [(40, 20000), (7, 9001), (3,), (25, 16384)]
    fused, reference = twins(shapes, block="row", lr=1e-2, keep_prob=keep_prob, seed=13)
    for step in range(6):
        feed_same_grads(fused, reference, step)
        before_f = [p.detach().clone() for p in params_of(fused)]
        before_r = [p.detach().clone() for p in params_of(reference)]
        fused.step()
        reference.step()
        assert changed_blocks(before_f, None, fused) == changed_blocks(before_r, None, reference)
        assert_same_state(fused, reference, where=f"step {step + 1}")


def test_float32_grads_on_bfloat16_params():
    fused, reference = twins(SHAPES, torch.bfloat16, master_weights=True, lr=1e-2, block="row")
    for step in range(5):
        feed_same_grads(fused, reference, step, grad_dtype=torch.float32)
        fused.step()
        reference.step()
    assert_same_state(fused, reference)


def test_many_tensors_in_one_group():
    generator = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 3000, (1100,), generator=generator).tolist()
    # 300 tensors above the single-pass limit fill more than one two-pass launch (256 tensors).
    shapes = [(n,) for n in sizes] + [(40, 50)] * 20 + [(70000,)] + [(9001,)] * 300
    for block in ("tensor", "row"):
        fused, reference = twins(shapes, lr=1e-2, block=block, seed=11)
        for step in range(3):
            feed_same_grads(fused, reference, step)
            fused.step()
            reference.step()
        assert_same_state(fused, reference, where=f"block={block}")


def test_deterministic_across_runs():
    runs = []
    for _ in range(2):
        fused, _ = twins([(4097,), (3, 9000), (300, 40)], lr=1e-2, seed=5)
        for step in range(5):
            feed_same_grads(fused, _, step)
            fused.step()
        runs.append([fused.state[p]["magma_score"].clone() for p in params_of(fused)]
                    + [p.detach().clone() for p in params_of(fused)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_found_inf_skips_and_grad_scale_unscales():
    fused, reference = twins(SHAPES, lr=1e-2, block="row")
    feed_same_grads(fused, reference, 0)
    fused.step()
    reference.step()
    snapshot = {k: v.clone() for p in params_of(fused) for k, v in fused.state[p].items()
                if isinstance(v, torch.Tensor)}
    before = [p.detach().clone() for p in params_of(fused)]
    feed_same_grads(fused, reference, 1)
    fused.grad_scale = torch.tensor(4.0, device="cuda")
    fused.found_inf = torch.tensor(1.0, device="cuda")
    fused.step()
    for old, p in zip(before, params_of(fused)):
        assert torch.equal(old, p.detach())
    now = {k: v for p in params_of(fused) for k, v in fused.state[p].items() if isinstance(v, torch.Tensor)}
    for key in snapshot:
        assert torch.equal(snapshot[key], now[key]), key
    fused.found_inf = torch.tensor(0.0, device="cuda")
    for p in params_of(fused):
        p.grad.mul_(4.0)
    fused.step()
    reference.step()
    del fused.grad_scale, fused.found_inf
    assert_same_state(fused, reference)


def test_tensor_lr_and_cuda_graph_capture():
    shapes = [(257,), (33, 65), (5000,)]
    fused, reference = twins(shapes, lr=torch.tensor(1e-2, device="cuda"), capturable=True, block="row")
    reference.param_groups[0]["lr"] = 1e-2
    feed_same_grads(fused, reference, 0)
    fused.step()
    reference.step()
    captured = CapturedStep(fused)
    for step in range(1, 6):
        feed_same_grads(fused, reference, step)
        captured.replay()
        reference.step()
    assert_same_state(fused, reference, where="graph replay")


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32-state", "bf16-state"])
def test_no_host_sync_in_step(state_dtype):
    fused, _ = twins([(33, 257), (16385,), (3, 9000)], lr=1e-2, block="tensor", exp_avg_dtype=state_dtype,
                     exp_avg_sq_dtype=state_dtype)
    feed_same_grads(fused, _, 0)
    fused.step()  # state creation happens here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _step in range(3):
            fused.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_mixed_devices_and_non_contiguous_params_fall_back():
    cuda_param = torch.randn(40, 30, device="cuda", requires_grad=True)
    cpu_param = torch.randn(40, 30, requires_grad=True)
    strided = torch.randn(30, 40, device="cuda").t().requires_grad_()
    optimizer = __import__("magma_ext").Magma([cuda_param, cpu_param, strided], lr=1e-2)
    for p in (cuda_param, cpu_param, strided):
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in (cuda_param, cpu_param, strided))
    with pytest.raises(RuntimeError, match="contiguous"):
        __import__("magma_ext").Magma([strided], fused=True)
    with pytest.raises(RuntimeError, match="CUDA"):
        __import__("magma_ext").Magma([cpu_param], fused=True)


@pytest.mark.parametrize("block", ["tensor", 300], ids=str)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@requires_gpu
def test_non_finite_grad_keeps_the_score_on_both_paths(bad, block):
    # One bad element without a scaler: both paths keep the block's score (docs/ALGORITHM.md
    # section 7), and poison the same elements.
    fused, reference = twins([(33, 257), (8193,)], block=block, lr=1e-2, keep_prob=1.0, seed=3)
    for step in range(4):
        feed_same_grads(fused, reference, step)
        if step == 1:
            for p in params_of(fused) + params_of(reference):
                p.grad[(0,) * p.grad.dim()] = bad
        fused.step()
        reference.step()
    for p, q in zip(params_of(fused), params_of(reference)):
        assert torch.isfinite(fused.state[p]["magma_score"]).all()
        torch.testing.assert_close(fused.state[p]["magma_score"], reference.state[q]["magma_score"], **STATE_TOL)
        assert torch.equal(torch.isfinite(p), torch.isfinite(q))
        assert (~torch.isfinite(p)).sum() <= 1


@pytest.mark.parametrize("block", ["tensor", "row", 7, 3000], ids=str)
def test_pipeline_stages_with_names_follow_the_whole_model_on_the_fused_path(block):
    """Each stage's fused step over its own named parameters repeats one fused step over the
    whole model bit for bit: names key the masks and a block's sums do not depend on the other
    tensors of a launch (docs/ALGORITHM.md section 4)."""
    from magma_ext import Magma

    torch.manual_seed(0)
    shapes = [(300, 70), (9000,), (64, 257), (5,), (1200, 33), (2, 3, 5)]
    whole = [(f"layers.{i}.w", torch.nn.Parameter(torch.randn(s, device="cuda"))) for i, s in enumerate(shapes)]
    split = [(name, torch.nn.Parameter(p.detach().clone())) for name, p in whole]
    options = dict(lr=1e-2, weight_decay=0.1, block=block, seed=7, fused=True)
    reference = Magma(whole, **options)
    stages = [Magma(split[:2], **options), Magma(split[2:], **options)]
    generator = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(20):
        for (_, a), (_, b) in zip(whole, split):
            a.grad = torch.randn(a.shape, device="cuda", generator=generator)
            b.grad = a.grad.clone()
        reference.step()
        for stage in stages:
            stage.step()
    for (name, a), (_, b) in zip(whole, split):
        assert torch.equal(a, b), name
