"""Launching tests/megatron_gpt_runs.py under torchrun for the Megatron GPU tests: many runs at
once (the model is small), each writing its record to ``<name>.json`` and its output to
``<name>.log``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

RUNNER = Path(__file__).with_name("megatron_gpt_runs.py")


def launch(name, processes, arguments, workdir: Path, port: int):
    """Start one run: 2 processes on GPUs 0 and 1, or 1 process on GPU ``port % (GPUs)``."""
    log = open(workdir / f"{name}.log", "w")
    gpus = "0,1" if processes == 2 else str(port % max(1, torch.cuda.device_count()))
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1", "CUDA_VISIBLE_DEVICES": gpus}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
               f"--master-port={port}", str(RUNNER), *arguments, "--out", str(workdir / f"{name}.json")]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def wave(runs: dict, workdir: Path, first_port: int) -> None:
    """Start every run of ``{name: (processes, arguments)}`` at once and wait for all."""
    launched = {name: launch(name, processes, arguments, workdir, first_port + i)
                for i, (name, (processes, arguments)) in enumerate(runs.items())}
    for process in launched.values():
        process.wait(timeout=900)


def save_and_resume(first: dict, resumes: dict, workdir: Path, steps: int, half: int, first_port: int):
    """Two waves: ``first`` (``{name: (processes, arguments)}``; a name with "half" saves a
    checkpoint ``ckpt_<name>`` after its steps, a run without ``--steps`` takes ``steps``), then
    ``resumes`` (``{name: (processes, checkpoint of, format, arguments)}``, each loading that
    checkpoint and running steps ``half`` to ``steps``). Returns :func:`result` for ``workdir``."""
    launched = {}
    for name, (processes, arguments) in first.items():
        extra = ["--save", str(workdir / f"ckpt_{name}")] if "half" in name else []
        launched[name] = (processes, [*arguments, *extra, *([] if "--steps" in arguments else ["--steps", str(steps)])])
    wave(launched, workdir, first_port)
    wave({name: (processes, [*arguments, "--load", str(workdir / f"ckpt_{source}"), "--format", fmt,
                             "--first-step", str(half), "--steps", str(steps - half)])
          for name, (processes, source, fmt, arguments) in resumes.items()}, workdir, first_port + len(first))
    return partial(result, workdir)


def result(workdir: Path, name: str) -> dict:
    """A run's record, or the test fails with the end of its log."""
    path = workdir / f"{name}.json"
    if not path.exists():
        pytest.fail(f"run {name} failed:\n" + (workdir / f"{name}.log").read_text()[-6000:])
    return json.loads(path.read_text())
