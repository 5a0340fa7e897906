"""The checkpoint mixins of magma_ext.megatron over stand-ins of Megatron's wrappers (CPU, gloo):
scores travel beside the per-tensor state, resume exactly, and the distributed optimizer's
per-shard state never carries the score, nor takes a step from the loading template."""

from __future__ import annotations

import pytest
import torch

import megatron_cases as cases
from distributed_helpers import run_ranks
from magma_ext import Magma
from magma_ext.megatron.scores import ShardStateFilter


@pytest.mark.multiprocess
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


@pytest.mark.parametrize("carrier", [torch.float32, torch.bfloat16])
def test_bfloat16_moments_keep_their_dtype_and_values_through_the_shard_state(carrier):
    """dp_reshardable saves the moments as they are (bfloat16); fully_reshardable gathers them into
    float32 buffers. Either way a bfloat16 moment comes back bit for bit and stays bfloat16."""
    model_param = torch.nn.Parameter(torch.randn(3, 4))
    main = torch.nn.Parameter(torch.randn(12))
    optimizer = Magma([main], exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16)
    main.grad = torch.randn(12)
    optimizer.step()
    wrapper = Filtered(optimizer, model_param)
    saved = {k: v.to(carrier if k.startswith("exp_avg") else v.dtype).clone()
             for k, v in wrapper._get_main_param_and_optimizer_states(model_param).items()}
    expected = {k: optimizer.state[main][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    for key in expected:
        optimizer.state[main][key].zero_()
    wrapper._set_main_param_and_optimizer_states(model_param, saved)
    for key, value in expected.items():
        assert optimizer.state[main][key].dtype == torch.bfloat16
        assert torch.equal(optimizer.state[main][key], value), key


def _named_wrapper(names, block="row"):
    """A CarriesMagmaScores wrapper over whole tensors numbered by name, as the Megatron factory
    numbers them, stepped four times."""
    from magma_ext import declare_piece, name_index
    from magma_ext.megatron.scores import CarriesMagmaScores

    class Wrapped(CarriesMagmaScores, cases.FakeFloat16Wrapper):
        pass

    params = [torch.nn.Parameter(t.clone()) for t in cases.logical_params()[:len(names)]]
    for p, name in zip(params, names):
        declare_piece(p, index=name_index(name), offset=0, shape=tuple(p.shape))
    wrapper = Wrapped(Magma(params, block=block, **cases.OPTIONS))
    for step in range(4):
        for p, g in zip(params, cases.logical_grads(step)):
            p.grad = g
        wrapper.optimizer.step()
    return params, wrapper


NAMES = ["embedding.word_embeddings.weight", "decoder.layers.0.mlp.linear_fc1.weight",
         "decoder.layers.0.mlp.linear_fc2.weight"]


def test_scores_of_older_checkpoints_keyed_by_position_load_under_names():
    from magma_ext import name_index
    from magma_ext.megatron.scores import POSITIONS_UNKNOWN, SCORES_KEY

    params, wrapper = _named_wrapper(NAMES)
    saved = wrapper.state_dict()
    assert sorted(saved[SCORES_KEY]) == sorted(name_index(n) for n in NAMES)
    positional = {**saved, SCORES_KEY: {k: saved[SCORES_KEY][name_index(n)] for k, n in enumerate(NAMES)}}

    fresh_params, fresh = _named_wrapper(NAMES)
    for p in fresh_params:
        fresh.optimizer.state[p]["magma_score"].fill_(0.5)
    fresh.legacy_tensor_indices = [name_index(n) for n in NAMES]
    fresh.load_state_dict(positional)
    for a, b in zip(params, fresh_params):
        assert torch.equal(wrapper.optimizer.state[a]["magma_score"], fresh.optimizer.state[b]["magma_score"])

    refused_params, refused = _named_wrapper(NAMES)
    before = [refused.optimizer.state[p]["exp_avg"].clone() for p in refused_params]
    refused.legacy_refusal = POSITIONS_UNKNOWN
    with pytest.raises(ValueError, match="keyed by parameter positions"):
        refused.load_state_dict(positional)
    assert all(torch.equal(b, refused.optimizer.state[p]["exp_avg"]) for b, p in zip(before, refused_params)), \
        "a refused checkpoint changed the state"
    refused.load_state_dict(saved)  # the same checkpoint keyed by names loads there


@pytest.mark.parametrize("saved, positions, refusal, expected", [
    ({2**40: "a"}, None, "no", {2**40: "a"}),  # keyed by names: nothing to map
    ({0: "a", 1: "b"}, None, None, {0: "a", 1: "b"}),  # an optimizer that numbers by position itself
    ({0: "a", 1: "b", 2**40: "c"}, [2**33, 2**34], None, {2**33: "a", 2**34: "b", 2**40: "c"}),
])
def test_positional_keys_map_by_the_positions_given(saved, positions, refusal, expected):
    from magma_ext.megatron.scores import keyed_by_names

    assert keyed_by_names(saved, positions, refusal) == expected


def test_positions_past_the_model_are_refused():
    from magma_ext.megatron.scores import keyed_by_names

    with pytest.raises(ValueError, match="position 5, but the model has 2 parameters"):
        keyed_by_names({5: "a"}, [2**33, 2**34])
