"""examples/megatron_gpt.py runs as its docstring says, on 2 GPUs with megatron-core: trained
halfway, saved, trained on; rebuilt, loaded and trained again, the resumed half repeats the
uninterrupted one. The example is run (under torchrun), not imported. Needs megatron-core
(>= 0.19) and 2 GPUs."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", minversion="0.19")  # magma_ext.megatron builds on 0.19
if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 GPUs", allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "megatron_gpt.py"
LAYOUTS = {"dp2": [], "dp2_distributed_sparse": ["--distributed-optimizer", "--sparse-param-gather"],
           "tp2": ["--tp", "2"]}
RESULT = re.compile(r"final loss (\S+) uninterrupted, (\S+) resumed; largest loss difference (\S+)")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_example_resumes_its_own_run(tmp_path, layout):
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1", "CUDA_VISIBLE_DEVICES": "0,1"}
    port = 29700 + list(LAYOUTS).index(layout)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}", str(EXAMPLE),
         *LAYOUTS[layout], "--steps", "20", "--seq-len", "128", "--micro-batch", "4",
         "--checkpoint-dir", str(tmp_path / "checkpoint")],
        capture_output=True, text=True, env=env, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    found = RESULT.search(output)
    assert found, output[-6000:]
    uninterrupted, resumed, gap = (float(x) for x in found.groups())
    assert gap <= 1e-5 * uninterrupted and abs(uninterrupted - resumed) <= gap
    assert uninterrupted < math.log(256), "20 steps should bring the loss below a uniform guess over bytes"
