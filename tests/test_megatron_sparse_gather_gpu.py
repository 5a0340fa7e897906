"""magma_ext.megatron's sparse parameter all-gather on 2 GPUs (NCCL): 50 steps of a small
megatron-core GPTModel (DP=2, distributed optimizer) per block option and keep_prob, checking
after every step that every rank's buckets hold, bit for bit, what a dense all-gather of the
shards gives. Needs megatron-core (>= 0.17) and 2 GPUs."""

from __future__ import annotations

from functools import partial

import pytest
import torch

pytest.importorskip("megatron.core")
if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 GPUs", allow_module_level=True)

from megatron_launch import result, wave  # noqa: E402

SPARSE_STEPS = 50
RUNS = {f"sparse_{block}_{keep}": (2, ["--distributed-optimizer", "--sparse-param-gather", "--block", block,
                                      "--keep-prob", keep, "--steps", str(SPARSE_STEPS)])
        for block in ("tensor", "row", "7") for keep in ("0.1", "0.5", "0.9")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sparse")
    wave(RUNS, workdir, 29600)
    return partial(result, workdir)


@pytest.mark.parametrize("block", ["tensor", "row", "7"])
@pytest.mark.parametrize("keep", ["0.1", "0.5", "0.9"])
def test_the_sparse_param_gather_gives_every_rank_the_dense_gathers_parameters(runs, block, keep):
    run = runs(f"sparse_{block}_{keep}")
    assert run["shard_cuts_a_block"], "no block straddles a shard boundary: the case is not covered"
    assert len(run["sparse_is_dense"]) == SPARSE_STEPS and all(run["sparse_is_dense"]), \
        f"steps whose sparse gather differs from a dense one: {[i for i, ok in enumerate(run['sparse_is_dense']) if not ok]}"
    sent = sum(s + r for s, r, _, _ in run["sync_bytes"])
    dense = sum(ds + dr for _, _, ds, dr in run["sync_bytes"])
    print(f"\nsparse gather, block {block}, keep_prob {keep}: {sent / dense:.3f} of the dense bytes over "
          f"{SPARSE_STEPS} steps")
    assert sent <= dense and (sent < dense or keep == "0.9")  # padded to the fullest shard: never more
