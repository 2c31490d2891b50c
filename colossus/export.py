"""`colossus export RUN OUT`: a run's newest intact weights as a Hugging Face checkpoint.

The layouts are those the ecosystem loads (transformers, vLLM, SGLang): `llama` (LlamaForCausalLM) for a
dense pre-norm SwiGLU model, `mixtral` (MixtralForCausalLM, the per-expert w1/w2/w3 names of the
released checkpoints) for such an MoE, and `grok-1` (Grok1ModelForCausalLM, hpcai-tech/grok-1's names
and config keys, which vLLM and SGLang load) for a Grok-style one. Colossus's rotary embedding is already in their rotate-half
layout and its RMSNorm is theirs, so the tensors go out as they are, renamed (experts transposed from
the stacked [experts, in, out] to each expert's [out, in]). A model with a feature these layouts lack
(Grok-1's multipliers, soft-cap or sandwich norms, GeGLU, capacity-limited routing, unnormalised top-k
gates) is refused with one line naming it.

OUT gets config.json, model-0000N-of-0000M.safetensors shards (about 5 GB each),
model.safetensors.index.json and tokenizer.json, written into a temporary folder that is renamed at
the end: a failure leaves nothing half-written, and an existing OUT is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from colossus.errors import UserError
from colossus.modelconfig import ModelConfig

SHARD_BYTES = 5 * 10**9  # the shard size the Hub's own tools default to
ARCHES = ("auto", "llama", "mixtral", "grok-1")


def unsupported(cfg: ModelConfig, arch: str) -> list[str]:
    """The features of `cfg` that the `arch` layout cannot express (empty: it can)."""
    if arch == "grok-1":
        return _not_grok(cfg)
    problems = []
    if arch == "llama" and cfg.is_moe:
        problems.append(f"model.n_experts={cfg.n_experts} (llama is dense; use --arch mixtral)")
    if arch == "mixtral":
        if not cfg.is_moe:
            problems.append("model.n_experts=1 (mixtral is a mixture of experts; use --arch llama)")
        if cfg.is_moe and not cfg.router_renormalize:
            problems.append("model.router_renormalize=false (mixtral renormalises the top-k gates)")
        if cfg.capacity_factor > 0:
            problems.append(f"model.capacity_factor={cfg.capacity_factor:g} (mixtral drops no tokens)")
        if cfg.moe_balance == "bias":
            problems.append("model.moe_balance=bias (mixtral's router has no selection bias)")
    if cfg.ffn_type != "swiglu":
        problems.append(f"model.ffn_type={cfg.ffn_type} (needs swiglu)")
    if cfg.norm != "pre":
        problems.append(f"model.norm={cfg.norm} (needs pre)")
    if cfg.attn_softcap != 0:
        problems.append(f"model.attn_softcap={cfg.attn_softcap:g} (needs 0)")
    for key in ("embedding_multiplier", "output_multiplier"):
        if getattr(cfg, key) != 1.0:
            problems.append(f"model.{key}={getattr(cfg, key):g} (needs 1)")
    return problems


def _not_grok(cfg: ModelConfig) -> list[str]:
    """Grok-1's layout: a sandwich-normed GeGLU MoE whose gates are the plain softmax probabilities
    (xai-org/grok-1 model.py), with its soft-cap and multipliers as config values."""
    problems = []
    if not cfg.is_moe:
        problems.append("model.n_experts=1 (grok-1 is a mixture of experts)")
    if cfg.ffn_type != "geglu":
        problems.append(f"model.ffn_type={cfg.ffn_type} (needs geglu)")
    if cfg.norm != "sandwich":
        problems.append(f"model.norm={cfg.norm} (needs sandwich)")
    if cfg.attn_softcap <= 0:
        problems.append("model.attn_softcap=0 (grok-1 soft-caps its attention)")
    if cfg.router_renormalize:
        problems.append("model.router_renormalize=true (grok-1's gates are the plain probabilities)")
    if cfg.capacity_factor > 0:
        problems.append(f"model.capacity_factor={cfg.capacity_factor:g} (grok-1 inference drops no tokens)")
    if cfg.moe_balance == "bias":
        problems.append("model.moe_balance=bias (grok-1's router has no selection bias)")
    return problems


def choose_arch(cfg: ModelConfig, arch: str) -> str:
    """The layout to write: `arch`, or with auto the first of llama, mixtral, grok-1 that fits."""
    if arch not in ARCHES:
        raise UserError(f"--arch {arch!r}: use one of {', '.join(ARCHES)}")
    if arch == "auto":
        reasons = {name: unsupported(cfg, name) for name in ARCHES[1:]}
        fitting = [name for name, problems in reasons.items() if not problems]
        if not fitting:
            raise UserError("the model fits no export layout: " + " | ".join(
                f"{name}: {'; '.join(problems)}" for name, problems in reasons.items()))
        return fitting[0]
    problems = unsupported(cfg, arch)
    if problems:
        raise UserError(f"the model does not fit the {arch} layout: {'; '.join(problems)}")
    return arch


def hf_config(cfg: ModelConfig, arch: str, eos_id: int, dtype: str) -> dict:
    if arch == "grok-1":  # the keys of hpcai-tech/grok-1's config.json, which vLLM and SGLang read
        return {"architectures": ["Grok1ModelForCausalLM"], "model_type": "grok-1", "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
                "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                "attn_output_multiplier": cfg.head_dim ** -0.5, "max_attn_value": cfg.attn_softcap,
                "embedding_multiplier_scale": cfg.embedding_multiplier, "output_multiplier_scale": cfg.output_multiplier,
                "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
                "tie_word_embeddings": cfg.tie_embeddings, "num_experts": cfg.n_experts,
                "num_experts_per_tok": cfg.top_k, "router_aux_loss_coef": cfg.moe_aux_loss_coef,
                "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "torch_dtype": dtype,
                "colossus_model": cfg.name}
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "bos_token_id": eos_id,
        "eos_token_id": eos_id, "torch_dtype": dtype, "colossus_model": cfg.name,
    }
    if arch == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "mlp_bias": False, **common}
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.top_k, "router_aux_loss_coef": cfg.moe_aux_loss_coef,
            "output_router_logits": False, "sliding_window": None, **common}


def hf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every weight of a colossus state dict, in layer order."""
    yield "model.embed_tokens.weight", state["embedding.weight"]
    if arch == "grok-1":
        yield from _grok_tensors(state, cfg)
        return
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        yield theirs + "input_layernorm.weight", state[ours + "attention_norm.weight"]
        for name in ("q", "k", "v", "o"):
            yield theirs + f"self_attn.{name}_proj.weight", state[ours + f"attention.w{name}.weight"]
        yield theirs + "post_attention_layernorm.weight", state[ours + "ffn_norm.weight"]
        if arch == "llama":
            for mine, hub in (("w_in", "gate_proj"), ("w_up", "up_proj"), ("w_out", "down_proj")):
                yield theirs + f"mlp.{hub}.weight", state[ours + f"ffn.{mine}.weight"]
        else:
            yield theirs + "block_sparse_moe.gate.weight", state[ours + "ffn.router.weight"]
            yield from _experts(state, ours, theirs + "block_sparse_moe.experts", ("w1", "w3", "w2"), cfg.n_experts)
    yield "model.norm.weight", state["norm.weight"]
    if not cfg.tie_embeddings:
        yield "lm_head.weight", state["output.weight"]


