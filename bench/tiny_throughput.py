"""Tokens/s, step time and MFU of the `tiny` preset training on this machine.

usage: python bench/tiny_throughput.py [--steps N] [--warmup N] [--batch B] [--threads T] [--json]

Runs the trainer's own train_step on real stdlib batches, after warm-up, and reports the median step.
MFU uses model FLOPs (colossus.modelmath.flops_per_token) against an fp32 GEMM peak measured in the
same run, so the ratio is not thrown off by a busy machine at another time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from colossus import modelmath
from colossus.config import DataConfig, TrainConfig
from colossus.data import TokenLoader, prepare_tokens
from colossus.models.grok import build_model
from colossus.models.presets import get_preset
from colossus.train.optim import build_optimizer, build_scheduler
from colossus.plan.profile import gemm_peak_flops
from colossus.train.step import train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_cfg = get_preset("tiny")
    train_cfg = TrainConfig(global_batch=args.batch, micro_batch=args.batch)
    device = torch.device("cpu")
    data = prepare_tokens(DataConfig(), model_cfg.vocab_size, model_cfg.seq_len)
    loader = TokenLoader(data.train, model_cfg.seq_len, args.batch)
    model = build_model(model_cfg, device)
    optimizer = build_optimizer(model, train_cfg, device)
    scheduler = build_scheduler(optimizer, train_cfg)

    times = []
    for i in range(args.warmup + args.steps):
        inputs, targets = loader.next_batch()
        start = time.perf_counter()
        train_step(model, optimizer, scheduler, inputs, targets, args.batch, train_cfg.grad_clip, device, "fp32").loss.item()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = gemm_peak_flops(device, torch.float32)

    step_s = statistics.median(times)
    tokens_per_s = args.batch * model_cfg.seq_len / step_s
    flops = modelmath.flops_per_token(model_cfg)
    result = {
        "model": "tiny", "batch": args.batch, "seq_len": model_cfg.seq_len, "threads": torch.get_num_threads(),
        "step_s": step_s, "tokens_per_s": tokens_per_s, "model_flops_per_token": flops,
        "achieved_gflops": tokens_per_s * flops / 1e9, "gemm_peak_gflops": peak / 1e9,
        "cpu_mfu": tokens_per_s * flops / peak,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"command: python {' '.join(sys.argv)}")
    print(f"tiny MoE, batch {args.batch} x seq {model_cfg.seq_len}, {result['threads']} threads, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"  step time      {step_s * 1e3:8.1f} ms")
    print(f"  tokens/s       {tokens_per_s:8,.0f}")
    print(f"  model FLOP/s   {result['achieved_gflops']:8.1f} GFLOP/s ({flops / 1e6:.1f} MFLOP/token)")
    print(f"  GEMM peak      {result['gemm_peak_gflops']:8.1f} GFLOP/s (fp32 2048^3 matmul, same run)")
    print(f"  CPU MFU        {100 * result['cpu_mfu']:8.1f} %")


if __name__ == "__main__":
    main()
