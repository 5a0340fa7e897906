# GPU test files on one lent GPU machine, each cut into parts run side by side (the kernel tests
# are launch-bound, so several processes share one GPU well), all stopped at a deadline:
#
#   bash benchmarks/gpu_tests_device_run.sh DEADLINE_S FILE:PARTS [FILE:PARTS ...]
#   bash benchmarks/gpu_tests_device_run.sh 150 tests/test_cuda_bf16_state.py:3 tests/test_cuda_ops.py:1
#
# DEADLINE_S counts from the start, the build (benchmarks/device_setup.sh) included. Part k of a
# file takes every PARTS-th of its tests from the k-th. Back in $OUT/logs: build.log and one
# <file>_<k>.log per part (pytest -q -s: a part stopped at the deadline shows how far it got),
# and, from tests/test_cuda_bf16_state.py, rounding_agreement.txt (its printed rates, per case)
# and their sum over the cases, printed.
# The exit status is the first failing part's (124: stopped at the deadline).

source benchmarks/device_setup.sh || exit 1
echo "set up at ${SECONDS} s"
deadline=$1
shift
pids=()
for spec in "$@"; do
  file=${spec%:*}
  parts=${spec##*:}
  name=$(basename "$file" .py)
  python3 -m pytest -q -p no:cacheprovider --collect-only "$file" | grep "::" > "/tmp/$name.ids"
  for ((k = 0; k < parts; k++)); do
    mapfile -t ids < <(awk -v parts="$parts" -v k="$k" 'NR % parts == k' "/tmp/$name.ids")
    timeout $((deadline - SECONDS)) python3 -m pytest -q -s -p no:cacheprovider "${ids[@]}" \
      > "$logs/${name}_$k.log" 2>&1 &
    pids+=("${name}_$k:$!")
  done
done
for entry in "${pids[@]}"; do
  wait "${entry#*:}"
  rc=$?
  note $rc
  echo "${entry%%:*}: exit $rc, $(tail -1 "$logs/${entry%%:*}.log")"
done
cat "$logs"/test_cuda_bf16_state_*.log 2>/dev/null \
  | grep -o "rounding agreement .*\|step after step .*\|pieces [0-9].*" > "$logs/rounding_agreement.txt"
awk '/^rounding agreement/ {f += $(NF-6); n += $(NF-4); s += $NF}
     END {if (n) printf "one step from one state, all cases: float32 moments differ at %d of %d (%.2e), stored bf16 at %d (%.2e)\n", f, n, f / n, s, s / n}' \
  "$logs/rounding_agreement.txt"
echo "done at ${SECONDS} s"
exit $status
