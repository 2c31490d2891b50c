"""`colossus export`: a run's weights in the Hugging Face llama and mixtral layouts, checked against
transformers' own implementations (loaded from the exported folder, not our code)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from colossus.generate import load_run
from conftest import run_colossus, small_tables, write_toml

LLAMA_LIKE = dict(ffn_type="swiglu", norm="pre", attn_softcap=0.0, embedding_multiplier=1.0, output_multiplier=1.0)
MODELS = {
    "llama": dict(LLAMA_LIKE, n_experts=1, top_k=1, tie_embeddings=False),
    "mixtral": dict(LLAMA_LIKE, n_experts=4, top_k=2, router_renormalize=True),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> dict[str, Path]:
    """A short run of a dense pre-norm SwiGLU model and of such an MoE, and one of the default Grok-style
    micro model (sandwich norms, soft-cap, multipliers, GeGLU)."""
    folder = tmp_path_factory.mktemp("export")
    found = {}
    for name, model in {**MODELS, "grok": {}}.items():
        tables = small_tables(corpus_dir, folder / "cache", model=model, train={"steps": 4},
                              eval={"interval": 4, "sample_tokens": 0}, checkpoint={"interval": 4, "keep": 1})
        trained = run_colossus("train", str(write_toml(folder / f"{name}.toml", tables)), "--out", str(folder / name))
        assert trained.returncode == 0, trained.stderr[-2000:]
        found[name] = folder / name
    return found


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_transformers_loads_the_export_with_our_logits_and_greedy_tokens(runs: dict[str, Path], tmp_path: Path,
                                                                       arch: str) -> None:
    """transformers builds LlamaForCausalLM / MixtralForCausalLM from the exported folder; in fp32 its
    logits on the same tokens are within 1e-4 of ours and greedy generation gives the same tokens. The
    byte tokenizer goes out as a tokenizer.json whose ids are the bytes."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    result = run_colossus("export", str(runs[arch]), str(out), "--dtype", "fp32")  # --arch auto picks it
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["torch_dtype"] == "float32"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    ours = load_run(runs[arch])
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}[arch]
    tokens = torch.randint(0, ours.config.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (ours.model(tokens).logits - theirs(tokens).logits).abs().max().item()
    assert difference < 1e-4, difference
    greedy = ours.model.generate(tokens[:1, :12], 24, temperature=0)
    assert torch.equal(theirs.generate(tokens[:1, :12], max_new_tokens=24, do_sample=False, pad_token_id=0), greedy)
    text = "def f(x):\n    return x  # é"
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids == list(text.encode("utf-8"))


def test_bf16_export_shards_and_bad_input(runs: dict[str, Path], tmp_path: Path) -> None:
    """bf16 by default; a model the layout cannot express, an existing OUT or a folder that is no run is
    one line naming it, and nothing is written."""
    out = tmp_path / "bf16"
    assert run_colossus("export", str(runs["llama"]), str(out)).returncode == 0
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model-00001-of-00001.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16} and "lm_head.weight" in tensors
    assert len(tensors) == 2 * 9 + 3  # per layer: 2 norms, q k v o, gate up down; embedding, norm, head
    for args, words in ((("grok", "--arch", "mixtral"), "model.norm=sandwich"), (("llama", "--arch", "grok-1"), "needs geglu"),
                        (("mixtral", "--arch", "llama"), "n_experts=4"), (("llama", "--arch", "mixtral"), "n_experts=1")):
        result = run_colossus("export", str(runs[args[0]]), str(tmp_path / "refused"), *args[1:])
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "refused").exists()
    result = run_colossus("export", str(runs["llama"]), str(out))
    assert result.returncode == 2 and "exists" in result.stderr
    result = run_colossus("export", str(tmp_path), str(tmp_path / "x"))
    assert result.returncode == 2 and "not a run folder" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]  # no staging folder left behind


