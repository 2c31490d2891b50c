"""`colossus export` and `colossus import`: a run's weights in the Hugging Face llama, mixtral and grok-1
layouts, checked against transformers' own implementations (loaded from the exported folder, not our
code) and a Grok-1 forward written from its equations; and back in, bit for bit, streamed."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colossus.config import load_config
from colossus.generate import load_run
from conftest import REPO, run_colossus, small_tables, write_toml

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


# ---------------------------------------------------------------------------------------- import
def _losses(run: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in row]


def _rank_files(checkpoint: Path) -> set[str]:
    """The ranks whose files DCP's metadata names (files are __RANK_N.distcp)."""
    import torch.distributed.checkpoint as dcp

    storage = dcp.FileSystemReader(str(checkpoint)).read_metadata().storage_data
    return {info.relative_path.split("_")[2] for info in storage.values()}


def test_export_then_import_gives_the_same_weights_logits_generation_and_fine_tune(runs: dict[str, Path],
                                                                                   tmp_path: Path) -> None:
    """A Grok-style run exported in fp32 and imported as the shards of a 4-rank layout (dp_shard 2 x tp 2)
    is the same model bit for bit: weights, logits and greedy text; and a fine-tune from the import loses
    exactly what a fine-tune from the original run loses, step by step."""
    hf, imported = tmp_path / "hf", tmp_path / "imported"
    assert run_colossus("export", str(runs["grok"]), str(hf), "--dtype", "fp32").returncode == 0
    result = run_colossus("import", str(hf), "--out", str(imported), "--set", "parallel.tp=2", "--world-size", "4")
    assert result.returncode == 0, result.stderr
    assert "dp_shard=2 x tp=2 (4 ranks" in result.stdout
    assert _rank_files(imported / "checkpoints" / "step-0") == {"0", "1", "2", "3"}  # each rank wrote its shards
    before = sorted(imported.rglob("*"))
    resumed = run_colossus("train", str(imported / "config.toml"), "--out", str(imported), "--steps", "1")
    assert resumed.returncode == 2 and "holds only the weights imported" in resumed.stderr, resumed.stderr[-2000:]
    assert "--set train.init_from=" in resumed.stderr and sorted(imported.rglob("*")) == before
    original, copy = load_run(runs["grok"]), load_run(imported)
    assert copy.config.model == original.config.model and copy.config.data.tokenizer == "byte"
    theirs = copy.model.state_dict()
    assert all(torch.equal(tensor, theirs[name]) for name, tensor in original.model.state_dict().items())
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(original.model(tokens).logits, copy.model(tokens).logits)
    texts = [run_colossus("generate", str(run), "--prompt", "def ", "--temperature", "0", "--max-new-tokens", "24")
             for run in (runs["grok"], imported)]
    assert texts[0].returncode == 0 and texts[0].stdout.startswith("def ") and texts[0].stdout == texts[1].stdout
    for parent in (runs["grok"], imported):
        tuned = run_colossus("train", str(runs["grok"] / "config.toml"), "--out", str(tmp_path / f"ft-{parent.name}"),
                             "--set", f"train.init_from={parent}", "--steps", "3", "--set", "log.interval=1",
                             "--set", "eval.sample_tokens=0")
        assert tuned.returncode == 0, tuned.stderr[-2000:]
    from_original, from_import = _losses(tmp_path / f"ft-{runs['grok'].name}"), _losses(tmp_path / "ft-imported")
    assert [step for step, _ in from_original] == [1, 2, 3] and from_import == from_original