def _experts(state: dict[str, torch.Tensor], ours: str, theirs: str, names: tuple[str, str, str],
             n_experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Each expert's gate, up and down projection under `theirs`.E.NAME.weight, as [out, in] (ours are
    stacked [experts, in, out])."""
    for mine, hub in zip(("w_in", "w_up", "w_out"), names):
        stacked = state[ours + f"ffn.experts.{mine}"]
        for e in range(n_experts):
            yield f"{theirs}.{e}.{hub}.weight", stacked[e].t()


def _grok_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """hpcai-tech/grok-1's names (shared/reference/grok1-hf-format.md): attn.*_proj, moe_block.gate,
    experts' linear (gate, GELU'd), linear_v (up), linear_1 (down), the four sandwich norms' `scale`."""
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            yield theirs + f"attn.{name}_proj.weight", state[ours + f"attention.w{name}.weight"]
        for mine, hub in (("attention_norm", "pre_attn_norm"), ("post_attention_norm", "post_attn_norm"),
                          ("ffn_norm", "pre_moe_norm"), ("post_ffn_norm", "post_moe_norm")):
            yield theirs + f"{hub}.scale", state[ours + f"{mine}.weight"]
        yield theirs + "moe_block.gate.weight", state[ours + "ffn.router.weight"]
        yield from _experts(state, ours, theirs + "moe_block.experts", ("linear", "linear_v", "linear_1"), cfg.n_experts)
    yield "model.norm.scale", state["norm.weight"]
    yield "lm_head.weight", state["embedding.weight" if cfg.tie_embeddings else "output.weight"]


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path, dtype: torch.dtype,
                 shard_bytes: int = SHARD_BYTES) -> dict:
    """Shards of at most about shard_bytes and their index (weight_map: name -> file)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    seen: set[int] = set()
    for name, tensor in tensors:
        tensor = tensor.detach().to(dtype).contiguous()
        if tensor.data_ptr() in seen:  # a tied weight written under two names: safetensors stores no aliases
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
        total += nbytes
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


def tokenizer_json(tokenizer) -> str:
    """The run's tokenizer as tokenizer.json: a Hugging Face one as it is; the byte tokenizer as a
    byte-level BPE without merges whose ids are the byte values (so id 65 is still "A")."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    inner = getattr(tokenizer, "_tok", None)
    if inner is not None:
        return inner.to_str()
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of GPT-2's byte-level BPE
    byte_chars = _bytes_to_unicode()
    assert set(byte_chars.values()) == set(alphabet)
    byte_level = tokenizers.Tokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    byte_level.decoder = decoders.ByteLevel()
    return byte_level.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of each byte to a printable character (Radford et al. 2019, encoder.py), which the
    ByteLevel pre-tokenizer applies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def export_run(run: Path, out: Path, arch: str = "auto", dtype: str = "bf16") -> Path:
    """Write the run's newest intact weights to `out` in the Hugging Face layout `arch`."""
    from colossus.generate import load_run

    if dtype not in ("bf16", "fp32"):
        raise UserError(f"--dtype {dtype!r}: use bf16 or fp32")
    if out.exists():
        raise UserError(f"{out} exists; give a new folder (export never writes into or over an existing one)")
    loaded = load_run(run)
    chosen = choose_arch(loaded.config.model, arch)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = loaded.model.state_dict()
        index = write_shards(hf_tensors(state, loaded.config.model, chosen), staging, torch_dtype)
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        config = hf_config(loaded.config.model, chosen, loaded.tokenizer.eos_id,
                           "bfloat16" if dtype == "bf16" else "float32")
        (staging / "config.json").write_text(json.dumps(config, indent=1))
        (staging / "tokenizer.json").write_text(tokenizer_json(loaded.tokenizer))
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
