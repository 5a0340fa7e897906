# Quick start: `make demo` and `make test`. Each sets up .venv on first use (torch, numpy,
# pytest, matplotlib, and this package installed editable) and then runs; `make test` also
# installs megatron-core (MEGATRON_SPEC), whose modules the Megatron tests build on the CPU.
#
#   TORCH_SPEC=...   the torch to install (default: plain `torch` where nvidia-smi answers,
#                    else torch==2.13.0, the CPU build)
#   PYTHON=...       the interpreter that creates .venv (default python3)
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST, MAGMA_EXT_NO_CUDA   passed on to the build (see setup.py)

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= $(shell nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
MEGATRON_SPEC ?= megatron-core==0.16.1
PIP_INSTALL = $(BIN)/python -m pip install -q

BIN := $(VENV)/bin
DEPS_STAMP := $(VENV)/.deps-installed
INSTALL_STAMP := $(VENV)/.magma_ext-installed
MEGATRON_STAMP := $(VENV)/.megatron-core-installed
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cu csrc/*.cuh csrc/*.h)

# torch's extension build looks for `ninja` on PATH; the venv's comes first.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test clean distclean

demo: $(INSTALL_STAMP)
	$(BIN)/python -m magma_ext.demo

test: $(INSTALL_STAMP) $(MEGATRON_STAMP)
	$(BIN)/python -m pytest tests -q

$(DEPS_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) "$(TORCH_SPEC)" numpy pytest matplotlib ninja "setuptools>=64" wheel
	touch $@

$(MEGATRON_STAMP): $(DEPS_STAMP)
	$(PIP_INSTALL) "$(MEGATRON_SPEC)"
	touch $@

# Reinstalled when the build inputs change, so that the CUDA extension (if built) is current.
$(INSTALL_STAMP): $(DEPS_STAMP) $(BUILD_INPUTS)
	$(PIP_INSTALL) --no-build-isolation -e .
	@$(BIN)/python -c "import magma_ext; print('magma_ext: CUDA extension', \
	'loaded' if magma_ext.has_cuda_extension() else 'not built; the pure-PyTorch optimizer is used')"
	touch $@

# Build outputs only; `make distclean` also removes .venv.
clean:
	rm -rf build dist *.egg-info magma_ext/_C*.so .pytest_cache demo_out $(INSTALL_STAMP)
	find . -path './.*' -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
