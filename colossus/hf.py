"""The Hugging Face layouts Colossus writes and reads: `llama` (LlamaForCausalLM), `mixtral`
(MixtralForCausalLM, the released checkpoints' per-expert w1/w2/w3 names) and `grok-1`
(Grok1ModelForCausalLM, hpcai-tech/grok-1's names and config keys, which vLLM and SGLang load).

Both directions read the same two tables: `hf_config` / `model_table` translate config.json to the
[model] table and back, and `weights` pairs each Colossus weight with its Hugging Face name(s).
Colossus's rotary embedding is already in their rotate-half layout and its RMSNorm is theirs, so
tensors only change names, except that an MoE's experts are stacked here ([experts, in, out]) and
separate there (each expert's [out, in]).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colossus.errors import UserError
from colossus.modelconfig import ModelConfig

ARCHES = ("auto", "llama", "mixtral", "grok-1")
CLASSES = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "mixtral", "Grok1ModelForCausalLM": "grok-1",
           "Grok1ForCausalLM": "grok-1"}
MODEL_TYPES = {"llama": "llama", "mixtral": "mixtral", "grok-1": "grok-1"}


# ------------------------------------------------------------------ which models fit which layout
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


# ------------------------------------------------------------------ config.json, both ways
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


def read_hf_config(folder: Path, arch: str) -> tuple[dict, str]:
    """FOLDER/config.json and its layout; `arch` (not auto) must be the one the file declares."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give a Hugging Face model folder (config.json and safetensors)")
    if not path.is_file():
        raise UserError(f"{folder} has no config.json; give a Hugging Face model folder (config.json and safetensors)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    declared = [CLASSES[name] for name in config.get("architectures") or [] if name in CLASSES]
    declared += [MODEL_TYPES[config["model_type"]]] if config.get("model_type") in MODEL_TYPES else []
    if not declared:
        raise UserError(f"{path}: architectures {config.get('architectures')} / model_type {config.get('model_type')!r} "
                        f"is none of {', '.join(sorted(CLASSES))}; Colossus reads the llama, mixtral and grok-1 layouts")
    if arch not in ARCHES:
        raise UserError(f"--arch {arch!r}: use one of {', '.join(ARCHES)}")
    if arch != "auto" and arch != declared[0]:
        raise UserError(f"{path} declares a {declared[0]} checkpoint ({', '.join(config.get('architectures') or [])}), "
                        f"not {arch}; use --arch {declared[0]} or auto")
    return config, declared[0]


def model_table(config: dict, arch: str, where: Path, name: str) -> dict[str, Any]:
    """The [model] table of a checkpoint's config.json (the inverse of hf_config); a key whose value this
    model cannot express is refused with one line naming it."""
    def need(key: str) -> Any:
        if key not in config:
            raise UserError(f"{where} has no {key!r}; a {arch} config.json needs it")
        return config[key]

    def refuse(key: str, allowed: Any, why: str) -> None:
        if config.get(key, allowed) != allowed:
            raise UserError(f"{where}: {key}={json.dumps(config[key])} is not supported ({why}); "
                            "convert a checkpoint without it")

    heads = need("num_attention_heads")
    head_dim = config.get("head_dim") or need("hidden_size") // heads
    table = dict(name=str(config.get("colossus_model") or name), n_layers=need("num_hidden_layers"),
                 d_model=need("hidden_size"), n_heads=heads, n_kv_heads=config.get("num_key_value_heads") or heads,
                 head_dim=head_dim, ffn_dim=need("intermediate_size"), vocab_size=need("vocab_size"),
                 seq_len=need("max_position_embeddings"), norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                 rope_base=float(config.get("rope_theta", 10000.0)), capacity_factor=0.0, moe_balance="global_batch")
    refuse("rope_scaling", None, "Colossus's rotary embedding has no scaling")
    if arch == "grok-1":
        multiplier = float(config.get("attn_output_multiplier", head_dim ** -0.5))
        if not math.isclose(multiplier, head_dim ** -0.5, rel_tol=1e-6):
            raise UserError(f"{where}: attn_output_multiplier={multiplier:g} is not 1/sqrt(head_dim)="
                            f"{head_dim ** -0.5:g}, the only attention scale Colossus has")
        experts = config.get("num_experts") or need("num_local_experts")
        return dict(table, ffn_type="geglu", norm="sandwich", n_experts=experts, top_k=need("num_experts_per_tok"),
                    attn_softcap=float(need("max_attn_value")),
                    embedding_multiplier=float(need("embedding_multiplier_scale")),
                    output_multiplier=float(need("output_multiplier_scale")), router_renormalize=False,
                    tie_embeddings=bool(config.get("tie_word_embeddings", True)),
                    moe_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.001)))
    refuse("hidden_act", "silu", "llama and mixtral layouts here are SwiGLU")
    refuse("attention_bias", False, "Colossus's projections have no bias")
    refuse("mlp_bias", False, "Colossus's projections have no bias")
    refuse("sliding_window", None, "Colossus attends to the whole context")
    dense = dict(table, ffn_type="swiglu", norm="pre", attn_softcap=0.0, embedding_multiplier=1.0,
                 output_multiplier=1.0, tie_embeddings=bool(config.get("tie_word_embeddings", False)))
    if arch == "llama":
        return dict(dense, n_experts=1, top_k=1)
    return dict(dense, n_experts=need("num_local_experts"), top_k=need("num_experts_per_tok"),
                router_renormalize=True, moe_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.01)))


