"""Generation speed with and without the KV cache, side by side in one process.

    python bench/generate_speed.py [--tokens N] [--threads T]

For the `tiny` preset at its training context (256) and at a 1,024-token context (the same model with
seq_len = 1024): a prompt that fills all but N positions, then N greedy tokens, timed with and without
the cache (Transformer.generate). Prints new tokens per second and the ratio. Random weights: the work
per token does not depend on them.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from colossus.models.grok import build_model  # noqa: E402
from colossus.models.presets import get_preset  # noqa: E402


def tokens_per_s(model, prompt: torch.Tensor, new: int, cache: bool) -> float:
    started = time.perf_counter()
    model.generate(prompt, new, temperature=0, cache=cache)
    return new / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per measurement (default 32)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | context | prompt | new tokens | tokens/s, no cache | tokens/s, KV cache | ratio |")
    print("|---|---|---|---|---|---|---|")
    for context in (256, 1024):
        cfg = replace(get_preset("tiny"), seq_len=context)
        model = build_model(cfg).eval()
        prompt = torch.randint(0, cfg.vocab_size, (1, context - args.tokens), generator=torch.Generator().manual_seed(0))
        model.generate(prompt[:, :8], 2, temperature=0)  # warm-up
        plain = tokens_per_s(model, prompt, args.tokens, cache=False)
        cached = tokens_per_s(model, prompt, args.tokens, cache=True)
        print(f"| tiny | {context:,} | {prompt.shape[1]:,} | {args.tokens} | {plain:.1f} | {cached:.1f} | {cached / plain:.1f}x |")


if __name__ == "__main__":
    main()
