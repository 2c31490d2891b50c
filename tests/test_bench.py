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


def test_gpu_profile_sorts_kernels_by_what_they_do():
    """Kernel names as torch.profiler reports them on a Hopper GPU go to their category; the
    element-wise kernels ATen launches eagerly are "other"."""
    kernels = {"nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT": 5.0, "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n": 4.0,
               "void cutlass::device_kernel<GroupedGemm<...>>": 3.0, "pytorch_flash::flash_bwd_dq_dk_dv_loop_kernel": 2.0,
               "triton_tem_fused_flex_attention_0": 1.5, "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": 1.0,
               "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": 0.5}
    assert BENCH.kernel_categories(kernels) == {"matmul": 12.0, "attention kernel": 3.5, "compiled kernels": 1.0,
                                                "other": 0.5}


def test_additive_mask_attention_is_bit_identical_to_masked_fill():
    """bench/attention_core.py's baseline: masking with an added -inf bias (one pass that also applies
    the cap's factor) changes no bit of the outputs or gradients, with and without the cap."""
    import importlib.util

    from colossus.models.grok import math_attention

    spec = importlib.util.spec_from_file_location("bench_attention_core", REPO / "bench" / "attention_core.py")
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(2, 4, 32, 16, generator=g) * 4).requires_grad_()
    k, v = ((torch.randn(2, 2, 32, 16, generator=g) * 4).requires_grad_() for _ in range(2))
    grad = torch.randn(2, 4, 32, 16, generator=g)
    for cap in (30.0, 1.5):
        ours, textbook = math_attention(q, k, v, cap), core.masked_fill_attention(q, k, v, cap)
        assert torch.equal(ours, textbook)
        for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(textbook, (q, k, v), grad)):
            assert torch.equal(a, b)


def test_nanogpt_peer_needs_a_checkout_and_is_fed_stdlib_bytes(tmp_path, capsys):
    """--nanogpt DIR without nanoGPT's files there skips the peer with a line naming the folder (the column
    then stays empty); its text is the stdlib's bytes, the same on every call, every token a byte."""
    assert BENCH.run_nanogpt(tmp_path, steps=2, threads=1) is None
    assert f"--nanogpt {tmp_path}: no nanoGPT checkout there" in capsys.readouterr().err
    text = BENCH.stdlib_bytes(1 << 20)
    assert len(text) == 1 << 20 and text == BENCH.stdlib_bytes(1 << 20) and b"def " in text
