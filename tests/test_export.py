"""`colossus export`: a run's weights in the Hugging Face llama and mixtral layouts, checked against
transformers' own implementations (loaded from the exported folder, not our code)."""

from __future__ import annotations

import json
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
    for args, words in ((("grok", "--arch", "mixtral"), "model.norm=sandwich"), (("grok",), "attn_softcap"),
                        (("mixtral", "--arch", "llama"), "n_experts=4"), (("llama", "--arch", "mixtral"), "n_experts=1")):
        result = run_colossus("export", str(runs[args[0]]), str(tmp_path / "refused"), *args[1:])
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "refused").exists()
    result = run_colossus("export", str(runs["llama"]), str(out))
    assert result.returncode == 2 and "exists" in result.stderr
    result = run_colossus("export", str(tmp_path), str(tmp_path / "x"))
    assert result.returncode == 2 and "not a run folder" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]  # no staging folder left behind
