# Issue 31 (moments stored in bfloat16) on a one-GPU H100, in one device call (the `device`
# tool's `run`, kind nvidia-h100-x1, with `.whl` in its carry for torchao):
#
#   bash benchmarks/bf16_device_run.sh
#
# 1. Build (benchmarks/device_setup.sh: magma_ext for sm_90; the wheels of .whl/ on PYTHONPATH).
# 2. Three pytest processes side by side on the one GPU (the tests are launch-bound, so they
#    share it well): tests/test_cuda_bf16_state.py (with -s: it prints how often the kernels'
#    and the reference's float32 and stored moments differ), tests/test_cuda_ops.py and
#    tests/test_cuda_parity.py (nothing else broke).
# 3. Then, the GPU to itself, benchmarks/step_bench.py on the Llama-1B shapes: fused AdamW, Magma
#    with float32 and with bfloat16 state, torchao's AdamW8bit / AdamWFp8 / AdamW4bit, and the
#    targets of issue 31 below the table.
# Back in $OUT/logs: build.log, gpu_tests_bf16.log, gpu_tests_ops.log, gpu_tests_parity.log,
# step_bench_bf16_<gpu>_<date>.md. About 7 minutes: build 2-3, tests 3, benchmark 2; the
# benchmark gets what is left of 460 s (--budget-s), so the whole stays under 8 minutes.
#
# torchao's wheel (3.4 MB) is fetched once per checkout into the git-ignored .whl/ (without it
# the torchao rows say "skipped"):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl torchao==0.18.0

started=$SECONDS
source benchmarks/device_setup.sh || exit 1
echo "built in $((SECONDS - started)) s"
logs="${OUT:-/tmp/out}/logs"
tag=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -dc 'A-Za-z0-9' | tr 'A-Z' 'a-z')
day=$(date -u +%Y-%m-%d)
status=0
note() { [ "$1" = 0 ] || { [ "$status" = 0 ] && status=$1; }; }

left=$((330 - (SECONDS - started)))
timeout "$left" python3 -m pytest tests/test_cuda_bf16_state.py -q -s -p no:cacheprovider \
  > "$logs/gpu_tests_bf16.log" 2>&1 &
bf16_tests=$!
timeout "$left" python3 -m pytest tests/test_cuda_ops.py -q -p no:cacheprovider > "$logs/gpu_tests_ops.log" 2>&1 &
ops_tests=$!
timeout "$left" python3 -m pytest tests/test_cuda_parity.py -q -p no:cacheprovider > "$logs/gpu_tests_parity.log" 2>&1 &
parity_tests=$!
for name in bf16:$bf16_tests ops:$ops_tests parity:$parity_tests; do
  wait "${name#*:}"
  rc=$?
  note $rc
  echo "GPU tests ${name%%:*}: exit $rc, $(tail -1 "$logs/gpu_tests_${name%%:*}.log")"
done
grep -ho "rounding agreement .*\|step after step .*\|pieces [0-9].*" "$logs/gpu_tests_bf16.log" \
  > "$logs/rounding_agreement.txt"  # -s prints them after pytest's progress dots
awk '/^rounding agreement/ {f += $(NF-6); n += $(NF-4); s += $NF}
     END {if (n) printf "one step from one state, all cases: float32 moments differ at %d of %d (%.2e), stored bf16 at %d (%.2e)\n", f, n, f / n, s, s / n}' \
  "$logs/rounding_agreement.txt"
echo "tests done at $((SECONDS - started)) s"

budget=$((460 - (SECONDS - started)))
python3 benchmarks/step_bench.py --shapes llama1b --budget-s "$budget" --max-case-s 10 \
  --out "$logs/step_bench_bf16_${tag}_${day}.md" > "$logs/step_bench.log" 2>&1
note $?
sed -n '/^| shapes/,/^Total wall time/p' "$logs/step_bench_bf16_${tag}_${day}.md" | grep -v "^[0-9]\. \|^Notes"
echo "done in $((SECONDS - started)) s"
exit $status
