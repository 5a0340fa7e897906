"""pytest configuration of the test suite: every test starts from the same torch seed; the
``extension_loaded`` fixture runs a test both with and without the CUDA extension; the
``multiprocess`` marker names the tests that start torch.distributed ranks on the CPU."""

from __future__ import annotations

import pytest
import torch

from magma_ext import functional


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "multiprocess: starts torch.distributed ranks on the CPU (gloo), each its own process; "
        "the slow part of the suite, which .ci/run runs once, not again with the CUDA extension (see there)",
    )


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)


@pytest.fixture(params=[False, True], ids=["no-extension", "extension-without-gpu"])
def extension_loaded(request, monkeypatch) -> bool:
    """Whether the option checks see the CUDA extension loaded (``functional.extension_loaded``),
    whatever is installed: a check that differs between a CPU-only install and one with the
    extension but no GPU is then tested in every environment."""
    monkeypatch.setattr(functional, "extension_loaded", lambda: request.param)
    return request.param
