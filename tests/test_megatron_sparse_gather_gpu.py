"""magma_ext.megatron's sparse parameter all-gather on 2 GPUs (NCCL): 50 steps of a small
megatron-core GPTModel (DP=2, distributed optimizer) per block option and keep_prob with the
route the layout picks, and at keep_prob 0.5 with each route forced and under
overlap_param_gather, checking after every step (overlapped: after the next forward, which runs
the step's gathers) that every rank's buckets hold, bit for bit, what a dense all-gather of the
shards gives. Needs megatron-core (>= 0.19) and 2 GPUs."""

from __future__ import annotations

from functools import partial

import pytest
import torch

pytest.importorskip("megatron.core", minversion="0.19")  # magma_ext.megatron builds on 0.19
if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 GPUs", allow_module_level=True)

from megatron_launch import result, wave  # noqa: E402

SPARSE_STEPS = 50
# Without overlap_grad_reduce, Megatron puts every parameter in one bucket; its shard boundary
# falls 896 elements into layer 0's linear_fc2.weight (64 x 256): inside a row (896 % 256 = 128)
# and inside a 5-element block (896 % 5 = 1), but on a 7-element boundary. Hence N = 5.
BLOCKS = ("tensor", "row", "5")
RUNS = {f"sparse_{block}_{keep}": (2, ["--distributed-optimizer", "--sparse-param-gather", "--block", block,
                                      "--keep-prob", keep, "--steps", str(SPARSE_STEPS)])
        for block in BLOCKS for keep in ("0.1", "0.5", "0.9")}
# forced, at keep_prob 0.5 (the runs above take the default route); "-chunks": the packed route in
# chunks of 4 KiB per rank, so that chunk edges cut ranges and unpacking overlaps the next chunk
ROUTES = ("in-place", "packed", "packed-chunks")
RUNS.update({f"sparse_{block}_0.5_{route}": (2, RUNS[f"sparse_{block}_0.5"][1] + [
    "--sparse-route", route.removesuffix("-chunks")] + (["--sparse-chunk-bytes", "4096"] if "chunks" in route else []))
             for block in BLOCKS for route in ROUTES})


# under overlap_param_gather (with overlap_grad_reduce: several bucket groups, each gathered from
# the forward pre-hooks): the route the layout picks, and the packed one in chunks
OVERLAP_ROUTES = ("overlap", "overlap-packed-chunks")
RUNS.update({f"sparse_{block}_0.5_{route}": (2, RUNS[f"sparse_{block}_0.5"][1] + ["--overlap-param-gather"] + (
    ["--sparse-route", "packed", "--sparse-chunk-bytes", "4096"] if "chunks" in route else []))
    for block in BLOCKS for route in OVERLAP_ROUTES})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sparse")
    wave(RUNS, workdir, 29600)
    return partial(result, workdir)


CASES = [(block, keep, "") for block in BLOCKS for keep in ("0.1", "0.5", "0.9")] + \
    [(block, "0.5", route) for block in BLOCKS for route in ROUTES + OVERLAP_ROUTES]


@pytest.mark.parametrize("block, keep, route", CASES)
def test_the_sparse_param_gather_gives_every_rank_the_dense_gathers_parameters(runs, block, keep, route):
    run = runs(f"sparse_{block}_{keep}" + (f"_{route}" if route else ""))
    if not route.startswith("overlap"):  # overlapped runs have other buckets (several bucket groups)
        assert run["shard_cuts_a_block"], "no block straddles a shard boundary: the case is not covered\n" + \
            "\n".join(run["shard_boundaries"])
    assert len(run["sparse_is_dense"]) == SPARSE_STEPS and all(run["sparse_is_dense"]), \
        f"steps whose sparse gather differs from a dense one: {[i for i, ok in enumerate(run['sparse_is_dense']) if not ok]}"
    sent = sum(s + r for s, r, _, _ in run["sync_bytes"])
    dense = sum(ds + dr for _, _, ds, dr in run["sync_bytes"])
    print(f"\nsparse gather, block {block}, keep_prob {keep}, route {route or 'auto'}: {sent / dense:.3f} of the "
          f"dense bytes over {SPARSE_STEPS} steps")
    assert sent <= dense and (sent < dense or keep == "0.9")  # padded to the fullest shard: never more
