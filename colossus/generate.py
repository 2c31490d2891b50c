"""`colossus generate RUN`: text from a trained run's newest intact checkpoint, with a KV cache.

The run's own config.toml rebuilds its model and tokenizer; only the model weights are read from the
checkpoint (colossus.train.checkpoint.load_model_weights). Generation is Transformer.generate: a
static KVCache of the training context, or with cache=False the context recomputed for every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from colossus.config import RunConfig, load_config
from colossus.data.tokenizer import Tokenizer, build_tokenizer
from colossus.errors import UserError
from colossus.models.grok import Transformer, build_model
from colossus.train.checkpoint import load_model_weights


@dataclass
class LoadedRun:
    config: RunConfig
    model: Transformer
    tokenizer: Tokenizer
    step: int


def load_run(run: Path, device: str = "cpu") -> LoadedRun:
    """The model of `run` (a folder written by `colossus train`) with its newest intact weights."""
    if not (run / "config.toml").is_file():
        raise UserError(f"{run} is not a run folder (no config.toml); give the --out folder of `colossus train`")
    config = load_config(run / "config.toml")
    model = build_model(config.model, device)
    step = load_model_weights(run / "checkpoints", model, what=f"colossus generate {run}")
    tokenizer = build_tokenizer(config.data, config.model.vocab_size)
    return LoadedRun(config, model.eval(), tokenizer, step)


def generate_text(loaded: LoadedRun, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 40, seed: int = 0, cache: bool = True) -> str:
    """The prompt and its continuation; temperature 0 is greedy."""
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 is greedy), got {temperature:g}")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    device = next(loaded.model.parameters()).device
    ids = loaded.tokenizer.encode(prompt) or [loaded.tokenizer.eos_id]
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([ids], device=device)
    out = loaded.model.generate(tokens, max_new_tokens, temperature, top_k, generator, cache=cache)
    return loaded.tokenizer.decode(out[0].tolist())
