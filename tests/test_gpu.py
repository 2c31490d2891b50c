"""The GPU paths, on a GPU: skipped on machines without one (CI), run by scripts/gpu_check.sh when a
GPU is at hand. They hold the CUDA-only code (bf16 autocast, FlexAttention's soft-capped kernel,
pinned prefetch, fused AdamW's found_inf skip, the datasheet peak for MFU) to the CPU reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from colossus.models.grok import flex_softcapped_attention, math_attention
from colossus.train.trainer import train
from conftest import small_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_flex_softcapped_attention_forward_and_backward_match_math_attention(kv_heads):
    """The compiled FlexAttention kernel against the written-out core, fp32 inputs, values and gradients."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = lambda heads: (2, heads, 512, 64)  # noqa: E731
    q = (torch.randn(shape(8), device="cuda", generator=g) * 3).requires_grad_()
    k, v = ((torch.randn(shape(kv_heads), device="cuda", generator=g) * 3).requires_grad_() for _ in range(2))
    grad = torch.randn(shape(8), device="cuda", generator=g)
    fused = flex_softcapped_attention(q, k, v, 30.0)
    fused_grads = torch.autograd.grad(fused, (q, k, v), grad)
    written = math_attention(q, k, v, softcap=30.0)
    written_grads = torch.autograd.grad(written, (q, k, v), grad)
    torch.testing.assert_close(fused, written, rtol=2e-3, atol=2e-3)  # TF32 may be used inside the kernel
    for ours, reference in zip(fused_grads, written_grads):
        torch.testing.assert_close(ours, reference, rtol=1e-2, atol=1e-2)


def test_flex_attention_under_the_flop_counter_counts_forward_and_backward():
    """The trainer's first step runs under FlopCounterMode: the fused kernel runs there and its
    forward and backward are counted as torch counts a fused attention kernel (4 b h s^2 d forward,
    10 backward, which recomputes the scores), the written-out core as its matmuls (4 + 8)."""
    from colossus.account.flopcount import counted_flops
    from colossus.config import ModelConfig
    from colossus.models.grok import AttentionCore

    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2, heads, 512, 64, device="cuda", generator=g).requires_grad_() for heads in (8, 2, 2))
    core = AttentionCore(ModelConfig(attn_softcap=30.0, seq_len=512))  # on a GPU at the training length: flex
    assert core.kernel_for(q) == "flex"

    def fused_step():
        core(q, k, v).square().sum().backward()

    def written_step():
        math_attention(q, k, v, softcap=30.0).square().sum().backward()

    _, fused_count = counted_flops(fused_step, core)
    _, written_count = counted_flops(written_step)
    assert fused_count == (4 + 10) * 2 * 8 * 512 * 512 * 64
    assert written_count == (4 + 8) * 2 * 8 * 512 * 512 * 64


def test_moe_trains_on_the_gpu_with_a_skipped_nan_step(tmp_path: Path, corpus_dir: Path):
    """The trainer's GPU path end to end: bf16 autocast over fp32 weights, soft-capped attention in
    FlexAttention (FLOP-counted on the first step), grouped experts, pinned prefetch, a poisoned step
    skipped inside fused AdamW, MFU against the datasheet peak, checkpoints and a resume; it learns as
    the same run on the CPU does (fp32 there: the losses differ by rounding, not by much)."""
    def config(steps: int, device: str, **sections):
        return small_config(corpus_dir, tmp_path / "cache", train={"steps": steps, "device": device, "threads": 0},
                            log={"interval": 5, "tensorboard": False}, checkpoint={"interval": 10, "keep": 2},
                            **sections)

    poisoned = dict(faults={"inject_nan_at_step": 10}, eval={"interval": 30, "sample_tokens": 16})
    summary = train(config(30, "cuda", **poisoned), tmp_path / "run")
    on_cpu = train(config(30, "cpu", **poisoned), tmp_path / "cpu")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "skipped_step"] == [10]
    assert summary["skipped_steps"] == 1 and summary["step"] == 30
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert abs(summary["val_loss"] - on_cpu["val_loss"]) < 0.2, (summary["val_loss"], on_cpu["val_loss"])
    assert all(r["mfu"] is not None and 0 < r["mfu"] < 1 for r in steps)
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert ledger["flop_counter_ratio"] == pytest.approx(1.0, abs=0.1)  # FlexAttention counted too
    resumed = train(config(40, "cuda", eval={"interval": 40, "sample_tokens": 0}), tmp_path / "run")
    assert resumed["step"] == 40 and resumed["val_loss"] < summary["val_loss"] + 0.1


def test_deterministic_resume_on_the_gpu_is_bit_identical(tmp_path: Path, corpus_dir: Path):
    """With train.deterministic, a run stopped at step 10 and resumed ends with the uninterrupted run's
    bits, as on a CPU."""
    import shutil

    def config(steps: int):
        return small_config(corpus_dir, tmp_path / "cache", train={"steps": steps, "device": "cuda", "deterministic": True},
                            log={"interval": 5, "tensorboard": False}, checkpoint={"interval": 10, "keep": 3},
                            eval={"interval": 20, "sample_tokens": 0})

    whole = train(config(20), tmp_path / "whole")
    train(config(20), tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-20")
    resumed = train(config(20), tmp_path / "resumed")  # from step 10
    assert resumed["val_loss"] == whole["val_loss"]
