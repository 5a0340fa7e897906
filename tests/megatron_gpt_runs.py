"""One small megatron-core GPT run with Magma, for tests/test_megatron_gpu.py and
tests/test_megatron_one_gpu.py (run under torchrun).

    torchrun --nproc-per-node 2 tests/megatron_gpt_runs.py --tp 2 --steps 20 --out run.json
    torchrun --nproc-per-node 2 tests/megatron_gpt_runs.py --pp 2 --microbatches 2 --out run.json
    torchrun --nproc-per-node 2 tests/megatron_gpt_runs.py --experts 4 --ep 2 --out run.json

Logs, per step, the mean loss over the data-parallel ranks and the *realised* masks: the blocks
of every masked logical tensor whose float32 values changed in the step, gathered from all
ranks, keyed by tensor index; the masks the contract predicts for tensor blocks from each
tensor's global name; and each masked tensor index's global name. Every layout starts from the
same logical weights (drawn per global parameter name, then cut as Megatron cuts them) and
reads the same global batch, split over data-parallel ranks and micro-batches.
"""

from __future__ import annotations

import os

for _name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_name, "0" if _name == "NCCL_NVLS_ENABLE" else "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import json  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402
from functools import partial  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.distributed import finalize_model_grads  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.optimizer import OptimizerConfig  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402

from magma_ext import name_index  # noqa: E402
from magma_ext.megatron import get_megatron_magma_optimizer, magma_optimizers, param_sync_bytes  # noqa: E402
from magma_ext.megatron.global_names import global_parameter_names  # noqa: E402
from magma_ext.state import MOMENT_DTYPE_OPTIONS  # noqa: E402
from magma_ext.megatron.sparse_gather import ROUTES  # noqa: E402
from magma_ext.philox import keep_mask_numpy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from megatron_model import block_spec  # noqa: E402  (the local spec with sequence-parallel norms)
from magma_ext.megatron.scores import SCORES_KEY, gather_block_scores  # noqa: E402
from magma_ext.views import view_of  # noqa: E402

VOCAB, SEQ, GLOBAL_BATCH, SEED = 256, 32, 8, 7


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (with --experts)")
    parser.add_argument("--experts", type=int, default=None, help="MoE experts per layer (SequentialMLP)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tied", action="store_true", help="share_embeddings_and_output_weights")
    parser.add_argument("--microbatches", type=int, default=1, help="micro-batches per step and data-parallel rank")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--first-step", type=int, default=0, help="steps already taken (with --load)")
    parser.add_argument("--block", default="tensor")
    parser.add_argument("--keep-prob", type=float, default=0.5)
    parser.add_argument("--moments", choices=["float32", "bfloat16"], default="float32",
                        help="Magma's exp_avg_dtype and exp_avg_sq_dtype")
    parser.add_argument("--save", help="checkpoint directory, written after the last step")
    parser.add_argument("--load", help="checkpoint directory to resume from")
    parser.add_argument("--format", default="fully_reshardable", help="distrib_optim_sharding_type")
    parser.add_argument("--legacy-scores", action="store_true",
                        help="with --save: key the checkpoint's Magma scores by parameter position, as "
                             "magma_ext.megatron did before names keyed the tensors")
    parser.add_argument("--overflow-at", type=int, default=-1, help="make this step's gradients inf")
    parser.add_argument("--sparse-param-gather", action="store_true",
                        help="gather only kept blocks, and check each step against a dense all-gather")
    parser.add_argument("--sparse-route", choices=["auto"] + [route.replace(" ", "-") for route in ROUTES],
                        default="auto",
                        help="force one route of the sparse gather (SparseGather.route)")
    parser.add_argument("--sparse-chunk-bytes", type=int, default=None,
                        help="the packed route's bytes per rank and chunk (SparseGather.chunk_bytes)")
    parser.add_argument("--overlap-param-gather", action="store_true",
                        help="ddp_config.overlap_param_gather (and overlap_grad_reduce, so several bucket groups): "
                             "with --sparse-param-gather, a step's check runs after the next forward, the last "
                             "one after a forced sync")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.block = int(args.block) if args.block.isdigit() else args.block
    return args


