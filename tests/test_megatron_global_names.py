"""Megatron parameters' global names (magma_ext.megatron.global_names): the identity their masks
are drawn with is the name in the unsplit model, whatever the pipeline, virtual-pipeline and
expert-parallel split. On stand-in module trees always; on megatron-core's own GPTModel, built
on 4 CPU ranks (gloo) in eight layouts, where megatron-core is installed."""

from __future__ import annotations

import pytest
import torch

from magma_ext import name_index
from magma_ext.megatron.global_names import global_name, global_parameter_names

LAYERS = {"module.decoder.layers.0": 2, "module.decoder.layers.1": 3}  # stage 2 of 2, two layers each
EXPERTS = {"module.decoder.layers.1.mlp": [4, 5, 6, 7]}  # EP rank 1 of 2, eight experts


@pytest.mark.parametrize("local, shared, expected", [
    ("module.decoder.layers.0.self_attention.linear_qkv.weight", False, "decoder.layers.2.self_attention.linear_qkv.weight"),
    ("module.decoder.layers.1.input_layernorm.bias", False, "decoder.layers.3.input_layernorm.bias"),
    ("module.decoder.final_layernorm.weight", False, "decoder.final_layernorm.weight"),
    ("module.decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight", False,
     "decoder.layers.3.mlp.experts.local_experts.6.linear_fc1.weight"),
    ("module.decoder.layers.1.mlp.experts.linear_fc2.weight3", False, "decoder.layers.3.mlp.experts.linear_fc2.weight7"),
    ("module.decoder.layers.1.mlp.experts.linear_fc1.bias0", False, "decoder.layers.3.mlp.experts.linear_fc1.bias4"),
    ("module.decoder.layers.1.mlp.router.weight", False, "decoder.layers.3.mlp.router.weight"),
    ("module.decoder.layers.1.mlp.shared_experts.linear_fc1.weight", False,
     "decoder.layers.3.mlp.shared_experts.linear_fc1.weight"),
    ("module.output_layer.weight", True, "embedding.word_embeddings.weight"),  # the tied copy
    ("module.output_layer.weight", False, "output_layer.weight"),  # an untied output layer
])
def test_local_names_become_the_unsplit_models(local, shared, expected):
    assert global_name(local, LAYERS, EXPERTS, shared) == expected


@pytest.mark.parametrize("local, error", [
    ("module.decoder.layers.1.mlp.experts.weight1", "all 4 experts of this rank"),  # legacy GroupedMLP
    ("module.decoder.layers.1.mlp.experts.linear_fc1.weight", "moe_single_grouped_weight"),  # TE, one tensor
    ("module.decoder.layers.1.mlp.experts.local_experts.4.linear_fc1.weight", "local expert 4"),
    ("module.decoder.layers.1.mlp.experts.gate.weight", "layout magma_ext.megatron does not know"),
])
def test_expert_parameters_without_one_expert_each_are_refused(local, error):
    with pytest.raises(ValueError, match=error):
        global_name(local, LAYERS, EXPERTS)


class _Layer(torch.nn.Module):
    def __init__(self, layer_number):
        super().__init__()
        self.layer_number = layer_number
        self.linear = torch.nn.Linear(2, 2)


class _Chunk(torch.nn.Module):
    """A stand-in model chunk: layers named decoder.layers.<i> with global layer_numbers."""

    def __init__(self, numbers, tied=False):
        super().__init__()
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList(_Layer(n) for n in numbers)
        if tied:
            self.output_layer = torch.nn.Linear(2, 3, bias=False)
            self.output_layer.weight.shared_embedding = True


def test_every_chunk_is_walked_and_two_parameters_never_share_a_name():
    chunks = [_Chunk([1, 2]), _Chunk([5, 6], tied=True)]  # virtual stages 0 and 2 of one rank
    names = global_parameter_names(chunks)
    assert sorted(names.values()) == sorted(
        [f"decoder.layers.{i}.linear.{w}" for i in (0, 1, 4, 5) for w in ("weight", "bias")]
        + ["embedding.word_embeddings.weight"])
    with pytest.raises(ValueError, match="both map to the global name 'decoder.layers.0.linear.weight'"):
        global_parameter_names([_Chunk([1]), _Chunk([1])])


def test_name_indices_of_global_names_are_the_unsplit_models():
    """What the wrapper declares: a stage-local parameter draws with its unsplit name's index."""
    local = global_name("module.decoder.layers.0.mlp.linear_fc1.weight", LAYERS, EXPERTS)
    assert name_index(local) == name_index("decoder.layers.2.mlp.linear_fc1.weight") >= 2**32


def test_megatron_gpt_layouts_give_every_parameter_its_unsplit_name():
    pytest.importorskip("megatron.core")
    import megatron_model_cases as cases
    from distributed_helpers import run_ranks

    results = run_ranks(4, cases.global_names_body, list(cases.LAYOUTS), timeout=600)
    held, expert_flags = {}, {}
    for layout in cases.LAYOUTS:
        merged = {}
        for result in results:
            for name, (shape, expert, _) in result[layout].items():
                assert merged.setdefault(name, shape) == shape, f"{layout}: {name}"
                expert_flags.setdefault(layout, {})[name] = expert
        held[layout] = merged
    dense, moe = held["pp1"], held["moe_ep1"]
    assert "output_layer.weight" not in dense and "embedding.word_embeddings.weight" in dense  # tied at PP=1
    experts = {name for name in moe if ".mlp.experts.local_experts." in name}
    assert len(experts) == cases.LAYERS * cases.EXPERTS * 4  # fc1, fc2, weight and bias, per expert
    for layout, (pp, vpp, ep, is_moe) in cases.LAYOUTS.items():
        assert held[layout] == (moe if is_moe else dense), f"{layout}: other global names than the unsplit model's"
        # Megatron puts experts in the expert-parallel optimizer only at EP > 1 (allreduce=False)
        assert {n for n, e in expert_flags[layout].items() if e} == (experts if ep > 1 else set()), layout
    last_stage = results[-1]["pp2"]  # holds the tied copy of the embedding, under the embedding's name
    assert last_stage["embedding.word_embeddings.weight"][2] == "output_layer.weight"
    rank1 = results[1]["moe_ep2"]  # EP rank 1 holds experts 2 and 3 as its local experts 0 and 1
    assert rank1["decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight"][2] == (
        "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight")