def test_llama_round_trip_in_bf16_is_exact(runs: dict[str, Path], tmp_path: Path) -> None:
    """bf16 out, in (to fp32 master weights) and out again gives the same tensors, config and tokenizer."""
    from safetensors.torch import load_file

    first, imported, second = tmp_path / "first", tmp_path / "imported", tmp_path / "second"
    assert run_colossus("export", str(runs["llama"]), str(first)).returncode == 0
    result = run_colossus("import", str(first), "--out", str(imported))
    assert result.returncode == 0 and "llama checkpoint" in result.stdout, result.stderr
    assert run_colossus("export", str(imported), str(second)).returncode == 0
    shard = "model-00001-of-00001.safetensors"
    before, after = load_file(str(first / shard)), load_file(str(second / shard))
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    for name in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
        assert (first / name).read_text() == (second / name).read_text(), name


def _synthetic_grok1(folder: Path) -> int:
    """A 4-layer checkpoint in the released Grok-1's Hugging Face format (hpcai-tech/grok-1's config keys,
    without head_dim or rope_theta; bf16 shards, one per layer) at d_model 1024, 8 experts of 4096, a 32K
    vocabulary: 850 MB. Returns its tensor bytes."""
    from safetensors.torch import save_file

    layers, d, f, experts, vocab, heads, kv = 4, 1024, 4096, 8, 32768, 8, 2
    generator = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    folder.mkdir()
    weight_map, total = {}, 0
    shards = {"model-00000.safetensors": {"model.embed_tokens.weight": weight(vocab, d),
                                          "model.norm.scale": weight(d) + 1}}
    for i in range(layers):
        p = f"model.layers.{i}."
        layer = {p + "attn.q_proj.weight": weight(d, d), p + "attn.k_proj.weight": weight(kv * d // heads, d),
                 p + "attn.v_proj.weight": weight(kv * d // heads, d), p + "attn.o_proj.weight": weight(d, d),
                 p + "moe_block.gate.weight": weight(experts, d)}
        layer.update({p + f"{norm}.scale": weight(d) + 1
                      for norm in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm")})
        for e in range(experts):
            layer.update({p + f"moe_block.experts.{e}.linear.weight": weight(f, d),
                          p + f"moe_block.experts.{e}.linear_v.weight": weight(f, d),
                          p + f"moe_block.experts.{e}.linear_1.weight": weight(d, f)})
        shards[f"model-{i + 1:05d}.safetensors"] = layer
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Grok1ModelForCausalLM"], "model_type": "grok-1", "vocab_size": vocab, "hidden_size": d,
        "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "attn_output_multiplier": (d // heads) ** -0.5, "max_attn_value": 30.0, "embedding_multiplier_scale": d ** 0.5,
        "output_multiplier_scale": 3 ** -0.5, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True, "num_experts": experts, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16"}))
    return total


def _capped(limit: int, *args: str) -> subprocess.CompletedProcess:
    """A Python process whose data memory (heap and private mappings: RLIMIT_DATA) is capped at `limit`."""
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, preexec_fn=cap, timeout=600,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_import_and_export_stream_grok1_format_under_a_memory_cap_below_the_checkpoint(tmp_path: Path) -> None:
    """An 850 MB Grok-1-format checkpoint becomes a 1.7 GB fp32 DCP checkpoint in a process whose memory
    is capped at 3/4 of the checkpoint, a cap that reading the checkpoint whole does not fit; the
    imported weights are the checkpoint's, experts stacked and transposed, and config.toml has its model.
    Exported again under a cap below its size, it is the same checkpoint."""
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from safetensors.torch import load_file

    hf, imported = tmp_path / "grok-1", tmp_path / "run"
    total = _synthetic_grok1(hf)
    limit = total * 3 // 4
    whole = _capped(limit, "-c", "import sys, glob; from safetensors.torch import load_file; "
                    "kept = [load_file(f) for f in sorted(glob.glob(sys.argv[1] + '/*.safetensors'))]", str(hf))
    assert whole.returncode != 0 and "memory" in whole.stderr.lower()  # the cap binds
    result = _capped(limit, "-m", "colossus", "import", str(hf), "--out", str(imported))
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_config(imported / "config.toml").model
    assert (model.head_dim, model.rope_base, model.embedding_multiplier, model.n_experts, model.ffn_type,
            model.norm, model.tie_embeddings) == (128, 10000.0, 32.0, 8, "geglu", "sandwich", True)
    wanted = {"embedding.weight": torch.empty(32768, 1024), "layers.3.ffn.experts.w_out": torch.empty(8, 4096, 1024),
              "layers.2.post_ffn_norm.weight": torch.empty(1024)}
    dcp.load({"train": {"model": wanted}}, checkpoint_id=str(imported / "checkpoints" / "step-0"), no_dist=True)
    first, last, third = (load_file(str(hf / f"model-{i:05d}.safetensors")) for i in (0, 4, 3))
    assert torch.equal(wanted["embedding.weight"], first["model.embed_tokens.weight"].float())
    for e in range(8):
        assert torch.equal(wanted["layers.3.ffn.experts.w_out"][e],
                           last[f"model.layers.3.moe_block.experts.{e}.linear_1.weight"].float().t())
    assert torch.equal(wanted["layers.2.post_ffn_norm.weight"], third["model.layers.2.post_moe_norm.scale"].float())
    del wanted, first, last, third
    # And out again, a weight at a time into 50 MB shards, under a cap of 7/8 of the checkpoint it writes
    # (the fp32 model it reads is 1.7 GB; one stacked expert weight, 134 MB, is read whole): every tensor
    # comes back bit for bit (bf16 -> fp32 -> bf16), with the tied output written as its own copy.
    exported = tmp_path / "exported"
    result = _capped(total * 7 // 8, "-m", "colossus", "export", str(imported), str(exported), "--shard-gb", "0.05")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    original = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(written) == set(original) | {"lm_head.weight"} and len(set(written.values())) > 10
    for file in sorted(set(original.values())):
        source = load_file(str(hf / file))
        for name, tensor in source.items():
            with safe_open(str(exported / written[name]), framework="pt") as handle:
                assert torch.equal(handle.get_tensor(name), tensor), name
    with safe_open(str(exported / written["lm_head.weight"]), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("lm_head.weight"), load_file(str(hf / "model-00000.safetensors"))["model.embed_tokens.weight"])


def test_import_bad_input_is_one_line_and_leaves_nothing(runs: dict[str, Path], tmp_path: Path) -> None:
    """No config.json, another layout than --arch, a missing shard, a tensor of the wrong shape, a layout
    the model cannot take and an existing RUN each stop with one line naming the file or tensor; no
    run folder or staging folder is left."""
    from safetensors.torch import load_file, save_file

    hf = tmp_path / "hf"
    assert run_colossus("export", str(runs["llama"]), str(hf)).returncode == 0
    shard = hf / "model-00001-of-00001.safetensors"
    bad_shape, no_shard = tmp_path / "bad-shape", tmp_path / "no-shard"
    shutil.copytree(hf, bad_shape)
    tensors = load_file(str(shard))
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1].clone()
    save_file(tensors, str(bad_shape / shard.name))
    shutil.copytree(hf, no_shard)
    (no_shard / shard.name).unlink()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    cases = [((str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")), "nowhere is not a folder"),
             ((str(runs["llama"]), "--out", str(tmp_path / "out")), "has no config.json"),
             ((str(hf), "--out", str(tmp_path / "out"), "--arch", "grok-1"), "declares a llama checkpoint"),
             ((str(no_shard), "--out", str(tmp_path / "out")), f"shard {no_shard / shard.name} is missing"),
             ((str(bad_shape), "--out", str(tmp_path / "out")), "tensor model.layers.1.mlp.up_proj.weight in"),
             ((str(hf), "--out", str(tmp_path / "out"), "--set", "parallel.tp=3", "--world-size", "3"), "tp"),
             ((str(hf), "--out", str(existing)), "exists")]
    for args, words in cases:
        result = run_colossus("import", *args)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and (existing / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-shape", "existing", "hf", "no-shard"]
