"""Step times of published runs from their TFLOP/s figures: the derivation behind the rows of
colossus/plan/data/published_runs.toml whose papers give throughput, not seconds per step.

    python bench/published_flops.py

For every validated row with tflops_basis = "mfu" it recomputes Megatron-LM's model FLOPs per token
(megatron/training/training.py, num_floating_point_operations: 6 x the matmul weights a token meets,
the output layer included and the input embedding not, plus 12 x layers x heads x head_dim x sequence
for full-square attention) from the row's [model] table, derives
step_time_s = global batch x sequence x FLOPs per token / (GPUs x TFLOP/s per GPU), and prints it beside
the table's value. Two rows differ on purpose: NeMo AutoModel's Qwen3 row publishes its step time and
Megatron-Bridge's Llama 3.1 405B row its tokens/s, which the table uses; their TFLOP/s come from other
FLOP counters.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from colossus.plan.validation import validated_runs  # noqa: E402


def megatron_flops_per_token(model: dict) -> float:
    layers, width, vocab, seq = model["n_layers"], model["d_model"], model["vocab_size"], model["seq_len"]
    query = model["n_heads"] * model["head_dim"]
    key_value = model["n_kv_heads"] * model["head_dim"]
    gated = model["ffn_type"] in ("swiglu", "geglu")
    experts = model.get("top_k", 1) if model.get("n_experts", 1) > 1 else 1
    per_layer = 2 * width * query + 2 * width * key_value + experts * (3 if gated else 2) * width * model["ffn_dim"]
    return 6 * (layers * per_layer + vocab * width) + 12 * layers * query * seq


def main() -> None:
    print(f"{'run':46s} {'GFLOP/token':>11s} {'TFLOP/s':>8s} {'derived s':>9s} {'table s':>8s}")
    for row in validated_runs():
        if row.get("tflops_basis") != "mfu" or "tflops_per_gpu" not in row:
            continue
        model, layout, gpus = row["model"], row["layout"], row["cluster"]["n_gpus"]
        flops = megatron_flops_per_token(model)
        tokens = layout["gbs"] * model["seq_len"]
        derived = tokens * flops / (gpus * row["tflops_per_gpu"] * 1e12)
        print(f"{row['name']:46s} {flops / 1e9:11.2f} {row['tflops_per_gpu']:8.1f} {derived:9.3f} {row['step_time_s']:8.3f}")


if __name__ == "__main__":
    main()
