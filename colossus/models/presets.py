"""Named model sizes. Each is a plain ModelConfig; `[model] preset = "..."` starts from one.

The Grok-1 shape follows the released code (xai-org/grok-1, run.py and model.py): 64 layers,
d_model 6144, 48 query / 8 key-value heads of 128, 8 experts top-2 with GeGLU FFNs of 32768,
vocabulary 131072, context 8192, sandwich RMSNorm, attention logits soft-capped at 30, inputs scaled
by sqrt(d_model) and logits by 1/sqrt(3). The intermediate sizes keep Grok-1's recipe and scale width
and depth the way Mixtral-style MoEs do.
"""

from __future__ import annotations

import dataclasses
import math

from colossus.modelconfig import ModelConfig
from colossus.errors import UserError


def _grok_like(name: str, n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
               ffn_dim: int, vocab_size: int, seq_len: int) -> ModelConfig:
    return ModelConfig(
        name=name, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, ffn_dim=ffn_dim, ffn_type="geglu", n_experts=8, top_k=2,
        vocab_size=vocab_size, seq_len=seq_len, embedding_multiplier=math.sqrt(d_model),
    )


PRESETS: dict[str, ModelConfig] = {
    # Trains on a laptop CPU in minutes: ~13.5M parameters, ~4M active, byte vocabulary.
    "tiny": _grok_like("tiny", 4, 256, 4, 2, 64, 512, 256, 256),
    # A single-GPU MoE for quick experiments (~0.3B total).
    "small": _grok_like("small", 8, 768, 12, 4, 64, 2048, 32768, 1024),
    # A one-node MoE (~7B total, ~2B active).
    "medium": _grok_like("medium", 24, 2048, 16, 8, 128, 5632, 131072, 4096),
    # Mixtral-8x7B-sized (~47B total, ~13B active).
    "large": _grok_like("large", 32, 4096, 32, 8, 128, 14336, 131072, 8192),
    # The released Grok-1: ~314B total parameters, ~86B active.
    "grok-1": _grok_like("grok-1", 64, 6144, 48, 8, 128, 32768, 131072, 8192),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)} (see `colossus models`)")
    return dataclasses.replace(PRESETS[name])