# ------------------------------------------------------------------ weights, both ways
@dataclass(frozen=True)
class Weight:
    """One Colossus weight and where it lives in the Hugging Face layout."""

    ours: str  # the name in Colossus's (whole-model) state dict
    theirs: str  # the Hugging Face name; with experts, "{e}" stands for the expert's index
    experts: int = 0  # > 0: ours is stacked [experts, in, out], theirs one [out, in] tensor per expert
    copy: bool = False  # a tied weight written a second time (safetensors stores no aliases); read only to check

    def names(self) -> list[str]:
        return [self.theirs.format(e=e) for e in range(self.experts)] if self.experts else [self.theirs]

    def their_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of each Hugging Face tensor of a Colossus weight of shape `ours`."""
        return (ours[2], ours[1]) if self.experts else tuple(ours)


def weights(cfg: ModelConfig, arch: str) -> list[Weight]:
    """Every weight of the model in the `arch` layout, in layer order."""
    table = [Weight("embedding.weight", "model.embed_tokens.weight")]
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        if arch == "grok-1":  # hpcai-tech/grok-1 (shared/reference/grok1-hf-format.md)
            table += [Weight(ours + f"attention.w{n}.weight", theirs + f"attn.{n}_proj.weight") for n in "qkvo"]
            table += [Weight(ours + f"{mine}.weight", theirs + f"{hub}.scale") for mine, hub in (
                ("attention_norm", "pre_attn_norm"), ("post_attention_norm", "post_attn_norm"),
                ("ffn_norm", "pre_moe_norm"), ("post_ffn_norm", "post_moe_norm"))]
            table.append(Weight(ours + "ffn.router.weight", theirs + "moe_block.gate.weight"))
            # experts' linear is the gate (GELU'd), linear_v the up and linear_1 the down projection
            table += _experts(ours, theirs + "moe_block.experts", ("linear", "linear_v", "linear_1"), cfg.n_experts)
            continue
        table.append(Weight(ours + "attention_norm.weight", theirs + "input_layernorm.weight"))
        table += [Weight(ours + f"attention.w{n}.weight", theirs + f"self_attn.{n}_proj.weight") for n in "qkvo"]
        table.append(Weight(ours + "ffn_norm.weight", theirs + "post_attention_layernorm.weight"))
        if arch == "llama":
            table += [Weight(ours + f"ffn.{mine}.weight", theirs + f"mlp.{hub}.weight")
                      for mine, hub in (("w_in", "gate_proj"), ("w_up", "up_proj"), ("w_out", "down_proj"))]
        else:
            table.append(Weight(ours + "ffn.router.weight", theirs + "block_sparse_moe.gate.weight"))
            table += _experts(ours, theirs + "block_sparse_moe.experts", ("w1", "w3", "w2"), cfg.n_experts)
    if arch == "grok-1":
        table.append(Weight("norm.weight", "model.norm.scale"))
        table.append(Weight("embedding.weight", "lm_head.weight", copy=True) if cfg.tie_embeddings
                     else Weight("output.weight", "lm_head.weight"))
        return table
    table.append(Weight("norm.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        table.append(Weight("output.weight", "lm_head.weight"))
    return table


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every weight of the whole model, by its Colossus name (built on the meta device)."""
    from colossus.models.grok import build_model

    return {name: tuple(tensor.shape) for name, tensor in build_model(cfg, "meta").state_dict().items()}


def _experts(ours: str, theirs: str, names: tuple[str, str, str], n_experts: int) -> list[Weight]:
    """The gate, up and down projections of every expert (ours: ffn.experts.w_in, w_up, w_out)."""
    return [Weight(ours + f"ffn.experts.{mine}", theirs + ".{e}." + hub + ".weight", experts=n_experts)
            for mine, hub in zip(("w_in", "w_up", "w_out"), names)]
