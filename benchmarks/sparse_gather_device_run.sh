# The sparse parameter gather's measurements on the 2-GPU machine, in one device call
# (the `device` tool's `run`, kind nvidia-h200-x2 or nvidia-h100-x2, with `.whl` in its carry):
#
#   bash benchmarks/sparse_gather_device_run.sh [DEVICE_TAG]     # e.g. h200x2
#
# 1. the GPU tests: every route over NCCL, and the Megatron GPT runs (DP=2, distributed
#    optimizer) with the sparse gather checked bit for bit against a dense one at every step,
#    overlap_param_gather included;
# 2. the routes against a dense all-gather on the recorded 809M bucket layout;
# 3. the whole-step benchmark, dense against sparse gather, without and with
#    overlap_param_gather, at keep_prob 0.5 and 0.1 (its tables, with the parameter-sync bytes
#    and times, are what issue 12's performance targets are read from).
# Logs and tables go to $OUT/logs, named with DEVICE_TAG and today's date for
# benchmarks/results/. Each part runs even if one before it failed; the exit status is the
# first failure's.

source benchmarks/device_setup.sh || exit 1
tag="${1:-$gpu_tag}"

python3 -m pytest tests/test_sparse_gather_gpu.py tests/test_megatron_sparse_gather_gpu.py -q -s -p no:cacheprovider \
  > "$logs/sparse_gather_gpu_tests_${tag}_${day}.log" 2>&1
note $?
tail -5 "$logs/sparse_gather_gpu_tests_${tag}_${day}.log"

torchrun --nproc-per-node 2 benchmarks/sparse_gather_bench.py \
  benchmarks/results/sparse_gather_layout_809m_dp2_h200x2_2026-11-26.json \
  --keep-probs 0.5 0.1 --steps 60 --warmup 10 --chunk-mib 16 64 256 \
  --out "$logs/sparse_gather_routes_${tag}_${day}.md" > "$logs/routes.log" 2>&1
note $?
tail -3 "$logs/routes.log"

for overlap in "" "--overlap-param-gather"; do
  for keep in 0.5 0.1; do
    name="megatron_sparse_gather_keep${keep}${overlap:+_overlap}_${tag}_${day}"
    torchrun --nproc-per-node 2 benchmarks/megatron_bench.py --dp 2 --distributed-optimizer $overlap \
      --optimizer both --param-gather both --keep-prob $keep --layers 16 --hidden 2048 --heads 16 \
      --seq-len 1024 --micro-batch 4 --steps 30 --warmup-steps 10 --table "$logs/$name.md" \
      > "$logs/$name.log" 2>&1
    note $?
    tail -2 "$logs/$name.log"
  done
done
exit $status
