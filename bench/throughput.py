"""Trainer throughput side by side: our eager reference and our optimised step, per model shape, with
CPU MFU against a GEMM peak measured in the same run (and, with --peer, torchtitan's own trainer).

usage: python bench/throughput.py [--shapes nanogpt,titan,tiny,dense100m] [--steps N] [--threads T] [--peer] [--json]

Each (shape, mode) runs in a fresh process: the real training step of colossus.train.trainer
(train_step: forward, backward, clipping, AdamW, schedule) on random tokens, 3 warm-up steps (compile
happens there), then the median of N timed steps; peak memory is the process's maximum RSS.
Modes: "eager" (no compile: the plain reference) and "compiled" (train.compile: each block through
torch.compile's inductor). MFU counts model FLOPs (6 N_active + 12 L H Q T, colossus.modelmath).
Reference figures of the peers on this machine (issue 8): nanoGPT at its shape 3,700 tokens/s;
torchtitan's debug model 1,717 tokens/s without activation checkpointing.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # nanoGPT's shape as our dense pre-norm GELU model (MHA, 4h MLP, tied, SDPA: no soft-cap, no scaling)
    "nanogpt": dict(name="nanogpt", n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, head_dim=64, ffn_dim=1024,
                    ffn_type="gelu", n_experts=1, top_k=1, vocab_size=256, seq_len=256, norm="pre", attn_softcap=0.0,
                    embedding_multiplier=1.0, output_multiplier=1.0),
    # torchtitan's llama3 debug model: SwiGLU 768, 16 heads of 16, vocab 2048, untied (6,163,712 parameters)
    "titan": dict(name="titan", n_layers=6, d_model=256, n_heads=16, n_kv_heads=16, head_dim=16, ffn_dim=768,
                  ffn_type="swiglu", n_experts=1, top_k=1, vocab_size=2048, seq_len=256, norm="pre", attn_softcap=0.0,
                  tie_embeddings=False, embedding_multiplier=1.0, output_multiplier=1.0),
    # our default MoE as trained by `colossus train`
    "tiny": dict(preset="tiny"),
    # a ~100M-parameter dense model (85M in the blocks)
    "dense100m": dict(name="dense100m", n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, head_dim=64, ffn_dim=3072,
                      ffn_type="gelu", n_experts=1, top_k=1, vocab_size=256, seq_len=256, norm="pre", attn_softcap=0.0,
                      embedding_multiplier=1.0, output_multiplier=1.0),
}
BATCH = 8
PEER_TOKENS_PER_S = {"nanogpt": 3700.0, "titan": 1717.0}  # measured on this machine (issue 8)


def worker(shape: str, mode: str, steps: int, threads: int) -> dict:
    import torch

    from colossus import modelmath
    from colossus.config import ParallelConfig, TrainConfig, config_from_dict
    from colossus.models.grok import build_model
    from colossus.parallel.layout import resolve_layout
    from colossus.parallel.parallelize import parallelize
    from colossus.train.optim import build_optimizer, build_scheduler
    from colossus.train.trainer import train_step

    torch.set_num_threads(threads)
    model_cfg = config_from_dict({"model": SHAPES[shape]}).model
    tcfg = TrainConfig(steps=steps + 3, global_batch=BATCH, micro_batch=BATCH, compile=mode == "compiled",
                       warmup_steps=1)
    device = torch.device("cpu")
    model = build_model(model_cfg, device, seed=0)
    parallelize(model, resolve_layout(ParallelConfig(), 1), None, ParallelConfig(), tcfg, device)
    optimizer = build_optimizer(model, tcfg, device)
    scheduler = build_scheduler(optimizer, tcfg)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_cfg.vocab_size, (steps + 3, BATCH, model_cfg.seq_len + 1), generator=generator)
    times = []
    started = time.perf_counter()
    for step in range(steps + 3):
        begin = time.perf_counter()
        result = train_step(model, optimizer, scheduler, tokens[step, :, :-1], tokens[step, :, 1:], tcfg, device)
        float(result.loss)  # the step is done (CPU ops are synchronous; this only reads the value)
        if step >= 3:
            times.append(time.perf_counter() - begin)
        else:
            warm_s = time.perf_counter() - started
    step_s = statistics.median(times)
    tokens_per_s = BATCH * model_cfg.seq_len / step_s
    return {"shape": shape, "mode": mode, "params": modelmath.params_total(model_cfg),
            "params_active": modelmath.params_active(model_cfg), "flops_per_token": modelmath.flops_per_token(model_cfg),
            "step_s": step_s, "tokens_per_s": tokens_per_s, "warmup_s": warm_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def gemm_peak(threads: int) -> float:
    """The best fp32 GEMM rate over a few large squares, median of repeats each (same threads)."""
    import torch

    from colossus.train.peak import measure_cpu_gemm_flops

    torch.set_num_threads(threads)
    return max(measure_cpu_gemm_flops(size, repeats=7) for size in (1024, 1536, 2048))


def run_peer(steps: int) -> float | None:
    script = Path(__file__).resolve().parents[2] / "shared" / "peers" / "torchtitan-cpu" / "run.sh"
    if not script.is_file():
        script = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "torchtitan-cpu" / "run.sh"
    if not script.is_file():
        print("torchtitan peer script not found (../shared/peers/torchtitan-cpu/run.sh); skipping it", file=sys.stderr)
        return None
    result = subprocess.run(["bash", str(script), "single_noac", str(steps)], capture_output=True, text=True)
    for line in reversed(result.stdout.splitlines()):
        for word in line.replace(",", "").split():
            try:
                return float(word)
            except ValueError:
                continue
    print(f"torchtitan peer printed no figure:\n{result.stdout[-1000:]}\n{result.stderr[-1000:]}", file=sys.stderr)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--peer", action="store_true", help="also run torchtitan's trainer (installs it from PyPI once)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps, args.threads)))
        return 0

    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    peak_before = gemm_peak(args.threads)
    rows = []
    for shape in shapes:
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, __file__, "--worker", shape, mode, "--steps", str(args.steps),
                                  "--threads", str(args.threads)], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{shape}/{mode} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    peak = max(peak_before, gemm_peak(args.threads))  # the machine's best, before and after
    peer = run_peer(25) if args.peer else None
    for row in rows:
        row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak
        eager = next((r for r in rows if r["shape"] == row["shape"] and r["mode"] == "eager"), None)
        row["vs_eager"] = row["tokens_per_s"] / eager["tokens_per_s"] if eager else None
        reference = peer if (peer and row["shape"] == "titan") else PEER_TOKENS_PER_S.get(row["shape"])
        row["vs_peer"] = row["tokens_per_s"] / reference if reference else None
    result = {"gemm_peak_gflops": peak / 1e9, "threads": args.threads, "batch": BATCH, "rows": rows,
              "torchtitan_measured_tokens_per_s": peer}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"fp32 GEMM peak {peak / 1e9:.0f} GFLOP/s ({args.threads} threads), batch {BATCH}, median of {args.steps} steps")
    print(f"{'shape':10} {'mode':9} {'params':>8} {'tokens/s':>9} {'step ms':>8} {'MFU':>6} {'vs eager':>8} "
          f"{'vs peer':>8} {'peak MiB':>8} {'warm-up s':>9}")
    for r in rows:
        print(f"{r['shape']:10} {r['mode']:9} {r['params'] / 1e6:7.1f}M {r['tokens_per_s']:9,.0f} {r['step_s'] * 1e3:8.1f} "
              f"{r['mfu']:6.1%} {(r['vs_eager'] or 0):7.2f}x {(r['vs_peer'] or 0):7.2f}x {r['peak_rss_mib']:8.0f} "
              f"{r['warmup_s']:9.1f}")
    print("peers: nanoGPT 3,700 tokens/s at its shape, torchtitan "
          + (f"{peer:,.0f} (measured now)" if peer else "1,717 (issue 8's measurement)") + " tokens/s")
    print("reproduce: python bench/throughput.py" + (" --peer" if args.peer else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
