"""The sparse parameter sync on 2 GPUs (NCCL), without megatron-core: every route, in one chunk
and in several, on random bucket layouts, bit for bit against a dense all-gather at every step
(the CPU test's scenario, tests/test_sparse_gather.py, with NCCL's collectives and streams).

Skipped without two GPUs; run on the 2-GPU machine with NVLink multicast off.
"""

from __future__ import annotations

import pytest
import torch

from distributed_helpers import run_nccl_ranks
from sparse_gather_cases import EXACT_ROUTES, ROUTES, sync_body

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2),
                                reason="needs two CUDA GPUs")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("seed", [1, 5])
def test_every_route_over_nccl_equals_a_dense_gather(route, seed):
    results = run_nccl_ranks(sync_body, 2, seed, 8, route, "cuda")
    for step in zip(*results):
        if route in EXACT_ROUTES:
            assert all(sent + received == sum(s for s, _, _, _ in step) for sent, received, _, _ in step)
        else:
            assert step[0] == step[1]
