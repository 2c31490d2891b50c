"""Tensor parallelism (colossus.parallel.tensor) against a single process: torchrun on gloo trains
small MoE and dense models for 5 AdamW steps with tp = 2, alone and under FSDP2 over dp_shard = 2,
with and without sequence and vocabulary parallelism; losses, gradient norms, final weights and
logits must match the single-process run on the same global batch, and the full state dicts must
have the plain model's keys and shapes. The work happens in tests/tp_worker.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import REPO
from ranks import check as check_ranks, torchrun

TOL = 1e-4  # relative, per step: losses and gradient norms
WEIGHT_TOL = 1e-3  # relative norm of the difference of each weight after 5 AdamW steps


def run_worker(tmp_path: Path, nproc: int, dp: int, tp: int, cases: list[str]) -> dict:
    out, logs = tmp_path / f"tp-{dp}x{tp}.json", tmp_path / "logs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [*torchrun(nproc, logs, "--standalone"), str(REPO / "tests" / "tp_worker.py"), "--dp", str(dp),
               "--tp", str(tp), "--out", str(out), "--cases", *cases]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    check_ranks(result.returncode, result.stdout + result.stderr, logs)
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(cases)
    return results


def check(results: dict) -> None:
    for name, r in results.items():
        assert r["problems"] == [], (name, r["problems"])
        assert r["loss_rel"] < TOL and r["ce_rel"] < TOL, (name, r["ref_losses"], r["losses"])
        assert r["norm_rel"] < TOL, (name, r["ref_norms"], r["norms"])
        assert r["weight_rel"] < WEIGHT_TOL, (name, r["weight_rel"])
        assert r["logits_rel"] < TOL and r["odd_ce_rel"] < TOL, (name, r["logits_rel"], r["odd_ce_rel"])
        # Checkpoints reshard across layouts: same names and full shapes as the plain model's.
        assert r["model_keys_match"] and r["optim_keys_match"] and r["full_tensors"], name


def test_tensor_parallel_matches_single_process(tmp_path: Path) -> None:
    """tp = 2: Megatron TP alone, then with sequence and vocabulary parallelism, MoE and dense."""
    check(run_worker(tmp_path, 2, dp=1, tp=2, cases=["moe", "dense", "moe-sp-vp", "dense-sp-vp"]))


def test_tensor_parallel_with_fsdp_matches_single_process(tmp_path: Path) -> None:
    """dp_shard = 2 x tp = 2: FSDP2 over the dense mesh (without tp) after TP; each dp rank takes its
    contiguous half of the global batch, the single process averages the two halves' losses."""
    check(run_worker(tmp_path, 4, dp=2, tp=2, cases=["moe-sp-vp", "dense-sp-vp", "moe"]))
