"""magma_ext.param_groups: which parameters are masked and decayed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from magma_ext import Magma, param_groups


class CustomNorm(nn.Module):
    """A norm the helper cannot know by type: only its class name says "Norm"."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, width))  # 2-D on purpose

    def forward(self, x):
        return x * self.weight[0] + self.weight[1]


class TinyLM(nn.Module):
    def __init__(self, vocab=11, width=8, tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm_in = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)  # with bias
        self.down = nn.Linear(2 * width, width, bias=False)
        self.conv = nn.Conv1d(width, width, kernel_size=3, padding=1)
        self.norm_out = nn.RMSNorm(width)
        self.custom = CustomNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.frozen = nn.Linear(width, width)
        self.frozen.requires_grad_(False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.norm_in(self.embed(tokens))
        x = x + self.down(torch.relu(self.up(x)))
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.head(self.custom(self.norm_out(x)))


def _names(model, params):
    by_id = {id(p): name for name, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


EXPECTED_MASKED = {"up.weight", "down.weight", "conv.weight", "head.weight"}
EXPECTED_UNMASKED = {"embed.weight", "norm_in.weight", "norm_in.bias", "up.bias", "conv.bias",
                     "norm_out.weight", "custom.weight"}


def _split(groups):
    masked = [g for g in groups if g.get("magma", True) is not False]
    unmasked = [g for g in groups if g.get("magma", True) is False]
    return masked, unmasked


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_membership_and_options(weight_decay):
    model = TinyLM()
    groups = param_groups(model, weight_decay=weight_decay)
    masked, unmasked = _split(groups)
    assert _names(model, [p for g in masked for p in g["params"]]) == EXPECTED_MASKED
    assert _names(model, [p for g in unmasked for p in g["params"]]) == EXPECTED_UNMASKED
    assert all(g["weight_decay"] == weight_decay for g in masked)
    assert all(g["weight_decay"] == 0.0 for g in unmasked)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied-embedding"])
def test_every_trainable_parameter_exactly_once(tie):
    model = TinyLM(tie=tie)
    listed = [p for g in param_groups(model, weight_decay=0.1) for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(listed) == len({id(p) for p in listed})
    assert {id(p) for p in listed} == {id(p) for p in trainable}


def test_default_weight_decay_is_zero():
    assert all(g["weight_decay"] == 0.0 for g in param_groups(TinyLM()))


def test_groups_train_with_magma():
    """The groups plug into Magma; unmasked params all move (mask "none"), nothing is NaN."""
    torch.manual_seed(0)
    model = TinyLM()
    groups = param_groups(model, weight_decay=0.1)
    optimizer = Magma(groups, lr=0.01, keep_prob=0.5, block="row")
    unmasked = [p for g in _split(groups)[1] for p in g["params"]]
    before = [p.detach().clone() for p in unmasked]
    tokens = torch.randint(0, 11, (2, 5))
    for _ in range(3):
        optimizer.zero_grad()
        model(tokens).logsumexp(-1).mean().backward()
        optimizer.step()
    checked = 0
    for p, old in zip(unmasked, before):
        if p.grad is not None and bool((p.grad != 0).all()):  # embedding rows of unseen tokens get 0
            assert bool((p.detach() != old).all())
            checked += 1
    assert checked >= 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(bool((optimizer.state[p]["magma_score"] == 0.5).all())
               for p in unmasked if optimizer.state[p])
