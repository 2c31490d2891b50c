"""What building batches in a background thread (data.prefetch) saves per step, beside building each
batch when the step needs it.

usage: python bench/data_prefetch.py [--steps N] [--step-ms MS ...] [--batches BxT ...] [--json]

A GPU step leaves the host waiting for the device; the loader can use that wait. Here the device's
step is the host sleeping for --step-ms (no GPU on this machine), the batches are the trainer's own
(TokenLoader over the stdlib corpus's cached tokens), and both loaders run alternately in one
process so that the machine's drift falls on both. Reported: the host's time per step (median),
inline and prefetched, and their ratio. On a CPU run the step itself keeps the cores busy and a
batch of 8 x 256 takes about 0.1 ms, so there the thread neither helps nor hurts measurably.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from colossus.config import DataConfig
from colossus.data import PrefetchingLoader, TokenLoader, prepare_tokens


def host_step_ms(loader: TokenLoader | PrefetchingLoader, step_s: float) -> float:
    """One step as the host sees it: get the batch, then wait for the device's step."""
    start = time.perf_counter()
    loader.next_batch()
    time.sleep(step_s)
    return (time.perf_counter() - start) * 1e3


def measure(tokens, batch: int, seq_len: int, step_ms: float, steps: int) -> dict:
    inline = TokenLoader(tokens, seq_len, batch, seed=0)
    ahead = PrefetchingLoader(TokenLoader(tokens, seq_len, batch, seed=1), depth=2)
    try:
        for _ in range(2):  # warm-up: page in the tokens, start the thread
            host_step_ms(inline, step_ms / 1e3), host_step_ms(ahead, step_ms / 1e3)
        times: dict[str, list[float]] = {"inline": [], "prefetch": []}
        for _ in range(steps):
            times["inline"].append(host_step_ms(inline, step_ms / 1e3))
            times["prefetch"].append(host_step_ms(ahead, step_ms / 1e3))
    finally:
        ahead.close()
    build = []
    for _ in range(5):
        start = time.perf_counter()
        inline.next_batch()
        build.append((time.perf_counter() - start) * 1e3)
    inline_ms, ahead_ms = statistics.median(times["inline"]), statistics.median(times["prefetch"])
    return {"batch": batch, "seq_len": seq_len, "step_ms": step_ms, "build_ms": statistics.median(build),
            "inline_ms": inline_ms, "prefetch_ms": ahead_ms, "speedup": inline_ms / ahead_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loader (default 20)")
    parser.add_argument("--step-ms", type=float, nargs="+", default=[20.0, 200.0],
                        help="the device's step time that the host waits for (default 20 200)")
    parser.add_argument("--batches", nargs="+", default=["8x256", "64x2048", "256x4096"],
                        help="batch shapes as SEQUENCESxLENGTH (default 8x256 64x2048 256x4096)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    shapes = []
    for text in args.batches:
        try:
            batch, seq_len = (int(part) for part in text.lower().split("x"))
        except ValueError:
            parser.error(f"--batches {text!r}: write SEQUENCESxLENGTH, e.g. 64x2048")
        shapes.append((batch, seq_len))

    data = prepare_tokens(DataConfig(), vocab_size=256, seq_len=max(s for _, s in shapes))
    rows = [measure(data.train, batch, seq_len, step_ms, args.steps)
            for batch, seq_len in shapes for step_ms in args.step_ms]
    print(f"{len(data.train):,} training tokens (stdlib corpus, bytes); median of {args.steps} steps per loader")
    print(f"{'batch':>10} {'build ms':>9} {'step ms':>8} {'inline ms':>10} {'prefetch ms':>12} {'speedup':>8}")
    for r in rows:
        print(f"{r['batch']:>5}x{r['seq_len']:<4} {r['build_ms']:>9.2f} {r['step_ms']:>8.0f} "
              f"{r['inline_ms']:>10.2f} {r['prefetch_ms']:>12.2f} {r['speedup']:>7.3f}x")
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
