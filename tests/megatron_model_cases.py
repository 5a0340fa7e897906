"""megatron-core's own GPTModel built on CPU ranks (gloo) under pipeline, virtual-pipeline and
expert parallelism, for tests/test_megatron_global_names.py: what each rank holds, by global name.

megatron-core builds these modules on the CPU (``use_cpu_initialization``) but moves a tied
output layer's weight to CUDA to all-reduce it across the first and last stages; on a CPU-only
torch that move is made a no-op here (a test-only stand-in: gloo reduces CPU tensors).
"""

from __future__ import annotations

import torch

VOCAB, SEQ, LAYERS, EXPERTS = 64, 8, 4, 4

# name: (pipeline, virtual pipeline, expert parallel, MoE?)
LAYOUTS = {
    "pp1": (1, None, 1, False),
    "pp2": (2, None, 1, False),
    "pp4": (4, None, 1, False),
    "pp2_vpp2": (2, 2, 1, False),
    "moe_ep1": (1, None, 1, True),
    "moe_ep2": (1, None, 2, True),
    "moe_ep4": (1, None, 4, True),
    "moe_pp2_ep2": (2, None, 2, True),
}


def _chunks(pp: int, vpp, ep: int, moe: bool) -> list:
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, use_cpu_initialization=True,
        pipeline_dtype=torch.float32, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        num_moe_experts=EXPERTS if moe else None, expert_model_parallel_size=ep, moe_grouped_gemm=False,
        moe_ffn_hidden_size=32 if moe else None)
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS if moe else None, moe_grouped_gemm=False)
    chunks = []
    for stage in range(vpp or 1):
        where = dict(ignore_virtual=False, vp_stage=stage) if vpp else {}
        extra = dict(vp_stage=stage) if vpp else {}
        chunks.append(GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                               pre_process=ps.is_pipeline_first_stage(**where),
                               post_process=ps.is_pipeline_last_stage(**where),
                               share_embeddings_and_output_weights=True, **extra))
    return chunks


def global_names_body(rank: int, layouts: list[str]) -> dict:
    """Per layout, this rank's ``{global name: (shape, expert parameter?)}`` over its model
    chunks, and the local names it came from."""
    from megatron.core import parallel_state as ps

    from magma_ext.megatron.global_names import global_parameter_names

    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # see the module's description
    out = {}
    for name in layouts:
        pp, vpp, ep, moe = LAYOUTS[name]
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=pp,
                                     virtual_pipeline_model_parallel_size=vpp, expert_model_parallel_size=ep)
        torch.manual_seed(0)
        chunks = _chunks(pp, vpp, ep, moe)
        names = global_parameter_names(chunks)
        local = {p: n for chunk in chunks for n, p in chunk.named_parameters()}
        out[name] = {names[p]: (tuple(p.shape), not getattr(p, "allreduce", True), local[p]) for p in names}
        ps.destroy_model_parallel()
    return out
