"""How long the training loop blocks per checkpoint: asynchronous versus synchronous saves.

usage: python bench/checkpoint_blocking.py [--saves N] [--layers L] [--json]

A dense ~100M-parameter model (12 layers, d_model 768) with its AdamW state (about 1.3 GB per
checkpoint) is saved N times each way through colossus.train.checkpoint.Checkpointer, into a
temporary folder on the same disk. "Blocking" is the time save() takes to return, which is what the
loop waits for; with async saves the write then overlaps the next steps (here: a sleep standing in
for them), and the next save waits for the previous one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from colossus import modelmath
from colossus.config import ModelConfig, TrainConfig
from colossus.models.grok import build_model
from colossus.train.checkpoint import Checkpointer
from colossus.train.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--gap", type=float, default=10.0, help="seconds of 'training' between saves")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    cfg = ModelConfig(name="dense-100m", n_layers=args.layers, d_model=768, n_heads=12, n_kv_heads=12, head_dim=64,
                      ffn_dim=3072, ffn_type="gelu", n_experts=1, top_k=1, vocab_size=32768, seq_len=128, norm="pre")
    model = build_model(cfg)
    optimizer = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    model(torch.zeros(1, 8, dtype=torch.long)).logits.sum().backward()
    optimizer.step()  # creates the AdamW moments, so the checkpoint has its real size
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    results = {}
    for mode in ("sync", "async"):
        with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
            checkpointer = Checkpointer(Path(tmp), keep=2, asynchronous=(mode == "async"))
            blocking, started = [], time.perf_counter()
            for step in range(1, args.saves + 1):
                start = time.perf_counter()
                checkpointer.save(step, state)
                blocking.append(time.perf_counter() - start)
                time.sleep(args.gap)  # the training steps between two checkpoints
            checkpointer.finish()
            size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / max(len(checkpointer.step_folders()), 1)
            results[mode] = {"blocking_s": statistics.median(blocking), "total_s": time.perf_counter() - started,
                             "bytes": size}
    ratio = results["sync"]["blocking_s"] / results["async"]["blocking_s"]
    if args.json:
        print(json.dumps({"params": modelmath.params_total(cfg), **results, "sync_over_async": ratio}, indent=1))
        return
    print(f"command: python {' '.join(sys.argv)}")
    print(f"model {cfg.name}: {modelmath.params_total(cfg) / 1e6:.0f}M parameters, checkpoint "
          f"{results['sync']['bytes'] / 1e9:.2f} GB, {args.saves} saves each way, {args.gap:g} s of 'training' between saves")
    for mode in ("sync", "async"):
        print(f"  {mode:<5} blocks the loop {results[mode]['blocking_s']:6.2f} s per checkpoint (median)")
    print(f"  synchronous / asynchronous blocking time: {ratio:.1f}x")


if __name__ == "__main__":
    main()
