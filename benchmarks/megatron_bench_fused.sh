# The fused-baseline benchmark of issue 30, run by megatron_device_run.sh (one GPU) and
# megatron_multi_gpu_device_run.sh (two): benchmarks/megatron_bench.py on the 809M GPTModel of
# the README's tables (16 layers, hidden 2048, sequence 1024, bf16, 4 sequences per DP rank),
# Magma (keep_prob 0.5, tensor blocks) against Megatron's Adam as AdamW(fused=True), 2 rounds
# (the order reversed in the second), 30 steps each, timed after 10. On one GPU the weights are
# initialised on the GPU (--init gpu: the CPU initialisation of 809M parameters, once per run,
# would take much of the device call).
#
#   bash benchmarks/megatron_bench_fused.sh PROCESSES TABLE.md [layout flags...] > LOG 2>&1
#
# e.g. `1 out.md --distributed-optimizer`, `2 out.md --tp 2`.

processes="${1:?usage: megatron_bench_fused.sh PROCESSES TABLE.md [layout flags...]}"
table="${2:?usage: megatron_bench_fused.sh PROCESSES TABLE.md [layout flags...]}"
shift 2
init=$([ "$processes" = 1 ] && echo gpu || echo cpu)
exec python3 -m torch.distributed.run --nproc-per-node "$processes" benchmarks/megatron_bench.py "$@" --init "$init" \
  --optimizer both --adam-impl fused --rounds 2 --keep-prob 0.5 --block tensor --layers 16 --hidden 2048 \
  --heads 16 --seq-len 1024 --micro-batch 4 --steps 30 --warmup-steps 10 --log-every 30 --table "$table"
