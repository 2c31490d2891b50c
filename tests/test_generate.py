"""Generation with a KV cache (Transformer.generate, colossus generate): the cache changes the speed,
never the tokens."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from colossus.models.grok import KVCache, build_model
from colossus.models.presets import get_preset
from conftest import run_colossus, small_tables, write_toml


@pytest.mark.parametrize("softcap, experts", [(30.0, 4), (0.0, 1)])
def test_cached_generation_is_the_cache_free_generation(softcap: float, experts: int) -> None:
    """Greedy and seeded sampling give the same tokens with and without the cache, for a soft-capped MoE
    (written-out attention) and a dense model on fused SDPA, also past the training context, where each
    token recomputes the window."""
    cfg = replace(get_preset("tiny"), seq_len=48, attn_softcap=softcap, n_experts=experts, top_k=min(2, experts))
    model = build_model(cfg, seed=1).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    greedy = model.generate(prompt, 30, temperature=0, cache=False)  # 60 tokens: 12 past the context
    assert torch.equal(model.generate(prompt, 30, temperature=0, cache=True), greedy)
    assert not torch.equal(greedy[:, 30:], greedy[:, 29:59])  # it is not repeating one token
    sampled = [model.generate(prompt, 12, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(5),
                              cache=cache) for cache in (False, True)]
    assert torch.equal(*sampled)


def test_the_cache_is_one_allocation_filled_in_place() -> None:
    """A prompt then single tokens: the keys and values land in one buffer (allocated at the first write,
    never again) at their positions, and the logits equal the full forward's."""
    cfg = replace(get_preset("tiny"), seq_len=32)
    model = build_model(cfg, seed=2).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    cache = KVCache(cfg.n_layers, cfg.seq_len)
    with torch.no_grad():
        first = model(tokens[:, :16], cache=cache).logits
        buffer = cache.buffer
        steps = [model(tokens[:, i:i + 1], cache=cache).logits for i in range(16, 20)]
        full = model(tokens).logits
    assert cache.buffer is buffer and buffer.shape == (cfg.n_layers, 2, 1, cfg.n_kv_heads, 32, cfg.head_dim)
    assert cache.length == 20 and buffer[:, :, :, :, 20:].abs().sum() == 0 and buffer[:, :, :, :, :20].abs().sum() > 0
    torch.testing.assert_close(first, full[:, :16], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 16:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="holds 32 positions"):
        model(torch.zeros(1, 13, dtype=torch.long), cache=cache)


def test_generate_command(tmp_path: Path, corpus_dir: Path) -> None:
    """`colossus generate RUN --prompt TEXT` prints the prompt and its continuation from the run's newest
    checkpoint; greedy output equals --no-cache; bad input is one line naming it."""
    run = tmp_path / "run"
    config = write_toml(tmp_path / "micro.toml", small_tables(corpus_dir, tmp_path / "cache"))
    trained = run_colossus("train", str(config), "--out", str(run))
    assert trained.returncode == 0, trained.stderr[-2000:]
    args = ("generate", str(run), "--prompt", "def ", "--max-new-tokens", "90", "--temperature", "0")
    cached, uncached = run_colossus(*args), run_colossus(*args, "--no-cache")
    assert cached.returncode == 0, cached.stderr[-2000:]
    assert cached.stdout == uncached.stdout and cached.stdout.startswith("def ")
    assert len(cached.stdout.rstrip("\n")) > len("def ")
    sampled = run_colossus("generate", str(run), "--prompt", "import ", "--max-new-tokens", "20", "--seed", "3")
    assert sampled.returncode == 0 and sampled.stdout.startswith("import ")
    for bad, words in (((str(tmp_path),), "not a run folder"), ((str(run), "--top-k", "0"), "--top-k"),
                       ((str(run), "--device", "tpu"), "--device")):
        result = run_colossus("generate", *bad, "--prompt", "x")
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
    (run / "checkpoints" / "step-12" / "COMMITTED").unlink()
    (run / "checkpoints" / "step-8" / "COMMITTED").unlink()
    result = run_colossus("generate", str(run), "--prompt", "x")
    assert result.returncode == 2 and "checkpoint" in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.cp=2"])
def test_end_of_run_sample_under_tensor_and_context_parallelism(tmp_path: Path, corpus_dir: Path, layout: str) -> None:
    """The trainer's end-of-run sample goes through the KV cache on a 2-rank tensor-parallel model
    (sequence parallelism lays out the attention's positional inputs) and a context-parallel one (whose
    attention must not gather keys the cache already holds whole)."""
    from ranks import finish_training, start_training

    config = write_toml(tmp_path / "micro.toml", small_tables(corpus_dir, tmp_path / "cache", train={"steps": 4},
                                                              eval={"interval": 4, "sample_tokens": 12}))
    finish_training(start_training([str(config), "--out", str(tmp_path / "run"), "--set", layout], tmp_path, 2))
    sample = json.loads((tmp_path / "run" / "summary.json").read_text())["sample"]
    assert sample.startswith("def") and len(sample) > len("def")