def setup(args):
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp, expert_model_parallel_size=args.ep)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def logical_value(name: str, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    values = torch.randn(shape, generator=gen) * 0.02
    return values + 1.0 if name.endswith("layernorm.weight") else values


def set_logical_weights(chunks, tp_rank: int, tp_size: int) -> None:
    """Every parameter from a draw of its logical tensor keyed by its global name, then cut as
    Megatron cuts it: the same model whatever the layout."""
    for p, name in global_parameter_names(chunks).items():
        dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        shape = list(p.shape)
        if dim is not None:
            shape[dim] *= tp_size
        full = logical_value(name, shape)
        local = full if dim is None else full.chunk(tp_size, dim=dim)[tp_rank]
        with torch.no_grad():
            p.copy_(local.to(p.dtype))


def build_chunks(args, config):
    """One GPTModel per virtual pipeline stage of this rank (one without --vpp)."""
    chunks = []
    for stage in range(args.vpp or 1):
        where = dict(ignore_virtual=False, vp_stage=stage) if args.vpp else {}
        extra = dict(vp_stage=stage) if args.vpp else {}
        chunks.append(GPTModel(
            config=config, transformer_layer_spec=block_spec(config, extra.get("vp_stage")),
            vocab_size=VOCAB, max_sequence_length=SEQ, pre_process=parallel_state.is_pipeline_first_stage(**where),
            post_process=parallel_state.is_pipeline_last_stage(**where),
            share_embeddings_and_output_weights=args.tied, **extra).cuda())
    return chunks


def build(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    moe = dict(num_moe_experts=args.experts, expert_model_parallel_size=args.ep, moe_grouped_gemm=False,
               moe_router_topk=2, moe_token_dispatcher_type="alltoall") if args.experts else {}
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=args.dtype == "bf16", fp16=args.dtype == "fp16",
        params_dtype=dtype, pipeline_dtype=dtype, tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp, virtual_pipeline_model_parallel_size=args.vpp,
        sequence_parallel=args.tp > 1, **moe,
    )
    gpts = build_chunks(args, config)
    models = [Float16Module(config, gpt) if dtype != torch.float32 else gpt for gpt in gpts]
    set_logical_weights(models, parallel_state.get_tensor_model_parallel_rank(), args.tp)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_param_gather,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.distributed_optimizer, bucket_size=20000)
    ddps = [DistributedDataParallel(config=config, module=model, ddp_config=ddp_config, disable_bucketing=i > 0)
            for i, model in enumerate(models)]
    opt_config = OptimizerConfig(
        optimizer="adam", lr=3e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
        bf16=args.dtype == "bf16", fp16=args.dtype == "fp16", params_dtype=dtype, clip_grad=1.0,
        use_distributed_optimizer=args.distributed_optimizer, initial_loss_scale=2.0**12,
    )
    moments = getattr(torch, args.moments)
    optimizer = get_megatron_magma_optimizer(opt_config, ddps, keep_prob=args.keep_prob, block=args.block, seed=SEED,
                                             sparse_param_gather=args.sparse_param_gather,
                                             **dict.fromkeys(MOMENT_DTYPE_OPTIONS.values(), moments))
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    return gpts, ddps, optimizer


