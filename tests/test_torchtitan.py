"""magma_ext.torchtitan: Magma built by torchtitan's optimizers container, one per model part
(pipeline stage), follows one Magma over the whole model. Skipped without torchtitan."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("torchtitan")

from torchtitan.components.optimizer import ParamGroupConfig  # noqa: E402

from magma_ext import Magma  # noqa: E402
from magma_ext.torchtitan import MagmaOptimizersContainer  # noqa: E402
from pipeline_cases import OPTIONS, StagedModel, stage_module  # noqa: E402

STEPS = 20
BLOCKS = ["tensor", "row", 7]


def _config(block, extra_groups=(), overrides=(("fused", None),)):
    """docs/torchtitan.md's config: torchtitan's default implementation ("fused"), overridden by
    the Magma group's ``overrides`` (``fused=None`` unless told)."""
    kwargs = {**OPTIONS, "block": block, **dict(overrides)}
    magma = ParamGroupConfig(pattern=r".*", optimizer_name="Magma", optimizer_kwargs=kwargs)
    return MagmaOptimizersContainer.Config(param_groups=[*extra_groups, magma])


def _split(model):
    """The model's two pipeline stages, as torchtitan's split makes them (copies, names kept)."""
    return [stage_module(model, stage, 2) for stage in range(2)]


def _step(models_and_optimizers, step):
    """The same gradient, by name, on every model (the first entry's models hold every name);
    then every optimizer steps."""
    generator = torch.Generator().manual_seed(100 + step)
    grads = {name: torch.randn(p.shape, generator=generator)
             for model in models_and_optimizers[0][0] for name, p in model.named_parameters()}
    for models, optimizer in models_and_optimizers:
        for model in models:
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
        optimizer.step()
        optimizer.zero_grad()


def _assert_same_parameters(whole, parts, what):
    expected = dict(whole.named_parameters())
    for part in parts:
        for name, p in part.named_parameters():
            assert torch.equal(p, expected[name]), f"{what}: {name}"


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_one_magma_per_stage_follows_one_magma_over_the_whole_model(block):
    whole = StagedModel()
    parts = _split(whole)
    container = _config(block).build(model_parts=parts)
    assert [type(optimizer) for optimizer in container] == [Magma, Magma]
    reference = Magma(whole.named_parameters(), block=block, **OPTIONS)
    container.state_dict()  # a checkpoint before the first step: creates the state, counts no step
    for step in range(STEPS):
        _step([([whole], reference), (parts, container)], step)
        _assert_same_parameters(whole, parts, f"block {block}, step {step + 1}")


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_a_checkpoint_of_the_container_resumes_the_trajectory(block):
    whole = StagedModel()
    parts = _split(whole)
    container = _config(block).build(model_parts=parts)
    reference = Magma(whole.named_parameters(), block=block, **OPTIONS)
    for step in range(STEPS // 2):
        _step([([whole], reference), (parts, container)], step)
    saved = copy.deepcopy(container.state_dict())
    resumed_parts = copy.deepcopy(parts)
    resumed = _config(block).build(model_parts=resumed_parts)
    resumed.load_state_dict(saved)
    for step in range(STEPS // 2, STEPS):
        _step([([whole], reference), (resumed_parts, resumed)], step)
        _assert_same_parameters(whole, resumed_parts, f"resumed, block {block}, step {step + 1}")


def test_other_optimizer_names_still_build_and_fused_needs_the_kernels():
    adamw = ParamGroupConfig(pattern=r"\.bias$", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3})
    container = _config("row", extra_groups=[adamw]).build(model_parts=_split(StagedModel()))
    assert [type(optimizer).__name__ for optimizer in container] == ["AdamW", "Magma"] * 2
    assert not any(name.endswith(".bias") for group in container.optimizers[1].param_groups
                   for name in group["param_names"])
    assert all("foreach" not in group for group in container.optimizers[1].param_groups)
    with pytest.raises(RuntimeError, match="fused=True"):  # torchtitan's default, on CPU parameters
        _config("row", overrides=()).build(model_parts=_split(StagedModel()))
