# Sourced first by every command on a lent GPU machine (the `device` tool's `run`):
#
#   source benchmarks/device_setup.sh && python3 -m pytest tests/test_megatron_sparse_gather_gpu.py ...
#
# It keeps NVLink multicast off (as that machine's notes require of every process), builds and
# installs magma_ext for Hopper (or, where benchmarks/prebuild_extension.sh built it beforehand
# from the same sources and the run carried it, puts the checkout on PYTHONPATH instead), installs
# the wheels carried in .whl/ (megatron-core: that machine reaches no registry), and makes
# $OUT/logs for what should come back. The wheel is fetched once
# per checkout, here, into the git-ignored .whl/ (name .whl in the run's carry):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.2

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
mkdir -p "${OUT:-/tmp/out}/logs"
# for the scripts that source this: where logs go, today's date and the GPU's name for their
# file names, and `note $?`, which keeps the first failure's exit status in $status
logs="${OUT:-/tmp/out}/logs"
day=$(date -u +%Y-%m-%d)
gpu_tag=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -dc 'A-Za-z0-9' | tr 'A-Z' 'a-z')
status=0
note() { [ "$1" = 0 ] || { [ "$status" = 0 ] && status=$1; }; }
# The installs, once per process tree: a script started by one that sourced this skips them.
if [ -z "${MAGMA_EXT_DEVICE_BUILT:-}" ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  source benchmarks/extension_sources.sh
  if [ -f "$prebuilt_extension" ] \
      && [ "$(cat .device/extension_sources.sha1 2>/dev/null)" = "$(extension_sources_sha1)" ]; then
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # built by benchmarks/prebuild_extension.sh
    echo "magma_ext._C built beforehand, from these sources" > "$logs/build.log"
  else
    rm -f "$prebuilt_extension"
    python3 -m pip install -q --no-build-isolation --no-deps -e . > "$logs/build.log" 2>&1 \
      || { tail -30 "$logs/build.log"; return 1; }
  fi
  python3 -c 'import magma_ext, torch; print("magma_ext CUDA:", magma_ext.has_cuda_extension(), torch.cuda.device_count(), "GPUs")'
  export MAGMA_EXT_DEVICE_BUILT=1
fi
