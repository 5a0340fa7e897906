"""Build script for magma_ext.

Package metadata lives in pyproject.toml; this file only decides whether to build the CUDA
extension `magma_ext._C` and how. It is built when
torch is importable and is a CUDA build (torch.version.cuda is not None) and nvcc is found
(torch.utils.cpp_extension.CUDA_HOME); otherwise the pure-Python package is installed and the
optimizer runs its PyTorch path (it warns when it meets CUDA parameters).

Where nvcc and a CUDA torch are found but the extension cannot be built, or would not load, the
build fails with one message naming the two ways on (build against the installed torch with
`pip install --no-build-isolation .`, or install without the extension with MAGMA_EXT_NO_CUDA=1)
rather than install a package that is silently 4x slower: pip shows a successful build's output
only with -v, so a fallback's printed reason would go unseen. That is the case when

  * nvcc's CUDA major version differs from torch's,
  * pip builds in an isolated environment whose torch differs from the one installed where the
    package goes (the extension, built against the first, would not load beside the second),
  * compiling fails.

The C++ standard is left to torch's BuildExtension, which adds the one its headers need (C++17 in
torch 2.11, C++20 in 2.13) when the flags name none.

Environment variables:
  MAGMA_EXT_NO_CUDA=1      never build the extension.
  MAGMA_EXT_FORCE_CUDA=1   build it or fail, saying why.
  TORCH_CUDA_ARCH_LIST     e.g. "9.0" or "8.0;9.0+PTX"; default: the visible GPUs, else "8.0;9.0".
  MAX_JOBS                 parallel compile jobs (read by torch's ninja build).
  CUDA_HOME                the CUDA toolkit to use (read by torch).
"""

import glob
import json
import os
import re
import shutil
import site
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSION_NAME = "magma_ext._C"
DEFAULT_ARCH_LIST = "8.0;9.0"

# Headers our kernels (curand_kernel.h) and ATen's CUDA headers (the rest) include. Some
# toolkits ship without them (here: no cuRAND, cuBLAS or cuSPARSE headers); the `nvidia`
# wheels that a CUDA build of torch depends on carry them.
TOOLKIT_HEADERS = ("curand_kernel.h", "cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")

# numerics must match the reference: no --use_fast_math or other math-changing flags. No -std
# either: torch's BuildExtension adds the standard its headers need when none is given.
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]

WAYS_ON = (
    "To build the extension against the torch installed in your environment:\n"
    "    pip install setuptools wheel ninja && pip install --no-build-isolation .\n"
    "To install without it (the pure-PyTorch optimizer, about 4x slower on GPUs):\n"
    "    MAGMA_EXT_NO_CUDA=1 pip install ."
)


