"""Where and with what an invocation ran: the ``env`` and ``command`` of its records."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from magma_ext import has_cuda_extension

REPO = Path(__file__).resolve().parents[2]


def environment(device: torch.device) -> dict:
    """Where and with what the runs ran."""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": str(device), "device_name": device_name, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "magma_cuda_extension": has_cuda_extension(), "git_commit": commit,
    }


def command_line() -> str:
    """This process's command line, as one would type it again from the current folder."""
    program = os.path.relpath(sys.argv[0], Path.cwd())
    return "python " + " ".join(shlex.quote(a) for a in [program] + sys.argv[1:])
