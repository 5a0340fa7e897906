# Issue 28: the optimizer step of several source trees on one GPU, in one device call (the
# `device` tool's `run`, kind nvidia-h100-x1, with `.device/stepab` in its carry):
#
#   bash benchmarks/step_ab_device_run.sh
#
# .device/stepab/<tree>/ (git-ignored) holds each tree to compare, exported with
#   git archive <commit> setup.py pyproject.toml README.md MANIFEST.in csrc magma_ext \
#       benchmarks/step_bench.py tests | tar -x -C .device/stepab/<tree>
# and .device/stepab/TREES lists them in the order they take turns, e.g. "old base fix".
#
# 1. Every tree's extension is built in place, all trees at once (each: MAX_JOBS=16, sm_90).
# 2. benchmarks/step_ab.py times each tree in its own process (magma_ext._C is one module per
#    process), the trees taking turns, REPEATS rounds (default 3); each process steps fused
#    AdamW and the Magma cases on the same Llama-1B float32 parameters, taking turns step by
#    step.  benchmarks/step_ab_summary.py then writes $OUT/step_ab.md (and prints it last).
# 3. If time is left, the last tree's GPU tests (tests/test_cuda_ops.py, tests/test_cuda_parity.py)
#    run against its own build.
# Back in $OUT: step_ab.md, step_ab_raw.json, runs.log, build.log, gpu_tests.log.
# About 5-6 minutes on an H100: builds 1.5-2, nine timing processes 2.5-3, tests the rest.

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAGMA_EXT_FORCE_CUDA=1
out="${OUT:-/tmp/out}"
trees_dir=.device/stepab
raw=/tmp/step_ab_raw
repeats="${REPEATS:-3}"
started=$SECONDS
mkdir -p "$out" "$raw"
read -r -a trees < "$trees_dir/TREES" || { echo "no $trees_dir/TREES"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$out/runs.log"

for tree in "${trees[@]}"; do
  (cd "$trees_dir/$tree" && python3 setup.py build_ext --inplace > "/tmp/build_$tree.log" 2>&1) &
done
wait
for tree in "${trees[@]}"; do
  { echo "=== $tree"; tail -15 "/tmp/build_$tree.log"; } >> "$out/build.log"
  ls "$trees_dir/$tree"/magma_ext/_C*.so > /dev/null 2>&1 || { echo "build of $tree failed:"; tail -30 "/tmp/build_$tree.log"; exit 1; }
done
echo "built ${trees[*]} in $((SECONDS - started)) s"

run=0
status=0
for round in $(seq "$repeats"); do
  for tree in "${trees[@]}"; do
    if (( SECONDS - started > 420 )); then echo "time is up: round $round, $tree not run"; break 2; fi
    run=$((run + 1))
    python3 benchmarks/step_ab.py --root "$trees_dir/$tree" --label "$tree" \
      --out "$raw/$(printf %02d $run)_$tree.json" >> "$out/runs.log" 2>&1 \
      || { status=1; echo "step_ab.py failed for $tree:"; tail -20 "$out/runs.log"; }
  done
done
echo "timed $run processes in $((SECONDS - started)) s"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader >> "$out/runs.log"

left=$((560 - (SECONDS - started)))
last="${trees[-1]}"
if (( left > 60 )); then
  (cd "$trees_dir/$last" && timeout "$left" python3 -m pytest tests/test_cuda_ops.py tests/test_cuda_parity.py \
     -q -p no:cacheprovider > "$out/gpu_tests.log" 2>&1)
  rc=$?
  [ "$rc" = 0 ] || status=1
  echo "GPU tests of $last: exit $rc, $(tail -1 "$out/gpu_tests.log")"
else
  echo "GPU tests of $last not run: ${left} s left"
fi

python3 benchmarks/step_ab_summary.py "$raw"/*.json --out "$out/step_ab.md" --raw "$out/step_ab_raw.json" || status=1
exit $status
