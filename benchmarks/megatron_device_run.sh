# Issue 30 on the one-GPU machine, in one device call (the `device` tool's `run`, kind
# nvidia-h100-x1, with `.whl` in its carry: the megatron-core 0.19.2 wheel, see device_setup.sh):
#
#   bash benchmarks/megatron_device_run.sh [DEVICE_TAG]      # e.g. h100
#
# 1. The fused baseline (benchmarks/megatron_bench_fused.sh) at DP=1: Magma (keep_prob 0.5,
#    tensor blocks) against Megatron's Adam as torch.optim.AdamW(fused=True), in one process per
#    wrapper, 2 rounds each, on the 809M GPTModel of the README's tables: with the distributed
#    optimizer, then with Float16Optimizer.
#    Targets (issue 30): Magma's inner step <= 0.90x fused Adam's, whole-step tokens/s >= 0.99x.
# 2. The Megatron tests that need one GPU (tests/test_megatron_one_gpu.py: identities, resumes,
#    positional checkpoints) and the CPU ones that read megatron-core 0.19.2 itself (global
#    names on its GPTModel, the allow-lists against its configs, Megatron-LM's megatron.training).
#    The 2-GPU tests (tests/test_megatron_gpu.py, _example_gpu.py, _sparse_gather_gpu.py) skip
#    here: benchmarks/megatron_multi_gpu_device_run.sh runs them.
# Back in $OUT/logs: the two benchmark tables (.md) and logs, the tests' log, build.log.
# About 7-8 minutes on an H100: build 1.5-2, each benchmark 1.5-2.5, tests 2.5 (two waves of a
# dozen small runs); each part is cut short by a timeout so that the whole stays under 9 minutes
# (UNTIL=530 s from the start, setup included; WRAPPERS=distopt leaves the Float16Optimizer
# benchmark out). The exit status is the first failure's.

source benchmarks/device_setup.sh || exit 1
tag="${1:-$gpu_tag}"
left() { echo $((${UNTIL:-530} - SECONDS)); }  # seconds left of the whole run's budget (SECONDS: since the start)
setup_seconds=$SECONDS
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$logs/gpu.log"

echo "set up in ${setup_seconds} s"
wrappers=(${WRAPPERS:-distopt float16})
for i in "${!wrappers[@]}"; do
  wrapper=${wrappers[$i]}
  name="megatron_bench_fused_dp1_${wrapper}_${tag}_${day}"
  flags=$([ "$wrapper" = distopt ] && echo --distributed-optimizer)
  reserve=$((150 + 110 * (${#wrappers[@]} - i - 1)))  # for what follows: the tests, the other benchmarks
  budget=$(( $(left) - reserve ))
  (( budget > 180 )) && budget=180
  if (( budget < 60 )); then echo "$name not run: ${budget} s left for it"; note 1; continue; fi
  timeout "$budget" bash benchmarks/megatron_bench_fused.sh 1 "$logs/$name.md" $flags > "$logs/$name.log" 2>&1
  note $?
  echo "== $name (at ${SECONDS} s)"; tail -12 "$logs/$name.log"
done

budget=$(left)
if (( budget > 30 )); then
  timeout "$budget" python3 -m pytest tests/test_megatron_one_gpu.py tests/test_megatron_global_names.py \
    tests/test_megatron_construction.py tests/test_megatron_training.py tests/test_megatron_checkpoints.py \
    -q -p no:cacheprovider -rs > "$logs/megatron_one_gpu_tests_${tag}_${day}.log" 2>&1
  note $?
  echo "== tests (at ${SECONDS} s)"; tail -15 "$logs/megatron_one_gpu_tests_${tag}_${day}.log"
else
  echo "tests not run: ${budget} s left"; note 1
fi
exit $status
