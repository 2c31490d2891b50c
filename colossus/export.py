"""`colossus export RUN OUT`: a run's newest intact weights as a Hugging Face checkpoint.

The layouts are those the ecosystem loads (transformers, vLLM, SGLang): `llama` for a dense pre-norm
SwiGLU model, `mixtral` for such an MoE and `grok-1` for a Grok-style one (colossus/hf.py holds their
names and config keys, shared with `colossus import`). A model with a feature these layouts lack
(Grok-1's multipliers, soft-cap or sandwich norms, GeGLU, capacity-limited routing, unnormalised top-k
gates) is refused with one line naming it.

OUT gets config.json, model-0000N-of-0000M.safetensors shards (about 5 GB each),
model.safetensors.index.json and tokenizer.json, written into a temporary folder that is renamed at
the end: a failure leaves nothing half-written, and an existing OUT is never touched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from colossus.errors import UserError
from colossus.files import staged_folder
from colossus.hf import choose_arch, hf_config, weights
from colossus.modelconfig import ModelConfig

SHARD_BYTES = 5 * 10**9  # the shard size the Hub's own tools default to


def hf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every weight of a colossus state dict, in layer order."""
    for weight in weights(cfg, arch):
        tensor = state[weight.ours]
        if weight.experts:
            for e, name in enumerate(weight.names()):
                yield name, tensor[e].t()
        else:
            yield weight.theirs, tensor


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
    with staged_folder(out) as staging:
        state = loaded.model.state_dict()
        index = write_shards(hf_tensors(state, loaded.config.model, chosen), staging, torch_dtype)
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        config = hf_config(loaded.config.model, chosen, loaded.tokenizer.eos_id,
                           "bfloat16" if dtype == "bf16" else "float32")
        (staging / "config.json").write_text(json.dumps(config, indent=1))
        (staging / "tokenizer.json").write_text(tokenizer_json(loaded.tokenizer))
    return out
