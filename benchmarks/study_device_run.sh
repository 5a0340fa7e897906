# One device call of the convergence study on a lent GPU machine (the `device` tool's `run`;
# carry a prebuilt magma_ext/_C*.so to skip the build):
#
#   bash benchmarks/study_device_run.sh NAME BUDGET_S [convergence.py options, default --tiers 1,2]
#
# Resumes from every committed bundle under benchmarks/results/convergence2/ and from the bundles
# earlier calls left in /tmp/study on the same (still warm) machine, whose runs' checkpoints are
# there too (convergence.py's default --work-dir, /tmp/magma_ext_study); runs what is left until
# BUDGET_S seconds after this script started (the build of the first call included), stopping a
# run with a checkpoint there; copies its bundle, /tmp/study/NAME.json, to $OUT for
# benchmarks/results/convergence2/. Calls chained within the machine's idle time go on where the
# last one stopped: a run longer than one call (size L, about 17 min) ends over several calls of
# one machine, never across machines. Tiers whose sizes train on different corpora (S; M and L)
# run in separate calls. `--mode throughput --size L ...` (`--plan` prints the command) times the
# steps instead; its bundle, named throughput_*, is not resumed from.

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
started=$SECONDS
name=${1:?NAME}; budget=${2:?BUDGET_S}; shift 2
mkdir -p "${OUT:-/tmp/out}" /tmp/study
python3 -c 'import magma_ext, sys; sys.exit(0 if magma_ext.has_cuda_extension() else 1)' 2>/dev/null || \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "${OUT:-/tmp/out}/build.log" 2>&1
python3 -c 'import magma_ext; print("magma_ext CUDA extension:", magma_ext.has_cuda_extension())'
left=$((budget - (SECONDS - started)))
echo "set-up took $((SECONDS - started)) s; the runs get $left s"
resume=$(ls benchmarks/results/convergence2/*.json /tmp/study/*.json 2>/dev/null | grep -v "/throughput_" | paste -sd, -)
python3 benchmarks/convergence.py ${@:---tiers 1,2} --time-budget-s "$left" --resume "$resume" \
  --bundle "/tmp/study/$name.json" 2>&1 | grep -v ": skipped (" | tail -40
status=${PIPESTATUS[0]}
cp "/tmp/study/$name.json" "${OUT:-/tmp/out}/" 2>/dev/null
exit "$status"
