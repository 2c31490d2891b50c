"""bench/throughput.py's command line and its GPU shapes (the GPU run itself needs a lent device)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from colossus import modelmath
from colossus.config import config_from_dict
from conftest import REPO
from test_memory import BENCH


def test_gpu_shapes_are_a_1b_dense_model_and_an_moe():
    dense = config_from_dict({"model": BENCH.SHAPES["dense1b"]}).model
    moe = config_from_dict({"model": BENCH.SHAPES["moe1b"]}).model
    assert 0.9e9 < modelmath.params_total(dense) < 1.1e9 and not dense.is_moe
    assert moe.is_moe and moe.attn_softcap > 0  # Grok-style: soft-capped attention, top-2 of 8 experts
    assert modelmath.params_active(moe) < 0.4 * modelmath.params_total(moe)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_cuda_without_a_gpu_is_a_one_line_error():
    run = subprocess.run([sys.executable, str(REPO / "bench" / "throughput.py"), "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "no CUDA GPU is visible" in run.stderr.splitlines()[-1]
