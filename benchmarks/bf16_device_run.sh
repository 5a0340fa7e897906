# Issue 31 (moments stored in bfloat16) on a one-GPU H100, in one device call (the `device`
# tool's `run`, kind nvidia-h100-x1, with `.whl` in its carry for torchao):
#
#   bash benchmarks/bf16_device_run.sh [DTYPES]     # step_bench's --dtypes: float32,bfloat16 (default)
#
# 1. Build (benchmarks/device_setup.sh: magma_ext for sm_90; the wheels of .whl/ on PYTHONPATH).
# 2. benchmarks/gpu_tests_device_run.sh: six pytest processes side by side on the one GPU (the
#    tests are launch-bound, so they share it well): tests/test_cuda_bf16_state.py (it prints how
#    often the kernels' and the reference's float32 and stored moments differ),
#    tests/test_cuda_ops.py and tests/test_cuda_parity.py in three parts (nothing else broke), and
#    tests/test_param_remainders.py (master-weight remainders take the PyTorch path on CUDA).
# 3. Then, the GPU to itself, benchmarks/step_bench.py on the Llama-1B shapes: fused AdamW, Magma
#    with float32 and with bfloat16 state, torchao's AdamW8bit / AdamWFp8 / AdamW4bit, and the
#    targets of issue 31 below the table.
# Back in $OUT/logs: build.log, test_cuda_bf16_state_0.log, test_cuda_ops_0.log,
# test_cuda_parity_<k>.log, test_param_remainders_0.log, rounding_agreement.txt, step_bench_bf16_<gpu>_<date>.md. About 6 minutes: build 1.5, tests 3.5, benchmark 1-2; the tests
# stop at 300 s and the benchmark gets what is left of 400 s (--budget-s), so the whole stays
# under 7 minutes (TESTS_UNTIL=300 and BENCH_UNTIL=400 in the environment change these).
#
# torchao's wheel (3.4 MB) is fetched once per checkout into the git-ignored .whl/ (without it
# the torchao rows say "skipped"):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl torchao==0.18.0

started=$SECONDS
source benchmarks/device_setup.sh || exit 1
echo "built in $((SECONDS - started)) s"
bash benchmarks/gpu_tests_device_run.sh $((${TESTS_UNTIL:-300} - (SECONDS - started))) \
  tests/test_cuda_bf16_state.py:1 tests/test_cuda_ops.py:1 tests/test_cuda_parity.py:3 tests/test_param_remainders.py:1
note $?
echo "tests done at $((SECONDS - started)) s"

budget=$((${BENCH_UNTIL:-400} - (SECONDS - started)))
if (( budget >= 30 )); then
  python3 benchmarks/step_bench.py --shapes llama1b --dtypes "${1:-float32,bfloat16}" --budget-s "$budget" \
    --max-case-s 10 --out "$logs/step_bench_bf16_${gpu_tag}_${day}.md" > "$logs/step_bench.log" 2>&1
  note $?
  sed -n '/^| shapes/,/^Total wall time/p' "$logs/step_bench_bf16_${gpu_tag}_${day}.md" | grep -v "^[0-9]\. \|^Notes"
else
  echo "benchmark not run: ${budget} s left for it"
fi
echo "done in $((SECONDS - started)) s"
exit $status
