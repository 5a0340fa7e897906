# Build magma_ext._C here, for the GPU machine, so a device call need not spend its first 1.5
# minutes compiling: Python 3.12, torch 2.11.0+cu130 (what that machine has), Hopper (sm_90).
#
#   bash benchmarks/prebuild_extension.sh PYTHON3.12     # a Python 3.12 with torch==2.11.0 (cu130)
#
# Such a Python, once (with nvcc 13.0 on the PATH; about 4 minutes to build on 2 cores):
#
#   python3.12 -m venv /tmp/py312 && /tmp/py312/bin/python -m pip install torch==2.11.0 numpy ninja "setuptools<82"
#
# Leaves magma_ext/_C.cpython-312-x86_64-linux-gnu.so and .device/extension_sources.sha1 (both
# git-ignored); name both in the run's carry. benchmarks/device_setup.sh uses the library only
# while the sources' hash still matches (else it builds there, as without it).

python="${1:?usage: prebuild_extension.sh PYTHON3.12}"
source "$(dirname "$0")/extension_sources.sh"
"$python" -c 'import sys, torch; assert sys.version_info[:2] == (3, 12) and torch.__version__ == "2.11.0+cu130", (sys.version, torch.__version__)' || exit 1
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} "$python" setup.py build_ext --inplace > /tmp/prebuild_extension.log 2>&1 \
  || { tail -30 /tmp/prebuild_extension.log; exit 1; }
strip --strip-debug "$prebuilt_extension"  # 41 -> 36 MB of the carry's 64 MiB
mkdir -p .device
extension_sources_sha1 > .device/extension_sources.sha1
ls -l "$prebuilt_extension" .device/extension_sources.sha1
