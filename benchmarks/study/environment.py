"""Where, with what and on which data an invocation ran: the ``env``, ``data`` and ``command``
of its records."""

from __future__ import annotations

import hashlib
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
    script = Path(sys.argv[0])
    program = (["-m", __package__] if script.name == "__main__.py" and __package__
               else [os.path.relpath(script, Path.cwd())])
    return "python " + " ".join(shlex.quote(a) for a in program + sys.argv[1:])


def describe_data(path: str | None, train_data: torch.Tensor, val_data: torch.Tensor, max_bytes: int) -> dict:
    source = path or f"Python {platform.python_version()} standard library (*.py)"
    return {"source": source, "max_bytes": max_bytes, "train_bytes": len(train_data), "val_bytes": len(val_data),
            "val_sha1": hashlib.sha1(val_data.numpy().tobytes()).hexdigest()[:12]}