def batches(step: int, microbatches: int) -> list:
    """This data-parallel rank's share of the global batch of ``step`` (the same on every layout),
    as ``microbatches`` (inputs, labels) pairs."""
    gen = torch.Generator().manual_seed(10_000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    rows = tokens.chunk(dp_size)[dp_rank].cuda()
    return [(part[:, :-1].contiguous(), part[:, 1:].contiguous()) for part in rows.chunk(microbatches)]


def forward_step(step, overflow, data_iterator, model):
    inputs, labels = next(data_iterator)
    positions = torch.arange(SEQ, device=inputs.device).unsqueeze(0).expand_as(inputs)
    mask = torch.tril(torch.ones((1, 1, SEQ, SEQ), device=inputs.device)) < 0.5
    output = model(inputs, positions, mask, labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        if overflow:
            loss = loss * float("inf")
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def masked_tensors(optimizer) -> list:
    """(Magma, tensor) of every masked tensor over the optimizer's parts (dense and experts)."""
    return [(magma, p) for magma in magma_optimizers(optimizer) for g in magma.param_groups
            if g.get("optimizer") == "magma" for p in g["params"]]


def gathered(local: dict) -> dict:
    """``{key: set}`` merged over every rank."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        for key, values in part.items():
            merged.setdefault(key, set()).update(values)
    return merged


def realised_masks(tensors, before) -> dict[str, list[int]]:
    """Blocks of each masked logical tensor whose values changed, gathered from every rank."""
    changed: dict[int, set[int]] = {}
    for (magma, p), old in zip(tensors, before):
        group = next(g for g in magma.param_groups if any(q is p for q in g["params"]))
        state = magma.state[p]
        layout = view_of(p, state["magma_tensor_index"], group["block"], "").layout(group["block"])
        moved = (p.detach().reshape(-1) != old).cpu()
        blocks, start = changed.setdefault(state["magma_tensor_index"], set()), 0
        for k, length in enumerate(layout.lengths()):
            if moved[start:start + length].any():
                blocks.add(layout.first_block + k)
            start += length
    return {str(index): sorted(blocks) for index, blocks in sorted(gathered(changed).items())}


def predicted_masks(indices: list[int], step: int, keep_prob: float) -> dict[str, list[int]]:
    """What the contract draws at ``step`` (1-based) for one-block (tensor) masks: [0] if kept."""
    return {str(i): [0] if bool(keep_mask_numpy(SEED, i, 0, step, keep_prob)) else [] for i in sorted(indices)}


def masked_names(chunks, tensors) -> dict[str, str]:
    """Each masked tensor index's global name, over every rank."""
    names = global_parameter_names(chunks)
    local = {name_index(n): {n} for n in names.values()}
    held = {magma.state[p]["magma_tensor_index"] for magma, p in tensors}
    merged = gathered({i: local[i] for i in held if i in local})
    return {str(i): sorted(n)[0] for i, n in sorted(merged.items())}


def sparse_sync_is_dense(optimizer) -> bool:
    """Every bucket holds, on every rank, exactly what a dense all-gather of the shards gives."""
    gather = optimizer.chained_optimizers[0].sparse_gather
    same = True
    for bucket in gather.buckets:
        shard = bucket.param_data.numel() // gather.size
        dense = torch.empty_like(bucket.param_data)
        local = bucket.param_data.view(-1)[gather.rank * shard:(gather.rank + 1) * shard].clone()
        dist.all_gather_into_tensor(dense, local, group=gather.group)
        bits = torch.int16 if dense.element_size() == 2 else torch.int32  # compare bits, not values
        same &= torch.equal(dense.view(bits), bucket.param_data.view(bits))
    flag = torch.tensor([int(same)], device="cuda")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def shard_cuts_a_block(optimizer) -> bool:
    """Whether some block of a masked tensor straddles a shard boundary."""
    gather = optimizer.chained_optimizers[0].sparse_gather
    for bucket in gather.buckets:
        shard = bucket.param_data.numel() // gather.size
        for t in bucket.tensors:
            begin = t.start
            for length in t.layout.lengths():
                if begin // shard != (begin + length - 1) // shard:
                    return True
                begin += length
    return False


def shard_boundaries(optimizer) -> list[str]:
    """Where each bucket's inner shard boundaries fall (the tensor around each, for a failing
    coverage check)."""
    gather = optimizer.chained_optimizers[0].sparse_gather
    out = []
    for b, bucket in enumerate(gather.buckets):
        shard = bucket.param_data.numel() // gather.size
        for cut in range(shard, bucket.param_data.numel(), shard):
            around = [f"tensor {t.index} [{t.start}, {t.start + t.layout.numel}) block {t.layout.block_size} "
                      f"offset {t.layout.offset} rule {t.rule}"
                      for t in bucket.tensors if t.start <= cut < t.start + t.layout.numel]
            out.append(f"bucket {b} ({bucket.param_data.numel()} elements), boundary {cut}: {around or 'padding'}")
    return out


def everything(optimizer, chunks) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for chunk in chunks for p in chunk.parameters()]
    for magma in magma_optimizers(optimizer):
        for g in magma.param_groups:
            for p in g["params"]:
                tensors.append(p.detach().clone())
                tensors += [v.detach().clone() for v in magma.state[p].values() if isinstance(v, torch.Tensor)]
    return tensors


def checkpoint_state(gpts, optimizer, fmt, is_loading):
    """As Megatron-LM's generate_state_dict: the model (one entry per chunk under VPP), then the
    optimizer's sharded state over it."""
    state = ({"model": gpts[0].sharded_state_dict()} if len(gpts) == 1
             else {f"model{i}": gpt.sharded_state_dict() for i, gpt in enumerate(gpts)})
    metadata = {"distrib_optim_sharding_type": fmt}
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


def key_scores_by_position(state, chunks) -> None:
    """Rewrite every "magma_scores" entry of a checkpoint state to the keys magma_ext.megatron
    used before names: positions in the first chunk's named_parameters()."""
    position_of = {name_index(n): k for k, n in enumerate(global_parameter_names(chunks[:1]).values())}
    if isinstance(state, dict):  # (fully_reshardable keeps the entry a plain dict; dp_reshardable wraps it)
        for key, value in state.items():
            if key == SCORES_KEY and isinstance(value, dict):
                state[key] = {position_of[index]: entry for index, entry in value.items()}
            else:
                key_scores_by_position(value, chunks)


def main():
    args = parse_args()
    setup(args)
    gpts, ddps, optimizer = build(args)
    if args.load:
        loaded = dist_checkpointing.load(checkpoint_state(gpts, optimizer, args.format, True), args.load)
        for i, gpt in enumerate(gpts):
            gpt.load_state_dict(loaded["model" if len(gpts) == 1 else f"model{i}"])
        optimizer.load_state_dict(loaded["optimizer"])
    tensors = masked_tensors(optimizer)
    record = dict(losses=[], masks=[], predicted=[], ok=[], grad_norms=[], unchanged_when_skipped=[], sparse_is_dense=[],
                  sync_bytes=[], parts=[type(part).__name__ for part in optimizer.chained_optimizers])
    if args.sparse_param_gather:
        record["shard_cuts_a_block"] = shard_cuts_a_block(optimizer)
        record["shard_boundaries"] = shard_boundaries(optimizer)
        gather = optimizer.chained_optimizers[0].sparse_gather
        gather.route = args.sparse_route.replace("-", " ")
        if args.sparse_chunk_bytes is not None:
            gather.chunk_bytes = args.sparse_chunk_bytes
    forward_backward = get_forward_backward_func()

    def check_sync():  # the buckets against a dense gather, and what the last sync moved
        record["sparse_is_dense"].append(sparse_sync_is_dense(optimizer))
        traffic = param_sync_bytes(optimizer)
        record["sync_bytes"].append([traffic.sent, traffic.received, traffic.dense_sent, traffic.dense_received])

    overlapped = args.sparse_param_gather and args.overlap_param_gather
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    for step in range(args.first_step, args.first_step + args.steps):
        for ddp in ddps:
            ddp.zero_grad_buffer()
        optimizer.zero_grad()
        overflow = step == args.overflow_at
        data = batches(step, args.microbatches)
        iterators = [iter(data) for _ in ddps]
        losses = forward_backward(
            forward_step_func=partial(forward_step, step, overflow),
            data_iterator=iterators if len(ddps) > 1 else iterators[0], model=ddps,
            num_microbatches=args.microbatches, seq_length=SEQ, micro_batch_size=data[0][0].shape[0],
            forward_only=False)
        if overlapped and step > args.first_step:  # the previous step's gathers ran in this forward
            check_sync()
        before = [p.detach().reshape(-1).clone() for _, p in tensors]
        snapshot = everything(optimizer, ddps) if overflow else None
        ok, grad_norm, _ = optimizer.step()
        if overflow:
            same = all(torch.equal(a, b) for a, b in zip(snapshot, everything(optimizer, ddps)))
            flag = torch.tensor([int(same)], device="cuda")
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            record["unchanged_when_skipped"].append(bool(flag.item()))
        loss = torch.zeros((), device="cuda")
        if last_stage and losses:
            loss = torch.stack([item["lm loss"] for item in losses]).mean()
        dist.all_reduce(loss)  # the last stage's ranks hold it, once per TP rank and DP rank
        record["losses"].append(loss.item() / (parallel_state.get_data_parallel_world_size() * args.tp))
        record["ok"].append(bool(ok))
        record["grad_norms"].append(None if grad_norm is None else float(grad_norm))
        record["masks"].append(realised_masks(tensors, before))
        taken = args.first_step + sum(record["ok"])  # Magma's step count: skipped steps do not count
        held = [int(i) for i in record["masks"][-1]]
        record["predicted"].append(predicted_masks(held, taken, args.keep_prob) if ok else {str(i): [] for i in held})
        if args.sparse_param_gather and not overlapped:
            check_sync()
    if overlapped:
        for ddp in ddps:
            ddp.start_param_sync(force_sync=True)  # as disable_forward_pre_hook does, before evaluation
        check_sync()
    record["names"] = masked_names(ddps, tensors)
    record["scores"] = {}
    record["moment_dtypes"] = sorted({str(value.dtype) for magma in magma_optimizers(optimizer)
                                      for state in magma.state.values() for key, value in state.items()
                                      if key in MOMENT_DTYPE_OPTIONS})
    for magma in magma_optimizers(optimizer):
        record["scores"].update({str(i): e["scores"].tolist() for i, e in gather_block_scores(magma).items()})
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        dist.barrier()
        state = checkpoint_state(gpts, optimizer, args.format, False)
        if args.legacy_scores:
            key_scores_by_position(state, ddps)
        dist_checkpointing.save(state, args.save)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
