"""setup.py: the C++ standard torch chooses, and builds that cannot succeed ending in one message.

setup.py is imported as a module here (it calls setup() only when run as a script).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WAYS_ON = ("pip install --no-build-isolation .", "MAGMA_EXT_NO_CUDA=1 pip install .")


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("magma_ext_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the C++ standard


def test_compile_args_name_no_cpp_standard(setup_py):
    """torch's BuildExtension adds the standard its headers need only when the flags name none."""
    args = setup_py.compile_args()
    assert set(args) == {"cxx", "nvcc"}
    assert not [flag for flags in args.values() for flag in flags if flag.startswith(("-std", "/std"))]


# A module whose attribute `cplusplus` is the __cplusplus its compiler saw.
PROBE_SOURCE = """
#include <Python.h>
static struct PyModuleDef probe = {PyModuleDef_HEAD_INIT, "NAME", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit_NAME(void) {
  PyObject* module = PyModule_Create(&probe);
  if (module != nullptr) PyModule_AddIntConstant(module, "cplusplus", __cplusplus);
  return module;
}
"""

PROBE_SETUP = """
import sys
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension
setup(name="probe", script_args=["build_ext", "--inplace"], cmdclass={"build_ext": BuildExtension},
      ext_modules=[CppExtension("probe_setup", ["probe_setup.cpp"], extra_compile_args=eval(sys.argv[1]))])
"""


@pytest.fixture
def with_ninja(monkeypatch):
    """PATH with this interpreter's bin first (where pip puts ninja); skip without ninja or c++."""
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available() or shutil.which("c++") is None:
        pytest.skip("needs ninja and a C++ compiler")


def test_build_uses_the_standard_of_torchs_own_builds(setup_py, with_ninja, tmp_path):
    """A C++ file compiled with setup.py's flags through BuildExtension sees the same __cplusplus
    as one compiled by torch's JIT builder (which names the standard torch's headers need)."""
    from torch.utils.cpp_extension import load

    (tmp_path / "probe_setup.cpp").write_text(PROBE_SOURCE.replace("NAME", "probe_setup"))
    (tmp_path / "probe_jit.cpp").write_text(PROBE_SOURCE.replace("NAME", "probe_jit"))
    subprocess.run([sys.executable, "-c", PROBE_SETUP, repr(setup_py.compile_args())], cwd=tmp_path,
                   check=True, capture_output=True, timeout=300)
    built = subprocess.run([sys.executable, "-c", "import probe_setup; print(probe_setup.cplusplus)"],
                           cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    jit = load("probe_jit", [str(tmp_path / "probe_jit.cpp")], build_directory=str(tmp_path))
    assert int(built) == jit.cplusplus >= 201703


# ---------------------------------------------------------------- builds that cannot succeed


def _says_both_ways_on(message: str) -> bool:
    return all(way in message for way in WAYS_ON)


def test_build_failure_names_the_reason_and_both_ways_on(setup_py):
    failure = setup_py.build_failure("the reason")
    assert isinstance(failure, SystemExit)
    assert "magma_ext: cannot build the CUDA extension: the reason" in failure.code
    assert _says_both_ways_on(failure.code)


@pytest.mark.parametrize("error", [RuntimeError("Error compiling objects for extension"),
                                   subprocess.CalledProcessError(1, ["ninja"]), OSError("no nvcc")],
                         ids=["ninja-runtime-error", "called-process-error", "os-error"])
def test_compile_failures_end_in_one_message(setup_py, error):
    class FailingBuild:
        def build_extensions(self):
            raise error

    with pytest.raises(SystemExit) as raised:
        setup_py.explaining_failures(FailingBuild)().build_extensions()
    assert "compiling failed" in raised.value.code and str(error) in raised.value.code
    assert _says_both_ways_on(raised.value.code)
    assert raised.value.__cause__ is error


SITE = "/env/lib/python3.11/site-packages"
ISOLATED = "/tmp/pip-build-env-x/overlay/lib/python3.11/site-packages"


@pytest.mark.parametrize("build_site, target, fails", [
    (SITE, {"path": [SITE], "torch": "2.11.0"}, False),
    (ISOLATED, {"path": [SITE], "torch": None}, False),
    (ISOLATED, {"path": [SITE], "torch": "2.14.1"}, False),
    (ISOLATED, {"path": [SITE], "torch": "2.11.0"}, True),
    (ISOLATED, {"path": [SITE], "torch": "2.14.1+cu126"}, True),
    (ISOLATED, None, False),
], ids=["not-isolated", "isolated-no-torch-yet", "isolated-same-torch", "isolated-other-torch",
        "isolated-other-build", "target-unknown"])
def test_torch_mismatch(setup_py, build_site, target, fails):
    """Only an isolated build against another torch than the target's fails: its extension
    would not load there. Without torch in the target, pip installs the newest, as for the build."""
    reason = setup_py.torch_mismatch(build_site, "2.14.1", target)
    assert (reason is not None) == fails
    if fails:
        assert f"against torch 2.14.1, but torch {target['torch']} is installed" in reason


def test_target_environment_is_this_one_outside_pip(setup_py):
    """Run outside pip's isolation, the interpreter sees this torch: no mismatch."""
    target = setup_py._target_environment()
    assert target["torch"] == metadata.version("torch")
    build_site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    assert build_site in target["path"]
    assert setup_py.torch_mismatch(build_site, metadata.version("torch"), target) is None


def test_nvcc_of_another_cuda_major_fails_the_build(setup_py, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(setup_py, "_nvcc_major", lambda cuda_home: 13)
    reason = setup_py._why_cuda_build_fails()
    assert "is CUDA 13 but torch" in reason and "built with CUDA 12.8" in reason


def test_no_cuda_flag_installs_the_pure_python_package(setup_py, monkeypatch, capsys):
    monkeypatch.setenv("MAGMA_EXT_NO_CUDA", "1")
    monkeypatch.delenv("MAGMA_EXT_FORCE_CUDA", raising=False)
    assert setup_py._build_options() == {}
    assert "MAGMA_EXT_NO_CUDA is set" in capsys.readouterr().err

