"""magma_ext.megatron on one GPU: megatron-core's GPTModel (tests/megatron_gpt_runs.py under
torchrun, one process), for what a single GPU can show. Needs megatron-core (>= 0.19) and a GPU.

- Tensor identity: every masked tensor is keyed by the index of its global name, and the blocks
  that moved at each step are exactly the ones the mask contract draws for that name (tensor
  blocks at keep_prob 0.5), with the distributed optimizer, with the Float16 wrapper, and with
  MoE experts (SequentialMLP; expert parallelism 1 puts them in the dense part).
- Checkpoints at DP=1 in both distributed-optimizer formats and the Float16 wrapper's: the
  resumed half repeats the uninterrupted one.
- A checkpoint whose Magma scores are keyed by position (as magma_ext.megatron wrote them before
  names) resumes with those scores under the parameters' names, exactly.

The runs of a wave start together (the model is small); the second wave resumes the first's
checkpoints.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", minversion="0.19")  # magma_ext.megatron builds on 0.19
if not torch.cuda.is_available():
    pytest.skip("needs a GPU", allow_module_level=True)

from megatron_launch import save_and_resume  # noqa: E402

from magma_ext import name_index  # noqa: E402

STEPS, HALF = 16, 8
DISTOPT = ["--distributed-optimizer"]
FIRST_WAVE = {  # name: (processes, runner arguments)
    "dp1": (1, DISTOPT),
    "f16": (1, []),
    "moe": (1, [*DISTOPT, "--experts", "4"]),
    "dp1_half_full": (1, [*DISTOPT, "--steps", str(HALF), "--format", "fully_reshardable"]),
    "dp1_half_dpr": (1, [*DISTOPT, "--steps", str(HALF), "--format", "dp_reshardable"]),
    "dp1_half_legacy": (1, [*DISTOPT, "--steps", str(HALF), "--format", "fully_reshardable", "--legacy-scores"]),
    "f16_half": (1, ["--steps", str(HALF)]),
}
RESUMES = {  # name: (processes, checkpoint of, format, extra arguments)
    "dp1_resume_full": (1, "dp1_half_full", "fully_reshardable", DISTOPT),
    "dp1_resume_dpr": (1, "dp1_half_dpr", "dp_reshardable", DISTOPT),
    "dp1_resume_legacy": (1, "dp1_half_legacy", "fully_reshardable", DISTOPT),
    "f16_resume": (1, "f16_half", "fully_reshardable", []),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return save_and_resume(FIRST_WAVE, RESUMES, tmp_path_factory.mktemp("megatron_one_gpu"), STEPS, HALF, 29800)


@pytest.mark.parametrize("name", ["dp1", "f16", "moe"])
def test_masks_are_drawn_with_the_index_of_each_tensors_global_name(runs, name):
    run = runs(name)
    assert all(run["ok"])
    assert run["masks"] == run["predicted"], f"{name}: the realised masks are not the contract's for the names"
    assert run["names"] and all(int(index) == name_index(n) for index, n in run["names"].items())
    assert set(run["names"]) == set(run["masks"][0])
    kept = sum(len(blocks) for step in run["masks"] for blocks in step.values())
    assert 0.3 < kept / (len(run["masks"]) * len(run["masks"][0])) < 0.7
    if name == "moe":
        experts = {n for n in run["names"].values() if ".mlp.experts.local_experts." in n}
        assert {n.split(".local_experts.")[1].split(".")[0] for n in experts} == {"0", "1", "2", "3"}
        assert run["parts"] == ["MagmaDistributedOptimizer"]  # expert parallelism 1: experts are dense


def test_the_wrappers_draw_the_same_masks(runs):
    dp1, f16 = runs("dp1"), runs("f16")
    assert dp1["masks"] == f16["masks"] and dp1["names"] == f16["names"]
    for x, y in zip(dp1["losses"], f16["losses"]):
        assert abs(x - y) <= 2e-2 * abs(y)


@pytest.mark.parametrize("resumed, whole", [("dp1_resume_full", "dp1"), ("dp1_resume_dpr", "dp1"),
                                            ("dp1_resume_legacy", "dp1"), ("f16_resume", "f16")])
def test_a_resumed_run_repeats_the_uninterrupted_one(runs, resumed, whole):
    a, b = runs(resumed), runs(whole)
    assert a["masks"] == b["masks"][HALF:], f"{resumed}: masks after the resume differ from {whole}'s"
    for step, (x, y) in enumerate(zip(a["losses"], b["losses"][HALF:]), start=HALF + 1):
        assert abs(x - y) <= 1e-6 * abs(y), f"{resumed}: step {step} loss {x} vs {y}"
    assert a["scores"].keys() == b["scores"].keys()
    for index in a["scores"]:
        assert torch.allclose(torch.tensor(a["scores"][index]), torch.tensor(b["scores"][index]), atol=1e-6), index
