"""Tensor identity (docs/ALGORITHM.md sections 3 and 4): declared indices, names, positions.

A logical tensor draws the same masks under any split of the model when the optimizer is given
names: each pipeline stage's ``Magma(stage.named_parameters())`` follows one
``Magma(model.named_parameters())`` over the whole model exactly.
"""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch

from magma_ext import Magma, declare_piece, name_index, number_parameters, piece_of
from magma_ext.names import canonical_name

STEPS = 30


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 6), torch.nn.Tanh(),
        torch.nn.Linear(6, 3), torch.nn.Linear(3, 4, bias=False),
    )


def _step_all(optimizers, models, generator) -> None:
    """Give every copy of the model the same random gradient, then step every optimizer."""
    grads = [torch.randn(p.shape, generator=generator) for p in models[0].parameters()]
    for model in models:
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
    for optimizer in optimizers:
        optimizer.step()


@pytest.mark.parametrize("block", ["tensor", "row", 4])
@pytest.mark.parametrize("mask", ["magma", "skip"])
def test_pipeline_stages_with_names_follow_the_whole_model(block, mask):
    whole, split = _model(), _model()
    options = dict(lr=0.05, weight_decay=0.01, mask=mask, block=block, seed=11)
    reference = Magma(whole.named_parameters(), **options)
    first = [(name, p) for name, p in split.named_parameters() if name.split(".")[0] in ("0", "2")]
    second = [(name, p) for name, p in split.named_parameters() if name.split(".")[0] in ("4", "5")]
    stages = [Magma(first, **options), Magma(second, **options)]
    generator = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        _step_all([reference, *stages], [whole, split], generator)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        assert torch.equal(a, b), name
    assert reference.state[whole[4].weight]["magma_tensor_index"] == name_index("4.weight")


def test_without_names_a_stage_draws_other_masks():
    """What names fix: positions restart at 0 on each stage (say so in the docs)."""
    whole, split = _model(), _model()
    reference = Magma(whole.parameters(), lr=0.05, seed=11)
    second = Magma(list(split.parameters())[4:], lr=0.05, seed=11)
    assert second.param_groups[0]["params"][0] is split[4].weight
    generator = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        _step_all([reference, second], [whole, split], generator)
    assert not torch.equal(whole[4].weight, split[4].weight)


def test_wrapper_prefixes_do_not_change_a_name():
    assert canonical_name("module._orig_mod.layers.0._checkpoint_wrapped_module.attn.weight") == "layers.0.attn.weight"
    assert canonical_name("module.module.embed.weight") == "embed.weight"
    assert canonical_name("_fsdp_wrapped_module.w") == "w"
    assert canonical_name("module") == "module" and canonical_name("layers.module.w") == "layers.module.w"
    assert name_index("module._orig_mod.a.b") == name_index("a.b") != name_index("a.c")


def test_name_index_is_the_documented_digest():
    for name in ("", "w", "layers.0.attention.wq.weight", "ü.weight"):
        digest = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
        assert name_index(name) == 2**32 + digest % (2**62 - 2**32)
    with pytest.raises(TypeError, match="a parameter name must be a str, got int"):
        name_index(3)


def test_names_of_a_wrapped_model_give_the_bare_models_trajectory():
    bare, wrapped = _model(), _model()
    plain = Magma(bare.named_parameters(), lr=0.05)
    prefixed = Magma([(f"module._orig_mod.{name}", p) for name, p in wrapped.named_parameters()], lr=0.05)
    generator = torch.Generator().manual_seed(5)
    for _ in range(10):
        _step_all([plain, prefixed], [bare, wrapped], generator)
    assert all(torch.equal(a, b) for a, b in zip(bare.parameters(), wrapped.parameters()))


