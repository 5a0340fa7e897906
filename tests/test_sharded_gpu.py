"""Sharded Magma with the fused kernels on two GPUs (NCCL) against one GPU.

Skipped without two GPUs and the CUDA extension; run on the 2-GPU machine with NVLink multicast
off (NCCL_NVLS_ENABLE=0, as the machine's documentation asks).
"""

from __future__ import annotations

import pytest
import torch

import megatron_cases
import sharded_cases as cases
from distributed_helpers import run_nccl_ranks
from helpers import assert_scaled_close
from magma_ext import has_cuda_extension

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and has_cuda_extension()),
    reason="needs two CUDA GPUs and magma_ext's CUDA extension",
)
STEPS = 20
LLAMA_STEPS = 50


def test_flat_pieces_with_fused_kernels_follow_one_gpu():
    results = run_nccl_ranks(cases.flat_shard_body, 2, cases.COMBOS, STEPS, True, "cuda")
    for combo in cases.COMBOS:
        expected, _ = cases.single_process_run(combo, STEPS, fused=True, device="cuda")
        actual = cases.assemble(results, combo)
        for step, (got, want) in enumerate(zip(actual, expected)):
            for i, (a, e) in enumerate(zip(got, want)):
                assert_scaled_close(a, e, f"{combo}: step {step + 1}, parameter {i}")
        for step, (got, want) in enumerate(zip(cases.moved(actual), cases.moved(expected)), start=2):
            assert all(torch.equal(a, e) for a, e in zip(got, want)), f"{combo}: step {step}: masks differ"


def test_fsdp2_demo_llama_50_steps_follows_one_gpu():
    results = run_nccl_ranks(cases.llama_fsdp_body, 2, LLAMA_STEPS)
    losses, history, traffic = results[0]
    expected_losses, expected = cases.llama_single_gpu_run(LLAMA_STEPS, 2)
    worst = 0.0
    for step, (got, want) in enumerate(zip(history, expected)):
        for i, (a, e) in enumerate(zip(got, want)):
            assert_scaled_close(a, e, f"FSDP2 Llama: step {step + 1}, parameter {i}")
            worst = max(worst, (a - e).abs().max().item())
    for step, (got, want) in enumerate(zip(cases.moved(history), cases.moved(expected)), start=2):
        assert all(torch.equal(a, e) for a, e in zip(got, want)), f"step {step}: masks differ"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5, atol=0)
    print(f"\nFSDP2 demo Llama, 2 GPUs vs 1, {LLAMA_STEPS} steps: max |param difference| {worst:.3g}, "
          f"final loss {losses[-1]:.6f} vs {expected_losses[-1]:.6f}; score all-reduce per step: "
          f"{traffic['collectives']} collective(s), {traffic['bytes']} bytes")


def test_tensor_parallel_slices_with_fused_kernels_follow_one_process():
    """Row-parallel weights are column slices whose blocks (rows, or the whole tensor) are never
    whole on one rank: the fused step must add their sums over the slices like any split block."""
    results = run_nccl_ranks(megatron_cases.tp_dp_body, 2, 2, False, megatron_cases.COMBOS, megatron_cases.STEPS, "cuda")
    megatron_cases.check_tp_dp_run(results, 2, "cuda")
