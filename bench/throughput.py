"""Trainer throughput side by side: a plain eager reference of our model, each optimisation added in
turn, with CPU MFU against a GEMM peak measured in the same run (and, with --peer, torchtitan's own
trainer on the same machine).

usage: python bench/throughput.py [--shapes nanogpt,titan,tiny,dense100m] [--modes reference,sdpa,eager,compiled]
                                  [--steps N] [--threads T] [--ac none|full] [--nanogpt DIR] [--peer] [--json]
       python bench/throughput.py --device cuda     # on a GPU: dense1b and moe1b in bf16 autocast

Each (shape, mode) runs in a fresh process: the real training step of colossus.train.trainer
(train_step: forward, backward, clipping, AdamW, schedule) on random tokens, warm-up steps (compile
happens there), then the median of N timed steps. Modes, each adding one optimisation to the last:
  reference  written-out attention (math_attention: scores, mask, softmax), per-tensor AdamW loop
  sdpa       + scaled_dot_product_attention (fused flash kernel) where the soft-cap is off
  eager      + fused AdamW: our default step (train.compile = false)
  compiled   + torch.compile of each block (inductor, C++ on CPU): train.compile = true
  trainer    the eager step run by the whole trainer (colossus.train.trainer.train: data loading from the
             stdlib corpus, logging every log.interval = 10 steps with TensorBoard, the ledger): tokens/s
             from its wall clock between logged steps, and what one logged line costs (Trainer.log, timed)
MFU counts the model's matmul FLOPs (modelmath.exact_flops_per_token: 3x the forward's matmuls,
attention's full T x T as PaLM counts it, the input embedding a lookup: the convention of issue 8's
peer figures, 38.5 MFLOP/token for torchtitan's shape). Peak memory is the process's peak RSS
above what it held before the model was built, with glibc returning every freed block of 64 KiB or
more to the system (MALLOC_MMAP_THRESHOLD_), so that RSS follows the live tensors; the planner's
memory model is held to it by tests/test_memory.py.
The "vs peer" column divides by a peer measured in the same run, on the same machine, or stays empty:
--nanogpt DIR runs nanoGPT's own train.py from the user's checkout DIR at its shape (4 layers of 256, 4
heads, block 256, batch 8, fp32, bias-free, no dropout, eager) on the bytes of Python's stdlib as uint16
tokens (vocab 256), written by the bench into a scratch folder; --peer runs torchtitan's trainer on its
debug model (../shared/peers/torchtitan-cpu). Both report the median step after their warm-up.
With --device cuda the same step runs on the GPU as the trainer runs it there (fp32 weights, bf16
autocast, fused AdamW; soft-capped attention in FlexAttention), on a ~1B dense model and a ~1.3B MoE
(0.37B active) by default, from the sdpa mode on; MFU is
against the GPU's datasheet dense BF16 peak (colossus.hardware), peak memory is
torch.cuda.max_memory_allocated over the second step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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
# GPU shapes (--device cuda): a Llama-style ~1B dense model and a Grok-style MoE of ~1.2B (0.4B active).
GPU_SHAPES = {
    "dense1b": dict(name="dense1b", n_layers=18, d_model=2048, n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=5632,
                    ffn_type="swiglu", n_experts=1, top_k=1, vocab_size=32768, seq_len=2048, norm="pre",
                    attn_softcap=0.0, tie_embeddings=False, embedding_multiplier=1.0, output_multiplier=1.0),
    "moe1b": dict(name="moe1b", n_layers=12, d_model=1024, n_heads=16, n_kv_heads=8, head_dim=64, ffn_dim=4096,
                  ffn_type="geglu", n_experts=8, top_k=2, vocab_size=32768, seq_len=2048),
}
SHAPES.update(GPU_SHAPES)
CPU_SHAPES = ("nanogpt", "titan", "tiny", "dense100m")
BATCH = 8


MODES = ("reference", "sdpa", "eager", "compiled", "trainer")
# A GPU skips the reference: its written-out T x T scores at 2,048 tokens would not fit (~13 GB per layer).
GPU_MODES = ("sdpa", "eager", "compiled")


def build_training(shape: str, mode: str, ac: str = "none", batch: int = BATCH, device_type: str = "cpu"):
    """The shape's model, optimizer and schedule as `mode` says; returns (model config, run_step), where
    run_step(i) runs the real training step on random batch i."""
    import torch

    from colossus.config import config_from_dict, layout_from_config
    from colossus.models.grok import build_model
    from colossus.parallel.parallelize import parallelize
    from colossus.train.optim import build_optimizer, build_scheduler
    from colossus.train.step import train_step

    config = config_from_dict({"model": SHAPES[shape], "parallel": {"recompute": ac},
                               "train": {"steps": 1000, "global_batch": batch, "micro_batch": batch, "warmup_steps": 1,
                                         "compile": mode == "compiled"}})
    model_cfg, tcfg = config.model, config.train
    layout = layout_from_config(config, 1, device_type)
    device = torch.device(device_type)
    model = build_model(model_cfg, device, seed=0, fused_attention=mode != "reference")
    parallelize(model, layout, None, device, compile=tcfg.compile)
    optimizer = build_optimizer(model, tcfg, device, fused=mode in ("eager", "compiled"))
    scheduler = build_scheduler(optimizer, tcfg)

    def run_step(index: int) -> None:
        generator = torch.Generator().manual_seed(index)
        tokens = torch.randint(0, model_cfg.vocab_size, (batch, model_cfg.seq_len + 1), generator=generator)
        result = train_step(model, optimizer, scheduler, tokens[:, :-1], tokens[:, 1:], batch, tcfg.grad_clip, device,
                            layout.precision)
        float(result.loss)  # the step is done (CPU ops are synchronous; this only reads the value)

    return model_cfg, run_step


def train_steps(shape: str, mode: str, steps: int, warmup: int, ac: str = "none", batch: int = BATCH,
                device_type: str = "cpu") -> dict:
    """Run warmup + steps training steps of the shape and return the median time of the last `steps`
    (each step ends by reading its loss, so a GPU's queue is drained inside the timing)."""
    from colossus import modelmath

    model_cfg, run_step = build_training(shape, mode, ac, batch, device_type)
    times = []
    started = time.perf_counter()
    warm_s = 0.0
    for step in range(steps + warmup):
        begin = time.perf_counter()
        run_step(step)
        if step >= warmup:
            times.append(time.perf_counter() - begin)
        else:
            warm_s = time.perf_counter() - started
    step_s = statistics.median(times)
    return {"shape": shape, "mode": mode, "ac": ac, "batch": batch, "seq_len": model_cfg.seq_len,
            "params": modelmath.params_total(model_cfg),
            "params_active": modelmath.params_active(model_cfg), "flops_per_token": modelmath.exact_flops_per_token(model_cfg),
            "step_s": step_s, "tokens_per_s": batch * model_cfg.seq_len / step_s, "warmup_s": warm_s}


def trainer_steps(shape: str, steps: int, warmup: int, threads: int, batch: int = BATCH, log_interval: int = 10) -> dict:
    """The whole trainer at the shape, with its default logging: its tokens/s over the wall clock from
    the first logged step after `warmup` to the last, and the median time of one Trainer.log call (the
    metrics line, TensorBoard, the console and the ledger), timed from outside."""
    import tempfile

    from colossus import modelmath
    from colossus.config import config_from_dict
    from colossus.train import trainer as trainer_module

    spent, original = [], trainer_module.Trainer.log

    def timed_log(self, result) -> None:
        begin = time.perf_counter()
        original(self, result)
        spent.append(time.perf_counter() - begin)

    trainer_module.Trainer.log = timed_log
    first_logged = -(-max(warmup, 1) // log_interval) * log_interval  # the first logged step after the warm-up
    total = first_logged + steps
    config = config_from_dict({"model": SHAPES[shape], "log": {"interval": log_interval},
                               "train": {"steps": total, "global_batch": batch, "micro_batch": batch, "threads": threads},
                               "checkpoint": {"interval": 10 * total}, "eval": {"interval": 10 * total, "batches": 1,
                                                                               "sample_tokens": 0}})
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as scratch:
        trainer_module.train(config, Path(scratch) / "run")
        lines = (Path(scratch) / "run" / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "loss" in r and r["step"] >= first_logged]
    first, last = records[0], records[-1]
    step_s = (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])
    model_cfg = config.model
    return {"shape": shape, "mode": "trainer", "ac": "none", "batch": batch, "seq_len": model_cfg.seq_len,
            "params": modelmath.params_total(model_cfg), "params_active": modelmath.params_active(model_cfg),
            "flops_per_token": modelmath.exact_flops_per_token(model_cfg), "step_s": step_s,
            "tokens_per_s": batch * model_cfg.seq_len / step_s, "warmup_s": first["elapsed_s"],
            "log_interval": log_interval, "log_line_s": statistics.median(spent)}


def peak_memory(shape: str, mode: str, ac: str = "none", batch: int = BATCH) -> dict:
    """Peak resident bytes of a second training step (the first has no optimizer state yet) above what
    the process held before the model was built. Needs MALLOC_MMAP_THRESHOLD_ in the environment
    (see run_memory), and Linux's /proc/self/clear_refs to restart the high-water mark."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    before = resident_bytes("VmRSS")
    row = train_steps(shape, mode, steps=1, warmup=1, ac=ac, batch=batch)
    row["peak_bytes"] = resident_bytes("VmHWM") - before
    return row


def gpu_peak_memory(shape: str, mode: str, ac: str = "none", batch: int = BATCH) -> dict:
    """Peak bytes torch allocated on the GPU during a second training step (weights, AdamW state,
    activations, gradients; not the CUDA context or the caching allocator's slack)."""
    import torch

    model_cfg, run_step = build_training(shape, mode, ac, batch, "cuda")
    run_step(0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run_step(1)
    return {"shape": shape, "mode": mode, "ac": ac, "batch": batch, "peak_bytes": torch.cuda.max_memory_allocated()}


def resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_python(args: list[str], env: dict | None = None) -> list[dict]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def run_timing(shape: str, mode: str, steps: int, threads: int, warmup: int = 3, device_type: str = "cpu") -> dict:
    """One timing in a fresh Python process, so that compile caches and allocator state do not leak
    from one measurement into the next; raises RuntimeError with its stderr if it fails."""
    return run_python(["--worker", shape, mode, "--steps", str(steps), "--warmup", str(warmup),
                       "--threads", str(threads), "--device", device_type])[0]


def run_gpu_memory(cases: list[tuple[str, str, str]], batch: int = BATCH) -> list[dict]:
    """GPU peak memory of each case, each in a fresh process (so no case inherits another's cache)."""
    return [run_python(["--gpu-memory-worker", "/".join(case), "--batch", str(batch)])[0] for case in cases]


def run_memory(cases: list[tuple[str, str, str]], threads: int = 2, batch: int = BATCH) -> list[dict]:
    """Peak memory of (shape, mode, activation checkpointing) cases, one after another in one fresh
    process. glibc returns every freed block of 64 KiB or more to the system there, so that RSS follows
    the live tensors (it slows the steps: timings come from run_timing)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    spec = ",".join("/".join(case) for case in cases)
    return run_python(["--memory-worker", spec, "--threads", str(threads), "--batch", str(batch)], env)


# Profile categories: what each aten op (self time) is counted as.
OP_CATEGORIES = {"aten::mm": "matmul", "aten::bmm": "matmul", "aten::addmm": "matmul", "aten::_grouped_mm": "matmul",
                 "aten::_scaled_dot_product_flash_attention_for_cpu": "attention kernel",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "attention kernel"}


def profile_steps(shape: str, mode: str, steps: int = 3, warmup: int = 3) -> dict[str, float]:
    """Seconds per step by category (torch.profiler, self CPU time of each op after warm-up): matmuls,
    the fused attention kernel, compiled (inductor) kernels and everything else."""
    from torch.profiler import profile

    _, run_step = build_training(shape, mode)
    for index in range(warmup):
        run_step(index)
    with profile() as prof:
        for index in range(steps):
            run_step(warmup + index)
    per_step: dict[str, float] = {}
    for event in prof.key_averages():
        compiled = event.key.startswith("## Call CompiledFxGraph")
        category = OP_CATEGORIES.get(event.key) or ("compiled kernels" if compiled else "other")
        per_step[category] = per_step.get(category, 0.0) + event.self_cpu_time_total / 1e6 / steps
    return per_step


# GPU kernels by name: the first category whose word is in the kernel's name (cuBLAS, CUTLASS and
# cuDNN GEMMs, the flash / cuDNN / FlexAttention attention kernels, inductor's Triton kernels).
KERNEL_CATEGORIES = (("attention kernel", ("flash", "fmha", "flex", "attention")),
                     ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "grouped_mm")),
                     ("compiled kernels", ("triton",)))


def kernel_categories(kernels: dict[str, float]) -> dict[str, float]:
    """Seconds per KERNEL_CATEGORIES label (or "other") of {kernel name: seconds}."""
    totals: dict[str, float] = {}
    for name, seconds in kernels.items():
        lowered = name.lower()
        category = next((label for label, words in KERNEL_CATEGORIES if any(w in lowered for w in words)), "other")
        totals[category] = totals.get(category, 0.0) + seconds
    return totals


def gpu_profile_steps(shape: str, mode: str, steps: int = 3, warmup: int = 3) -> dict:
    """GPU seconds per step by kernel category (torch.profiler's device time), the time the GPU sat
    idle within the steps (waiting for the host, whose work the profiler itself slows somewhat), and
    the kernels that took the most time."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _, run_step = build_training(shape, mode, device_type="cuda")
    for index in range(warmup):
        run_step(index)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        begin = time.perf_counter()
        for index in range(steps):
            run_step(warmup + index)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - begin) / steps
    kernels = {event.key: event.self_device_time_total / 1e6 / steps for event in prof.key_averages()
               if event.device_type == DeviceType.CUDA and event.self_device_time_total > 0}
    per_step = kernel_categories(kernels)
    per_step["idle"] = max(wall - sum(per_step.values()), 0.0)
    top = sorted(kernels.items(), key=lambda item: -item[1])[:12]
    return {"seconds": per_step, "step_s": wall, "top_kernels": [[name[:90], seconds] for name, seconds in top]}


def gpu_datasheet_peak() -> tuple[float, str]:
    """The visible GPU's dense BF16 datasheet peak (what the trainer's MFU uses) and its name."""
    import torch

    from colossus.hardware import gpu_from_device_name

    name = torch.cuda.get_device_name(0)
    gpu = gpu_from_device_name(name)
    if gpu is None:
        raise SystemExit(f"{name} is not in colossus.hardware's catalog: no peak to measure MFU against")
    return gpu.bf16_tflops * 1e12, gpu.name


def gemm_peak(threads: int) -> float:
    """The best fp32 GEMM rate over a few large squares (colossus.plan.profile.gemm_peak_flops: the
    peak the trainer's MFU and the planner use), with the threads of the runs."""
    import torch

    from colossus.plan.profile import gemm_peak_flops

    torch.set_num_threads(threads)
    return gemm_peak_flops(torch.device("cpu"), torch.float32, repeats=7)


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


def stdlib_bytes(limit: int = 8 << 20) -> bytes:
    """The first `limit` bytes (UTF-8) of the stdlib corpus `colossus train` reads by default (the peers' text)."""
    from colossus.config import DataConfig
    from colossus.data.corpus import iter_documents

    chunks, size = [], 0
    for _, text in iter_documents(DataConfig(source="stdlib")):
        chunks.append(text.encode("utf-8"))
        size += len(chunks[-1])
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def run_nanogpt(checkout: Path, steps: int, threads: int, warmup: int = 5) -> float | None:
    """nanoGPT's own train.py at its shape on this machine (eager, fp32, 1 process): the median tokens/s
    of its logged iterations after `warmup`. Its data (stdlib bytes as uint16 tokens, vocab 256 in
    meta.pkl) and configurator.py go into a scratch folder it runs in; the checkout is only read."""
    import pickle
    import tempfile

    import numpy as np

    script = checkout / "train.py"
    if not (script.is_file() and (checkout / "model.py").is_file() and (checkout / "configurator.py").is_file()):
        print(f"--nanogpt {checkout}: no nanoGPT checkout there (train.py, model.py, configurator.py); skipping it",
              file=sys.stderr)
        return None
    shape = SHAPES["nanogpt"]
    with tempfile.TemporaryDirectory(prefix="nanogpt-peer-") as scratch:
        data = Path(scratch, "data", "colossus_bytes")
        data.mkdir(parents=True)
        tokens = np.frombuffer(stdlib_bytes(), dtype=np.uint8).astype(np.uint16)
        tokens.tofile(data / "train.bin")
        tokens[: len(tokens) // 10].tofile(data / "val.bin")
        (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 256}))
        Path(scratch, "configurator.py").write_bytes((checkout / "configurator.py").read_bytes())
        iters = warmup + steps
        options = dict(dataset="colossus_bytes", out_dir=str(Path(scratch, "out")), device="cpu", dtype="float32",
                       compile=False, batch_size=BATCH, block_size=shape["seq_len"], n_layer=shape["n_layers"],
                       n_head=shape["n_heads"], n_embd=shape["d_model"], dropout=0.0, bias=False,
                       gradient_accumulation_steps=1, max_iters=iters, lr_decay_iters=iters, warmup_iters=1,
                       eval_interval=10**9, eval_iters=1, log_interval=1, always_save_checkpoint=False)
        argv = [f"--{key}={value}" for key, value in options.items()]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        result = subprocess.run([sys.executable, str(script), *argv], cwd=scratch, env=env, capture_output=True,
                                text=True)
    times = [float(line.split("time ")[1].split("ms")[0]) / 1e3 for line in result.stdout.splitlines()
             if line.startswith("iter ") and "time " in line]
    if result.returncode != 0 or len(times) <= warmup:
        print(f"nanoGPT printed no timings (exit {result.returncode}):\n{result.stdout[-1000:]}\n{result.stderr[-2000:]}",
              file=sys.stderr)
        return None
    return BATCH * shape["seq_len"] / statistics.median(times[warmup:])


def main() -> int:
    parser = argparse.ArgumentParser(description="Trainer throughput per model shape: a plain eager reference, then "
                                     "each optimisation in turn, with CPU MFU, peer ratios and peak memory.")
    parser.add_argument("--shapes", default=None, help="comma-separated, from: " + ", ".join(SHAPES)
                        + f" (default: {','.join(CPU_SHAPES)} on cpu, {','.join(GPU_SHAPES)} on cuda)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where to train: cpu (fp32, against a measured GEMM peak) or cuda (bf16 autocast, "
                             "against the GPU's datasheet peak)")
    parser.add_argument("--modes", default=None, help="comma-separated, each adding one optimisation: "
                        + ", ".join(MODES) + f" (default: all on cpu, {','.join(GPU_MODES)} on cuda)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per (shape, mode); the median is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens there)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    parser.add_argument("--ac", default="none,full", help="activation checkpointing modes whose peak memory to measure "
                        "(eager step; none and/or full)")
    parser.add_argument("--peer", action="store_true", help="also run torchtitan's trainer (installs it from PyPI once)")
    parser.add_argument("--nanogpt", type=Path, metavar="DIR",
                        help="also run nanoGPT's train.py from this checkout at its shape (the nanogpt row's peer)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", metavar="SHAPE/MODE/AC,...", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="instead: where each (shape, mode)'s step time goes "
                        "(torch.profiler): on cpu with the ceiling if only matmuls and the attention kernel took "
                        "time; on cuda by kernel category, idle GPU and the costliest kernels")
    parser.add_argument("--profile-worker", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--gpu-memory-worker", metavar="SHAPE/MODE/AC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gpu_memory_worker:
        print(json.dumps(gpu_peak_memory(*args.gpu_memory_worker.split("/"), batch=args.batch)))
        return 0
    if args.worker or args.memory_worker or args.profile_worker:
        import torch

        torch.set_num_threads(args.threads)
        if args.worker and args.worker[1] == "trainer":
            print(json.dumps(trainer_steps(args.worker[0], args.steps, args.warmup, args.threads, batch=args.batch)))
        elif args.worker:
            print(json.dumps(train_steps(*args.worker, args.steps, args.warmup, batch=args.batch, device_type=args.device)))
        if args.profile_worker and args.device == "cuda":
            print(json.dumps(gpu_profile_steps(*args.profile_worker, warmup=args.warmup)))
        elif args.profile_worker:
            print(json.dumps(profile_steps(*args.profile_worker, warmup=args.warmup)))
        cases = [case.split("/") for case in args.memory_worker.split(",")] if args.memory_worker else []
        if cases:
            # One unmeasured step first: the first step of a process also allocates its thread pools and
            # the math libraries' buffers (~90 MiB here), which are the process's, not the model's.
            train_steps(cases[0][0], cases[0][1], steps=1, warmup=0, batch=args.batch)
        for case in cases:
            print(json.dumps(peak_memory(*case, batch=args.batch)), flush=True)
        return 0

    on_gpu = args.device == "cuda"
    if on_gpu:
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is visible here; run on a GPU machine or drop --device")
        if args.peer or args.nanogpt:
            parser.error("--peer and --nanogpt measure the CPU; drop them with --device cuda")
    shapes = [s for s in (args.shapes or ",".join(GPU_SHAPES if on_gpu else CPU_SHAPES)).split(",") if s]
    modes = [m for m in (",".join(GPU_MODES if on_gpu else MODES) if args.modes is None else args.modes).split(",") if m]
    ac_modes = [a for a in args.ac.split(",") if a]
    for value, known, what in ((shapes, SHAPES, "shape"), (modes, MODES, "mode"), (ac_modes, ("none", "full"), "ac")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"unknown {what} {unknown[0]!r}; choose from {', '.join(known)}")
    if args.profile and on_gpu:
        return print_gpu_profiles(shapes, modes, args.threads, args.warmup, args.json)
    if args.profile:
        return print_profiles(shapes, modes, args.threads, args.warmup)
    peak_before, peak_name = gpu_datasheet_peak() if on_gpu else (gemm_peak(args.threads), "")
    rows = []
    for shape in shapes:
        for mode in modes:
            try:
                rows.append(run_timing(shape, mode, args.steps, args.threads, args.warmup, args.device))
            except RuntimeError as failure:
                print(failure, file=sys.stderr)
    peak = peak_before if on_gpu else max(peak_before, gemm_peak(args.threads))  # the machine's best, before and after
    cases = [(shape, "eager", ac) for shape in shapes for ac in ac_modes]
    memory = (run_gpu_memory(cases) if on_gpu else run_memory(cases, args.threads)) if ac_modes else []
    peer = run_peer(25) if args.peer else None
    nanogpt = run_nanogpt(args.nanogpt, args.steps, args.threads) if args.nanogpt else None
    live_peers = {"titan": peer, "nanogpt": nanogpt}
    for row in rows:
        row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak
        same_shape = [r for r in rows if r["shape"] == row["shape"]]
        first, before = same_shape[0], same_shape[max(same_shape.index(row) - 1, 0)]
        row["vs_reference"] = row["tokens_per_s"] / first["tokens_per_s"] if first["mode"] == "reference" else None
        row["vs_previous"] = row["tokens_per_s"] / before["tokens_per_s"]
        reference = live_peers.get(row["shape"])  # measured now, or no ratio at all
        row["vs_peer"] = row["tokens_per_s"] / reference if reference else None
    for row in memory:
        row["predicted_bytes"] = predicted_peak_bytes(row["shape"], row["ac"], row["batch"], args.device)
    result = {"device": args.device, "gpu": peak_name or None, "gemm_peak_gflops": peak / 1e9, "threads": args.threads,
              "batch": BATCH, "rows": rows, "memory": memory, "torchtitan_measured_tokens_per_s": peer,
              "nanogpt_measured_tokens_per_s": nanogpt}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    ratio = lambda value: f"{value:7.2f}x" if value else f"{'-':>8}"  # noqa: E731
    if on_gpu:
        print(f"{peak_name}: dense BF16 datasheet peak {peak / 1e12:.0f} TFLOP/s, bf16 autocast, batch {BATCH}, "
              f"median of {args.steps} steps")
    else:
        print(f"fp32 GEMM peak {peak / 1e9:.0f} GFLOP/s ({args.threads} threads), batch {BATCH}, median of {args.steps} steps")
    print(f"{'shape':10} {'mode':9} {'params':>8} {'tokens/s':>9} {'step ms':>8} {'MFU':>6} {'vs ref':>8} "
          f"{'vs prev':>8} {'vs peer':>8} {'warm-up s':>9}")
    for r in rows:
        print(f"{r['shape']:10} {r['mode']:9} {r['params'] / 1e6:7.1f}M {r['tokens_per_s']:9,.0f} {r['step_s'] * 1e3:8.1f} "
              f"{r['mfu']:6.1%} {ratio(r['vs_reference'])} {ratio(r['vs_previous'])} {ratio(r['vs_peer'])} "
              f"{r['warmup_s']:9.1f}")
    for r in rows:
        if r["mode"] == "trainer":
            print(f"trainer at {r['shape']}: one logged line (metrics, TensorBoard, console, ledger) takes "
                  f"{r['log_line_s'] * 1e3:.2f} ms, {r['log_line_s'] / r['step_s']:.2%} of a step; logged every "
                  f"{r['log_interval']} steps (the default): {r['log_line_s'] / r['step_s'] / r['log_interval']:.2%}")
    if not on_gpu:
        measured = [f"{name} {value:,.0f} tokens/s" for name, value in (("nanoGPT", nanogpt), ("torchtitan", peer))
                    if value]
        print("peers measured now: " + (", ".join(measured) if measured else "none (--nanogpt DIR, --peer)"))
    if memory and on_gpu:
        print("\npeak GPU memory allocated during an eager step")
        print(f"{'shape':10} {'act. ckpt':9} {'measured MiB':>12} {'planner MiB':>11} {'error':>7}")
        for r in memory:
            print(f"{r['shape']:10} {r['ac']:9} {r['peak_bytes'] / 2**20:12.0f} {r['predicted_bytes'] / 2**20:11.0f} "
                  f"{r['predicted_bytes'] / r['peak_bytes'] - 1:+7.1%}")
    elif memory:
        print("\npeak memory of an eager step above the process's start, vs the planner's memory model")
        print(f"{'shape':10} {'act. ckpt':9} {'measured MiB':>12} {'planner MiB':>11} {'error':>7}")
        for r in memory:
            print(f"{r['shape']:10} {r['ac']:9} {r['peak_bytes'] / 2**20:12.0f} {r['predicted_bytes'] / 2**20:11.0f} "
                  f"{r['predicted_bytes'] / r['peak_bytes'] - 1:+7.1%}")
    print("reproduce: python bench/throughput.py " + " ".join(sys.argv[1:]))
    return 0


def print_profiles(shapes: list[str], modes: list[str], threads: int, warmup: int) -> int:
    """Per (shape, mode): seconds per step by category, the matmuls' rate, and the tokens/s this step
    would reach if everything but the matmuls and the attention kernel took no time at all."""
    from colossus import modelmath
    from colossus.config import config_from_dict

    print(f"{'shape':10} {'mode':9} {'step ms':>8} {'matmul':>7} {'attn':>7} {'compiled':>8} {'other':>7} "
          f"{'mm GFLOP/s':>10} {'tokens/s':>9} {'ceiling':>8}")
    for shape in shapes:
        model_cfg = config_from_dict({"model": SHAPES[shape]}).model
        tokens = BATCH * model_cfg.seq_len
        forward = modelmath.forward_matmul_flops(model_cfg)
        core = forward["attn_scores"] + forward["attn_values"]
        for mode in modes:
            # The matmuls aten runs (forward + backward = 3x the forward's): the attention core's too
            # where it is written out (the soft-cap, or the reference), not where the flash kernel runs it.
            written_out = model_cfg.attn_softcap > 0 or mode == "reference"
            mm_flops = 3 * tokens * (sum(forward.values()) - (0 if written_out else core))
            seconds = run_python(["--profile-worker", shape, mode, "--threads", str(threads), "--warmup", str(warmup)])[0]
            step = sum(seconds.values())
            share = lambda key: seconds.get(key, 0.0) / step  # noqa: E731
            floor = seconds.get("matmul", 0.0) + seconds.get("attention kernel", 0.0)
            print(f"{shape:10} {mode:9} {step * 1e3:8.0f} {share('matmul'):7.0%} {share('attention kernel'):7.0%} "
                  f"{share('compiled kernels'):8.0%} {share('other'):7.0%} {mm_flops / seconds['matmul'] / 1e9:10.0f} "
                  f"{tokens / step:9,.0f} {tokens / floor:8,.0f}")
    print("matmul: aten mm/bmm/grouped_mm; attn: the CPU flash-attention kernel (forward + backward); compiled: "
          "inductor's fused element-wise kernels; ceiling: tokens/s with all but matmul and attn free")
    print("reproduce: python bench/throughput.py --profile --modes " + ",".join(modes))
    return 0


def print_gpu_profiles(shapes: list[str], modes: list[str], threads: int, warmup: int, as_json: bool) -> int:
    """Per (shape, mode): where a GPU step's time goes (kernel categories and idle GPU) and its
    costliest kernels, each (shape, mode) in a fresh process."""
    results = []
    for shape in shapes:
        for mode in modes:
            try:
                row = run_python(["--profile-worker", shape, mode, "--device", "cuda", "--threads", str(threads),
                                  "--warmup", str(warmup)])[0]
            except RuntimeError as failure:
                print(failure, file=sys.stderr)
                continue
            results.append({"shape": shape, "mode": mode, **row})
    if as_json:
        print(json.dumps({"device": "cuda", "profiles": results}, indent=1))
        return 0
    for row in results:
        step, seconds = row["step_s"], row["seconds"]
        shares = "  ".join(f"{key} {value / step:.0%}" for key, value in sorted(seconds.items(), key=lambda kv: -kv[1]))
        print(f"{row['shape']} {row['mode']}: {step * 1e3:.1f} ms per step: {shares}")
        for name, kernel_s in row["top_kernels"]:
            print(f"  {kernel_s * 1e3:8.2f} ms  {name}")
    print("reproduce: python bench/throughput.py --device cuda --profile --modes " + ",".join(modes))
    return 0


def predicted_peak_bytes(shape: str, recompute: str, batch: int = BATCH, device_type: str = "cpu") -> float:
    """The planner's peak for one process training the shape with eager PyTorch: SDPA where the soft-cap
    is off (FlexAttention where it is on, on a GPU), norms and activations unfused, gradients freed by zero_grad;
    fp32 on a CPU, bf16 on a GPU (the planner's 2 + 4 + 12 bytes of state per parameter equal ours
    there: fp32 weights, gradients and moments, 16, plus autocast's bf16 weight copies, 2). "reserved"
    (the CUDA context, not counted by torch.cuda.max_memory_allocated) is left out."""
    from colossus.config import config_from_dict
    from colossus.layout import Layout
    from colossus.plan.costmodel import Software, eager_cpu_software, memory_breakdown

    model = config_from_dict({"model": SHAPES[shape]}).model
    on_gpu = device_type == "cuda"
    layout = Layout(mbs=batch, gbs=batch, zero=0, precision="bf16" if on_gpu else "fp32", recompute=recompute)
    software = (Software(fused_attention=True, overlap_grad_reduce=False, fused_elementwise=False, persistent_grads=False)
                if on_gpu else eager_cpu_software(model))
    breakdown = memory_breakdown(model, layout, software)
    return sum(breakdown.values()) - breakdown["reserved"]

if __name__ == "__main__":
    sys.exit(main())