def test_two_names_of_one_tensor_index_are_refused_when_a_group_is_added():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"the names 'w' and 'module.w' give one tensor index \('w' once"):
        Magma([("w", a), ("module.w", b)])
    optimizer = Magma([("w", a)])
    with pytest.raises(ValueError, match=r"the names 'w' and '_orig_mod.w' give one tensor index"):
        optimizer.add_param_group({"params": [("_orig_mod.w", b)]})
    assert len(optimizer.param_groups) == 1
    with pytest.raises(ValueError, match=r"the names 'x' and 'module.x' give one tensor index"):
        number_parameters([("x", a), ("module.x", b)])
    assert piece_of(a) is None and piece_of(b) is None


def test_a_declared_piece_keeps_its_index_and_a_str_index_is_a_name():
    named = torch.nn.Parameter(torch.randn(3))
    declared = declare_piece(torch.nn.Parameter(torch.randn(4)), index=7, offset=0, shape=(4,))
    by_name = declare_piece(torch.nn.Parameter(torch.randn(2)), index="blocks.9.w", offset=0, shape=(2,))
    optimizer = Magma([("a", named), ("b", declared), ("c", by_name)])
    optimizer.init_state()
    indices = [optimizer.state[p]["magma_tensor_index"] for p in (named, declared, by_name)]
    assert indices == [name_index("a"), 7, name_index("blocks.9.w")]
    number_parameters([("layers.1.w", named)])
    assert piece_of(named).index == name_index("layers.1.w")


def test_a_checkpoint_keeps_the_indices_it_stores():
    """Checkpoints written with positional indices (before names keyed the masks) resume with
    them: a named optimizer loading one continues its trajectory."""
    model = _model()
    positional = Magma(model.parameters(), lr=0.05, seed=2)
    generator = torch.Generator().manual_seed(9)
    for _ in range(3):
        _step_all([positional], [model], generator)
    saved = copy.deepcopy(positional.state_dict())
    resumed_model = copy.deepcopy(model)
    resumed = Magma(resumed_model.named_parameters(), lr=0.05, seed=2)
    resumed.load_state_dict(saved)
    assert [resumed.state[p]["magma_tensor_index"] for p in resumed_model.parameters()] == list(range(7))
    for _ in range(STEPS):
        _step_all([positional, resumed], [model, resumed_model], generator)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def test_an_adamw_checkpoint_gives_named_parameters_their_names_indices():
    model = _model()
    adamw = torch.optim.AdamW(model.parameters())
    model[0].weight.grad = torch.ones_like(model[0].weight)
    adamw.step()
    optimizer = Magma(model.named_parameters())
    optimizer.load_state_dict(adamw.state_dict())
    assert optimizer.state[model[0].weight]["magma_tensor_index"] == name_index("0.weight")


def test_a_name_whose_index_is_held_is_refused_before_any_state():
    taken = declare_piece(torch.nn.Parameter(torch.randn(2)), index="w", offset=0, shape=(2,))
    named = torch.nn.Parameter(torch.randn(2))
    optimizer = Magma([{"params": [("v", taken)]}, {"params": [("w", named)]}])
    for p in (taken, named):
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"parameter 'w': its tensor index \d+ is held by another parameter"):
        optimizer.step()
    assert not any(optimizer.state.values())


def test_names_given_as_a_groups_param_names_are_checked_when_it_is_added():
    """torch.optim and torchtitan may pass names as a group's ``param_names`` key."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"the names 'w' and 'module.w' give one tensor index"):
        Magma([{"params": [a, b], "param_names": ["w", "module.w"]}])
    with pytest.raises(ValueError, match=r"param_names must be a list of one name per parameter \(2\)"):
        Magma([{"params": [a, b], "param_names": ["w"]}])
    with pytest.raises(TypeError, match=r"param_names must hold strings, got int"):
        Magma([{"params": [a, b], "param_names": ["w", 3]}])
    optimizer = Magma([{"params": [a, b], "param_names": ["w", "v"]}])
    optimizer.init_state()
    assert optimizer.state[b]["magma_tensor_index"] == name_index("v")
