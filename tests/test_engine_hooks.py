"""What engines that wrap Magma (Megatron-core's optimizer stack) rely on: several exchange
groups, state created before the first step, and a step saved in the parameter groups."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from magma_ext import Magma, declare_piece
from magma_ext.options import process_groups


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_process_group_takes_a_list_of_groups_and_checks_it(one_rank):
    other = dist.new_group([0])
    p = torch.nn.Parameter(torch.randn(4))
    assert process_groups(Magma([p], process_group=[one_rank, other]).process_group) == [one_rank, other]
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup, a list"):
        Magma([p], process_group=[one_rank, "world"])
    with pytest.raises(ValueError, match="process_group: an empty list"):
        Magma([p], process_group=[])


def test_an_empty_rank_joins_every_listed_group(one_rank):
    """A rank without a piece of a masked group still takes part in each group's exchange."""
    other = dist.new_group([0])
    held = declare_piece(torch.nn.Parameter(torch.randn(6)), index=0, offset=0, shape=(6,), group=one_rank)
    optimizer = Magma([{"params": [held]}, {"params": []}], process_group=[one_rank, other])
    held.grad = torch.randn(6)
    optimizer.step()
    empty = next(plan for key, plan in optimizer._planner._plans.items() if "empty" in key)
    assert [ranks for ranks, _ in empty.layouts] == [(0,), (0,)]


def test_init_state_creates_what_a_first_step_would(one_rank):
    whole = torch.nn.Parameter(torch.randn(3, 4))
    piece = declare_piece(torch.nn.Parameter(torch.randn(5)), index=9, offset=7, shape=(4, 4), group=one_rank)
    optimizer = Magma([whole, piece], block="row")
    optimizer.init_state()
    assert optimizer.state[whole]["magma_tensor_index"] == 0
    assert optimizer.state[piece]["magma_tensor_index"] == 9
    assert optimizer.state[piece]["magma_score"].tolist() == [0.5, 0.5]  # rows 1 and 2 of the tensor
    assert optimizer.state[piece]["exp_avg"].shape == (5,) and optimizer.state[piece]["step"].item() == 0
    reference = Magma([torch.nn.Parameter(whole.detach().clone())], block="row")
    whole.grad = torch.randn(3, 4)
    reference.param_groups[0]["params"][0].grad = whole.grad.clone()
    piece.grad = torch.randn(5)
    optimizer.step()
    reference.step()
    torch.testing.assert_close(whole, reference.param_groups[0]["params"][0], rtol=0, atol=0)


def test_state_without_a_step_takes_its_groups_step():
    """Megatron's distributed optimizer, with Transformer Engine or apex installed, keeps the
    step in param_groups only."""
    p = torch.nn.Parameter(torch.randn(4))
    optimizer = Magma([p])
    p.grad = torch.randn(4)
    optimizer.step()
    saved = optimizer.state_dict()
    saved["state"][0].pop("step")
    saved["param_groups"][0]["step"] = 7
    optimizer.load_state_dict(saved)
    assert optimizer.state[p]["step"].item() == 7 and optimizer.state[p]["step"].dtype == torch.float32
    saved["param_groups"][0].pop("step")
    with pytest.raises(ValueError, match="has no 'step'"):
        Magma([torch.nn.Parameter(torch.randn(4))]).load_state_dict(saved)


def test_a_loaded_piece_without_magma_state_keeps_its_declared_index(one_rank):
    piece = declare_piece(torch.nn.Parameter(torch.randn(4)), index=5, offset=4, shape=(8,), group=one_rank)
    optimizer = Magma([piece])
    piece.grad = torch.randn(4)
    optimizer.step()
    saved = optimizer.state_dict()
    for key in ("magma_score", "magma_tensor_index"):
        saved["state"][0].pop(key)
    optimizer.load_state_dict(saved)
    assert optimizer.state[piece]["magma_tensor_index"] == 5