def grok_reference_logits(tensors: dict[str, torch.Tensor], config: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Grok-1's forward written from its published equations (xai-org/grok-1 model.py, as summarised in
    shared/reference/grok1.md) over the exported tensors and config.json, in fp32; no Colossus code."""
    t = {name: tensor.float() for name, tensor in tensors.items()}
    eps, heads, kv_heads, dim = config["rms_norm_eps"], config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    cap, k = config["max_attn_value"], config["num_experts_per_tok"]

    def rms(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale

    def rotate(x: torch.Tensor) -> torch.Tensor:  # RoPE, rotate-half pairs, base rope_theta
        half = dim // 2
        frequencies = config["rope_theta"] ** (-torch.arange(half, dtype=torch.float32) * 2 / dim)
        angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * frequencies[None]
        cos, sin = torch.cat([angles.cos()] * 2, -1)[None, :, None], torch.cat([angles.sin()] * 2, -1)[None, :, None]
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    batch, length = tokens.shape
    h = t["model.embed_tokens.weight"][tokens] * config["embedding_multiplier_scale"]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, t[p + "pre_attn_norm.scale"])
        q = rotate((x @ t[p + "attn.q_proj.weight"].T).view(batch, length, heads, dim))
        key = rotate((x @ t[p + "attn.k_proj.weight"].T).view(batch, length, kv_heads, dim))
        value = (x @ t[p + "attn.v_proj.weight"].T).view(batch, length, kv_heads, dim)
        key, value = (z.repeat_interleave(heads // kv_heads, dim=2) for z in (key, value))  # GQA
        scores = torch.einsum("bqhd,bkhd->bhqk", q, key) * config["attn_output_multiplier"]
        scores = (cap * torch.tanh(scores / cap)).masked_fill(~causal, float("-inf"))
        attended = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), value).reshape(batch, length, heads * dim)
        h = h + rms(attended @ t[p + "attn.o_proj.weight"].T, t[p + "post_attn_norm.scale"])
        x = rms(h, t[p + "pre_moe_norm.scale"])
        probs = (x @ t[p + "moe_block.gate.weight"].T).softmax(-1)  # gates: the plain probabilities
        gates, chosen = probs.topk(k, dim=-1)
        mixed = torch.zeros_like(x)
        for e in range(config["num_experts"]):
            e_ = p + f"moe_block.experts.{e}."
            out = (torch.nn.functional.gelu(x @ t[e_ + "linear.weight"].T, approximate="tanh")
                   * (x @ t[e_ + "linear_v.weight"].T)) @ t[e_ + "linear_1.weight"].T
            mixed = mixed + (gates * (chosen == e)).sum(-1, keepdim=True) * out
        h = h + rms(mixed, t[p + "post_moe_norm.scale"])
    return rms(h, t["model.norm.scale"]) @ t["lm_head.weight"].T * config["output_multiplier_scale"]


def test_grok1_export_has_the_reference_names_and_passes_the_reference_forward(runs: dict[str, Path],
                                                                                tmp_path: Path) -> None:
    """A Grok-style run (sandwich norms, soft-cap 30, multipliers, GeGLU experts, tied embeddings) goes out
    in hpcai-tech/grok-1's layout (auto picks it): every name and shape of the reference table, its config
    keys, and a forward written from Grok-1's equations over the exported tensors gives our logits."""
    from safetensors.torch import load_file

    out = tmp_path / "grok"
    result = run_colossus("export", str(runs["grok"]), str(out), "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Grok1ModelForCausalLM"] and config["model_type"] == "grok-1"
    ours = load_run(runs["grok"])
    cfg = ours.config.model
    assert config["max_attn_value"] == cfg.attn_softcap == 30.0 and config["embedding_multiplier_scale"] == 8.0
    assert math.isclose(config["attn_output_multiplier"], cfg.head_dim ** -0.5)
    tensors = {}
    for shard in sorted(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())):
        tensors.update(load_file(str(out / shard)))
    d, f, v = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    expected = {"model.embed_tokens.weight": (v, d), "model.norm.scale": (d,), "lm_head.weight": (v, d)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        expected.update({p + "attn.q_proj.weight": (cfg.n_heads * cfg.head_dim, d),
                         p + "attn.k_proj.weight": (cfg.n_kv_heads * cfg.head_dim, d),
                         p + "attn.v_proj.weight": (cfg.n_kv_heads * cfg.head_dim, d),
                         p + "attn.o_proj.weight": (d, cfg.n_heads * cfg.head_dim),
                         p + "moe_block.gate.weight": (cfg.n_experts, d)})
        expected.update({p + f"{norm}.scale": (d,) for norm in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm")})
        for e in range(cfg.n_experts):
            expected.update({p + f"moe_block.experts.{e}.linear.weight": (f, d),
                             p + f"moe_block.experts.{e}.linear_v.weight": (f, d),
                             p + f"moe_block.experts.{e}.linear_1.weight": (d, f)})
    assert {name: tuple(tensor.shape) for name, tensor in tensors.items()} == expected
    tokens = torch.randint(0, v, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (ours.model(tokens).logits - grok_reference_logits(tensors, config, tokens)).abs().max().item()
    assert difference < 1e-4, difference
