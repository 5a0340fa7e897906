"""magma_ext.megatron on one GPU: megatron-core's GPTModel (tests/megatron_gpt_runs.py under
torchrun, one process), for what a single GPU can show. Needs megatron-core (>= 0.19) and a GPU.

- Tensor identity: every masked tensor is keyed by the index of its global name, and the blocks
  that moved at each step are exactly the ones the mask contract draws for that name (tensor
  blocks at keep_prob 0.5), with the distributed optimizer, with the Float16 wrapper, and with
  MoE experts (SequentialMLP; expert parallelism 1 puts them in the dense part).
- Checkpoints at DP=1 in both distributed-optimizer formats and the Float16 wrapper's: the
  resumed half repeats the uninterrupted one.
- Magma's bfloat16 moments (``exp_avg_dtype``/``exp_avg_sq_dtype``): the same masks as float32
  moments, checkpoints in both distributed-optimizer formats and the Float16 wrapper's that
  resume exactly (the stochastic rounding's stream continues), and float32 moments loading into
  bfloat16 ones and back.
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
BF16 = ["--moments", "bfloat16"]
FIRST_WAVE = {  # name: (processes, runner arguments)
    "dp1": (1, DISTOPT),
    "f16": (1, []),
    "moe": (1, [*DISTOPT, "--experts", "4"]),
    "dp1_half_full": (1, [*DISTOPT, "--steps", str(HALF), "--format", "fully_reshardable"]),
    "dp1_half_dpr": (1, [*DISTOPT, "--steps", str(HALF), "--format", "dp_reshardable"]),
    "dp1_half_legacy": (1, [*DISTOPT, "--steps", str(HALF), "--format", "fully_reshardable", "--legacy-scores"]),
    "f16_half": (1, ["--steps", str(HALF)]),
    "bf16m": (1, [*DISTOPT, *BF16]),
    "f16_bf16m": (1, BF16),
    "bf16m_half_full": (1, [*DISTOPT, *BF16, "--steps", str(HALF), "--format", "fully_reshardable"]),
    "bf16m_half_dpr": (1, [*DISTOPT, *BF16, "--steps", str(HALF), "--format", "dp_reshardable"]),
    "f16_bf16m_half": (1, [*BF16, "--steps", str(HALF)]),
}
RESUMES = {  # name: (processes, checkpoint of, format, extra arguments)
    "dp1_resume_full": (1, "dp1_half_full", "fully_reshardable", DISTOPT),
    "dp1_resume_dpr": (1, "dp1_half_dpr", "dp_reshardable", DISTOPT),
    "dp1_resume_legacy": (1, "dp1_half_legacy", "fully_reshardable", DISTOPT),
    "f16_resume": (1, "f16_half", "fully_reshardable", []),
    "bf16m_resume_full": (1, "bf16m_half_full", "fully_reshardable", [*DISTOPT, *BF16]),
    "bf16m_resume_dpr": (1, "bf16m_half_dpr", "dp_reshardable", [*DISTOPT, *BF16]),
    "f16_bf16m_resume": (1, "f16_bf16m_half", "fully_reshardable", BF16),
    "bf16m_from_f32_full": (1, "dp1_half_full", "fully_reshardable", [*DISTOPT, *BF16]),
    "bf16m_from_f32_dpr": (1, "dp1_half_dpr", "dp_reshardable", [*DISTOPT, *BF16]),
    "f32_from_bf16m_full": (1, "bf16m_half_full", "fully_reshardable", DISTOPT),
    "f32_from_bf16m_dpr": (1, "bf16m_half_dpr", "dp_reshardable", DISTOPT),
    "f16_bf16m_from_f32": (1, "f16_half", "fully_reshardable", BF16),
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
                                            ("dp1_resume_legacy", "dp1"), ("f16_resume", "f16"),
                                            ("bf16m_resume_full", "bf16m"), ("bf16m_resume_dpr", "bf16m"),
                                            ("f16_bf16m_resume", "f16_bf16m")])
def test_a_resumed_run_repeats_the_uninterrupted_one(runs, resumed, whole):
    a, b = runs(resumed), runs(whole)
    assert a["masks"] == b["masks"][HALF:], f"{resumed}: masks after the resume differ from {whole}'s"
    for step, (x, y) in enumerate(zip(a["losses"], b["losses"][HALF:]), start=HALF + 1):
        assert abs(x - y) <= 1e-6 * abs(y), f"{resumed}: step {step} loss {x} vs {y}"
    assert a["scores"].keys() == b["scores"].keys()
    for index in a["scores"]:
        assert torch.allclose(torch.tensor(a["scores"][index]), torch.tensor(b["scores"][index]), atol=1e-6), index


@pytest.mark.parametrize("name, whole", [("bf16m", "dp1"), ("f16_bf16m", "f16")])
def test_bfloat16_moments_keep_the_masks_and_stay_near_float32s(runs, name, whole):
    a, b = runs(name), runs(whole)
    assert a["moment_dtypes"] == ["torch.bfloat16"] and b["moment_dtypes"] == ["torch.float32"]
    assert a["masks"] == b["masks"] and a["names"] == b["names"]
    assert a["losses"] != b["losses"], "bfloat16 moments left no trace: were they float32?"
    for step, (x, y) in enumerate(zip(a["losses"], b["losses"]), start=1):
        assert abs(x - y) <= 2e-2 * abs(y), f"{name}: step {step} loss {x} vs {whole}'s {y}"


@pytest.mark.parametrize("resumed, whole, dtype", [
    ("bf16m_from_f32_full", "dp1", "bfloat16"), ("bf16m_from_f32_dpr", "dp1", "bfloat16"),
    ("f16_bf16m_from_f32", "f16", "bfloat16"),
    ("f32_from_bf16m_full", "bf16m", "float32"), ("f32_from_bf16m_dpr", "bf16m", "float32")])
def test_moments_load_into_the_other_dtype(runs, resumed, whole, dtype):
    a, b = runs(resumed), runs(whole)
    assert a["moment_dtypes"] == [f"torch.{dtype}"]
    assert a["masks"] == b["masks"][HALF:]
    for step, (x, y) in enumerate(zip(a["losses"], b["losses"][HALF:]), start=HALF + 1):
        assert abs(x - y) <= 2e-2 * abs(y), f"{resumed}: step {step} loss {x} vs {whole}'s {y}"