def _env_flag(name):
    """True when an environment variable is set to something other than "", "0" or "false"."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _sources():
    """csrc/*.cpp and csrc/*.cu, as paths relative to this file (setuptools wants them so)."""
    found = glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "*.cu"))
    return sorted(os.path.relpath(path, ROOT) for path in found)


def _nvcc_major(cuda_home):
    """The CUDA major version that cuda_home's nvcc reports, or None if it cannot be run."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


def _is_cuda_toolkit(path):
    """True when path holds a CUDA toolkit: bin/nvcc and include/cuda_runtime.h."""
    return (os.path.exists(os.path.join(path, "bin", "nvcc"))
            and os.path.exists(os.path.join(path, "include", "cuda_runtime.h")))


def _ensure_cuda_home():
    """Set CUDA_HOME to a real toolkit when the user has not, before torch guesses it.

    torch takes the parent of `which nvcc`; where nvcc is a wrapper script (here
    /usr/local/bin/nvcc) that gives /usr/local, which has neither the headers nor libcudart.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates += [os.path.dirname(os.path.dirname(path)) for path in (nvcc, os.path.realpath(nvcc))]
    candidates.append("/usr/local/cuda")
    for candidate in candidates:
        if _is_cuda_toolkit(candidate):
            os.environ["CUDA_HOME"] = candidate
            return


def _why_no_cuda_build():
    """None when the CUDA extension can be built here, else a short reason why not."""
    _ensure_cuda_home()  # before torch.utils.cpp_extension reads it at import
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return "torch is not importable: install it first, then build with --no-build-isolation"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return "nvcc not found (set CUDA_HOME)"
    if not _sources():
        return "no sources in csrc/"
    return None


def _why_cuda_build_fails():
    """None when the extension, once compiled, will load beside the installed torch; else why not.

    Asked only where _why_no_cuda_build found a CUDA torch and nvcc.
    """
    import torch
    from torch.utils import cpp_extension

    nvcc_major = _nvcc_major(cpp_extension.CUDA_HOME)
    torch_major = int(torch.version.cuda.split(".")[0])
    if nvcc_major != torch_major:
        return (f"nvcc in {cpp_extension.CUDA_HOME} is CUDA {nvcc_major} but torch {torch.__version__} "
                f"was built with CUDA {torch.version.cuda}; set CUDA_HOME to a CUDA {torch_major} "
                f"toolkit, or install a torch built for CUDA {nvcc_major}")
    build_site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    return torch_mismatch(build_site, _torch_version(), _target_environment())


def _torch_version():
    """The installed distribution's version of the torch being imported, e.g. "2.11.0"."""
    from importlib import metadata

    return metadata.version("torch")


# Run with `python -I`: without the PYTHONPATH through which pip's isolated build environment
# reaches its own packages, the interpreter sees the environment the package is installed into.
_TARGET_ENVIRONMENT_SCRIPT = """
import importlib.metadata as metadata, json, sys
try:
    version = metadata.version("torch")
except metadata.PackageNotFoundError:
    version = None
print(json.dumps({"path": sys.path, "torch": version}))
"""


def _target_environment():
    """{"path": sys.path, "torch": its torch version or None} of the environment installed into.

    None when that interpreter cannot be asked (the check is then skipped).
    """
    try:
        out = subprocess.run([sys.executable, "-I", "-c", _TARGET_ENVIRONMENT_SCRIPT],
                             capture_output=True, text=True, check=True, timeout=60).stdout
        return json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def torch_mismatch(build_site, build_version, target):
    """Why an extension built against the torch in build_site would not load where it goes, or None.

    build_site: the site-packages directory of the torch being compiled against; build_version:
    its version; target: _target_environment(). The extension would not load when the build
    runs in an environment the target cannot see (pip's build isolation, which installs the
    newest torch for the build) and the target has a torch of another version.
    """
    if target is None or target["torch"] is None or build_site in target["path"]:
        return None
    if target["torch"] == build_version:
        return None
    return (f"pip is building in an isolated environment against torch {build_version}, but torch "
            f"{target['torch']} is installed where magma_ext goes; the extension would not load there")


def _ensure_arch_list():
    """Choose TORCH_CUDA_ARCH_LIST unless the user did: the visible GPUs, else the default.

    Without a GPU torch would otherwise compile for every architecture it knows, which is slow.
    """
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    import torch

    if torch.cuda.is_available():
        capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        arch_list = ";".join(f"{major}.{minor}" for major, minor in capabilities)
    else:
        arch_list = DEFAULT_ARCH_LIST
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list


def _package_dirs():
    """Directories where the `nvidia` wheels may be installed: beside torch, then site-packages."""
    import torch

    dirs = [os.path.dirname(os.path.dirname(torch.__file__))] + site.getsitepackages()
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return list(dict.fromkeys(dirs))


def _extra_include_dirs(toolkit_include_dirs):
    """Include directories for the TOOLKIT_HEADERS that the CUDA toolkit itself lacks."""
    extra = []
    for header in TOOLKIT_HEADERS:
        if any(os.path.exists(os.path.join(d, header)) for d in toolkit_include_dirs + extra):
            continue
        for package_dir in _package_dirs():
            # e.g. nvidia/cu13/include (CUDA 13 wheels) or nvidia/curand/include (CUDA 12 wheels)
            matches = sorted(glob.glob(os.path.join(package_dir, "nvidia", "*", "include", header)))
            if matches:
                extra.append(os.path.dirname(matches[0]))
                break
    if not any(os.path.exists(os.path.join(d, "curand_kernel.h")) for d in toolkit_include_dirs + extra):
        raise build_failure("curand_kernel.h is neither in the CUDA toolkit nor in the nvidia pip "
                            "packages; install nvidia-curand (or the toolkit's cuRAND headers)")
    return extra


def build_failure(reason):
    """The SystemExit that ends a build of the extension that cannot succeed: why, and the ways on."""
    return SystemExit(f"\nmagma_ext: cannot build the CUDA extension: {reason}\n{WAYS_ON}\n")


def explaining_failures(build_ext):
    """build_ext, whose failures to compile end in build_failure's message instead of a traceback."""

    class BuildExtensionOrSayWhy(build_ext):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # compilers and ninja fail with several exception types
                raise build_failure(f"compiling failed ({type(exc).__name__}: {exc}; the compiler's "
                                    f"errors are above)") from exc

    return BuildExtensionOrSayWhy


def compile_args():
    """extra_compile_args of the extension; they name no C++ standard (torch adds its own)."""
    return {"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)}


def _cuda_extension():
    """The CUDAExtension for magma_ext._C and the build_ext command that compiles it."""
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension, include_paths

    _ensure_arch_list()
    extension = CUDAExtension(name=EXTENSION_NAME, sources=_sources(), extra_compile_args=compile_args())
    # Appended after torch's and the toolkit's own include paths so that a header present in
    # both (cuda_runtime.h, ...) still comes from the toolkit that nvcc belongs to.
    toolkit_include_dirs = [d for d in include_paths(device_type="cuda") if os.path.isdir(d)]
    extension.include_dirs.extend(_extra_include_dirs(toolkit_include_dirs))
    return extension, explaining_failures(BuildExtension)


def _build_options():
    """setup() keyword arguments: the extension when it can (or must) be built, else none."""
    if _env_flag("MAGMA_EXT_NO_CUDA") and _env_flag("MAGMA_EXT_FORCE_CUDA"):
        raise RuntimeError("magma_ext: MAGMA_EXT_NO_CUDA and MAGMA_EXT_FORCE_CUDA are both set")
    reason = "MAGMA_EXT_NO_CUDA is set" if _env_flag("MAGMA_EXT_NO_CUDA") else _why_no_cuda_build()
    if reason is not None:
        if _env_flag("MAGMA_EXT_FORCE_CUDA"):
            raise RuntimeError(f"magma_ext: MAGMA_EXT_FORCE_CUDA is set but the CUDA extension "
                               f"cannot be built: {reason}")
        print(f"magma_ext: building without the CUDA extension ({reason}); "
              f"the pure-PyTorch optimizer will be used", file=sys.stderr)
        return {}
    failure = _why_cuda_build_fails()
    if failure is not None:
        raise build_failure(failure)
    extension, build_ext = _cuda_extension()
    return {"ext_modules": [extension], "cmdclass": {"build_ext": build_ext}}


if __name__ == "__main__":  # as pip's build backend and `python setup.py` run it; tests import it
    setup(**_build_options())
