"""The checkpoint mixins of magma_ext.megatron over stand-ins of Megatron's wrappers (CPU, gloo):
scores travel beside the per-tensor state, resume exactly, and the distributed optimizer's
per-shard state never carries the score, nor takes a step from the loading template."""

from __future__ import annotations

import torch

import megatron_cases as cases
from distributed_helpers import run_ranks
from magma_ext import Magma
from magma_ext.megatron.scores import ShardStateFilter


def test_scores_travel_beside_the_state_and_resume_exactly():
    for result in run_ranks(2, cases.checkpoint_body, 2):
        assert result["stripped"] and result["has_scores"]
        assert result["scores_equal"], "the resumed scores differ from the saved ones"
        assert result["same_run"], "the resumed run left the uninterrupted one"
        assert any("no Magma scores for" in message for message in result["warned"]), result["warned"]
        assert result["mismatch"] is not None and "block cannot change" in result["mismatch"]


class FakeDistributedOptimizer:
    """Megatron's per-shard state access: every tensor of the live state is read, and written
    from ``tensors`` (a KeyError for a live key they lack)."""

    def __init__(self, optimizer, model_param):
        self.optimizer = optimizer
        self.model_param_group_index_map = {model_param: (0, 0)}

    def _main(self, model_param):
        group, order = self.model_param_group_index_map[model_param]
        return self.optimizer.param_groups[group]["params"][order]

    def _get_main_param_and_optimizer_states(self, model_param):
        main = self._main(model_param)
        live = self.optimizer.state[main]
        return {"param": main, **{k: v for k, v in live.items() if isinstance(v, torch.Tensor)}}

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        main = self._main(model_param)
        live = self.optimizer.state[main]
        destinations = {"param": main, **{k: v for k, v in live.items() if isinstance(v, torch.Tensor)}}
        with torch.no_grad():
            for key, destination in destinations.items():
                destination.copy_(tensors[key])


class Filtered(ShardStateFilter, FakeDistributedOptimizer):
    pass


def test_shard_state_leaves_out_the_score_and_keeps_the_live_step():
    model_param = torch.nn.Parameter(torch.randn(3, 4))
    main = torch.nn.Parameter(torch.randn(12))
    optimizer = Magma([main])
    main.grad = torch.randn(12)
    optimizer.step()
    wrapper = Filtered(optimizer, model_param)
    tensors = wrapper._get_main_param_and_optimizer_states(model_param)
    assert set(tensors) == {"param", "step", "exp_avg", "exp_avg_sq"}
    score = optimizer.state[main]["magma_score"].clone()
    template_step = torch.tensor(0.0)  # what a dp_reshardable template carries
    wrapper._set_main_param_and_optimizer_states(
        model_param, {"param": torch.zeros(12), "exp_avg": torch.ones(12), "exp_avg_sq": torch.ones(12),
                      "step": template_step})
    state = optimizer.state[main]
    assert state["step"].item() == 1 and torch.equal(state["magma_score"], score)
    assert torch.equal(state["exp_avg"], torch.ones(12)) and torch.equal(main.detach(), torch.zeros(12))
    wrapper._set_main_param_and_optimizer_states(  # fully_reshardable: no step at all
        model_param, {"param": torch.ones(12), "exp_avg": torch.zeros(12), "exp_avg_sq": torch.zeros(12)})
    assert state["step"].item() == 1 and "magma_score" in state and torch.equal(main.detach(), torch.ones(12))
