# Issue 30's runs that need two GPUs, for when a 2-GPU machine is lent (the `device` tool's `run`,
# kind nvidia-h100-x2 or nvidia-h200-x2, with `.whl` in its carry), in two calls:
#
#   bash benchmarks/megatron_multi_gpu_device_run.sh tests [DEVICE_TAG]   # about 8-9 minutes
#   bash benchmarks/megatron_multi_gpu_device_run.sh bench [DEVICE_TAG]   # about 6-7 minutes
#
# tests: tests/test_megatron_gpu.py: PP=2 (and PP=2 with two virtual stages, tied embeddings)
#   against PP=1 and EP=2 (four SequentialMLP experts, a second distributed-optimizer part)
#   against EP=1: identical realised masks under the same global names, losses and clipped grad
#   norms within bf16 tolerance; checkpoints saved at PP=2 resumed at PP=1 and the other way
#   (distributed optimizer, fully_reshardable; Float16 wrapper); an fp16 overflow step skipped at
#   PP=2; and the TP/DP layouts, resumes and overflow of before. Then the example's and the
#   sparse gather's 2-GPU tests, and the one-GPU tests again (on GPU 0).
# bench: the fused baseline (benchmarks/megatron_bench_fused.sh) at DP=2 (distributed optimizer)
#   and TP=2 (sequence parallel, Float16Optimizer): the 2-GPU rows of the README's table.
# Back in $OUT/logs, named with DEVICE_TAG and the date for benchmarks/results/. The exit status
# is the first failure's.

part="${1:?usage: megatron_multi_gpu_device_run.sh tests|bench [DEVICE_TAG]}"
source benchmarks/device_setup.sh || exit 1
tag="${2:-${gpu_tag}x2}"

case "$part" in
  tests)
    timeout 570 python3 -m pytest tests/test_megatron_gpu.py tests/test_megatron_example_gpu.py \
      tests/test_megatron_sparse_gather_gpu.py tests/test_megatron_one_gpu.py -q -p no:cacheprovider -rs \
      > "$logs/megatron_gpu_tests_${tag}_${day}.log" 2>&1
    note $?
    tail -25 "$logs/megatron_gpu_tests_${tag}_${day}.log"
    ;;
  bench)
    for layout in "dp2 --dp 2 --distributed-optimizer" "tp2 --tp 2"; do
      set -- $layout
      name="megatron_bench_fused_${1}_${tag}_${day}"
      shift
      timeout 280 bash benchmarks/megatron_bench_fused.sh 2 "$logs/$name.md" "$@" > "$logs/$name.log" 2>&1
      note $?
      echo "== $name"; tail -12 "$logs/$name.log"
    done
    ;;
  *) echo "unknown part $part (tests or bench)"; exit 2 ;;
esac
exit $status
