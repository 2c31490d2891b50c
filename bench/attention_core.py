"""The written-out soft-capped attention core (CPU's path for Grok-1's capped logits): the causal mask
as an added bias (colossus.models.grok.math_attention) beside the textbook masked_fill form, forward
and backward, side by side in one process.

usage: python bench/attention_core.py [--batch 8] [--seq 256] [--heads 4] [--kv-heads 2] [--head-dim 64]
                                      [--softcap 30] [--repeats 30] [--threads 2]

Defaults are the `tiny` preset's attention at its training batch. Both forms are checked to give
bit-identical outputs and gradients before they are timed, alternately, median of --repeats.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from colossus.models.grok import math_attention


def masked_fill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float) -> torch.Tensor:
    """The same attention with c * tanh(s) and masked_fill(-inf): a scale pass, a copy and a fill."""
    batch, heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, kv_heads, heads // kv_heads * seq, head_dim)
    logits = softcap * torch.tanh((q / (math.sqrt(head_dim) * softcap)) @ k.transpose(-2, -1))
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    logits = logits.view(batch, kv_heads, -1, seq, seq).masked_fill(~causal, float("-inf"))
    probs = logits.softmax(dim=-1).view(batch, kv_heads, -1, seq)
    return (probs @ v).view(batch, heads, seq, head_dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--softcap", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.softcap <= 0 or args.heads % args.kv_heads:
        parser.error("--softcap must be > 0 and --heads a multiple of --kv-heads")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(args.batch, args.heads, args.seq, args.head_dim, generator=generator).requires_grad_()
    k, v = (torch.randn(args.batch, args.kv_heads, args.seq, args.head_dim, generator=generator).requires_grad_()
            for _ in range(2))
    grad_out = torch.randn(args.batch, args.heads, args.seq, args.head_dim, generator=generator)

    def step(attention) -> tuple[float, torch.Tensor, tuple[torch.Tensor, ...]]:
        start = time.perf_counter()
        out = attention(q, k, v, args.softcap)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        return time.perf_counter() - start, out, grads

    _, ours, our_grads = step(math_attention)
    _, textbook, textbook_grads = step(masked_fill_attention)
    identical = torch.equal(ours, textbook) and all(torch.equal(a, b) for a, b in zip(our_grads, textbook_grads))
    times: dict[str, list[float]] = {"bias": [], "masked_fill": []}
    for _ in range(args.repeats):
        times["masked_fill"].append(step(masked_fill_attention)[0])
        times["bias"].append(step(math_attention)[0])
    textbook_ms, ours_ms = (statistics.median(times[key]) * 1e3 for key in ("masked_fill", "bias"))
    print(f"soft-capped causal attention, forward + backward, batch {args.batch}, seq {args.seq}, "
          f"{args.heads} heads / {args.kv_heads} kv heads of {args.head_dim}, {args.threads} threads")
    print(f"outputs and gradients bit-identical: {identical}")
    print(f"masked_fill {textbook_ms:.1f} ms | additive bias {ours_ms:.1f} ms | speedup {textbook_ms / ours_ms:.2f}x")


if __name__ == "__main__":
    main()
