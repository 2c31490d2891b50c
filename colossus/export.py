"""`colossus export RUN OUT`: a run's newest intact weights as a Hugging Face checkpoint.

The layouts are those the ecosystem loads (transformers, vLLM, SGLang): `llama` for a dense pre-norm
SwiGLU model, `mixtral` for such an MoE and `grok-1` for a Grok-style one (colossus/hf.py holds their
names and config keys, shared with `colossus import`). A model with a feature these layouts lack
(Grok-1's multipliers, soft-cap or sandwich norms, GeGLU, capacity-limited routing, unnormalised top-k
gates) is refused with one line naming it.

OUT gets config.json, model-0000N-of-0000M.safetensors shards (about 5 GB each),
model.safetensors.index.json and tokenizer.json, written into a temporary folder that is renamed at
the end: a failure leaves nothing half-written, and an existing OUT is never touched. Weights are read
from the checkpoint one at a time, whatever layout wrote it, so memory holds a shard, not the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from colossus.errors import UserError
from colossus.files import staged_folder
from colossus.hf import Weight, choose_arch, hf_config, weight_shapes, weights

SHARD_BYTES = 5 * 10**9  # the shard size the Hub's own tools default to


class WeightReader:
    """Colossus weights read one at a time from a checkpoint (DCP reads only that tensor's chunks); the
    last one is kept, since an MoE's experts come one after another out of one stacked tensor."""

    def __init__(self, checkpoint: Path, shapes: dict[str, tuple[int, ...]]):
        self.checkpoint, self.shapes = checkpoint, shapes
        self.last: tuple[str, torch.Tensor] | None = None

    def __call__(self, name: str) -> torch.Tensor:
        from colossus.train.checkpoint import read_weight

        if self.last is None or self.last[0] != name:
            self.last = None  # freed before the next is read: one Colossus tensor at a time
            self.last = (name, read_weight(self.checkpoint, name, self.shapes[name]))
        return self.last[1]


def hf_tensors(weight: Weight, read) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for one Colossus weight, `read(name)` giving the Colossus tensor."""
    tensor = read(weight.ours)
    if weight.experts:
        for e, name in enumerate(weight.names()):
            yield name, tensor[e].t()
    else:
        yield weight.theirs, tensor


def plan_shards(table: list[Weight], shapes: dict[str, tuple[int, ...]], itemsize: int,
                shard_bytes: int) -> list[list[Weight]]:
    """The weights of each shard, in order, each shard at most about shard_bytes (sizes are known from the
    shapes, so shard N of M is named before any tensor is read)."""
    shards: list[list[Weight]] = [[]]
    size = 0
    for weight in table:
        nbytes = math.prod(shapes[weight.ours]) * itemsize
        if size and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(weight)
        size += nbytes
    return shards


def write_shards(shards: list[list[Weight]], read, folder: Path, dtype: torch.dtype) -> dict:
    """Write each shard as its tensors are read, holding one shard at a time; returns the index."""
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors, seen = {}, set()
        for weight in shard:
            for name, tensor in hf_tensors(weight, read):
                tensor = tensor.detach().to(dtype).contiguous()
                if tensor.data_ptr() in seen:  # a tied weight under two names: safetensors stores no aliases
                    tensor = tensor.clone()
                seen.add(tensor.data_ptr())
                tensors[name] = tensor
                total += tensor.numel() * tensor.element_size()
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
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


def export_run(run: Path, out: Path, arch: str = "auto", dtype: str = "bf16", shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the run's newest intact weights to `out` in the Hugging Face layout `arch`, a weight at a time
    (memory holds one shard and one Colossus tensor, not the model)."""
    from colossus.config import load_config
    from colossus.data.tokenizer import build_tokenizer
    from colossus.train.checkpoint import newest_intact

    if dtype not in ("bf16", "fp32"):
        raise UserError(f"--dtype {dtype!r}: use bf16 or fp32")
    if shard_bytes <= 0:
        raise UserError(f"--shard-gb must be above 0, got {shard_bytes / 1e9:g}")
    if out.exists():
        raise UserError(f"{out} exists; give a new folder (export never writes into or over an existing one)")
    if not (run / "config.toml").is_file():
        raise UserError(f"{run} is not a run folder (no config.toml); give the --out folder of `colossus train`")
    config = load_config(run / "config.toml")
    chosen = choose_arch(config.model, arch)
    _, checkpoint = newest_intact(run / "checkpoints", f"colossus export {run}")
    tokenizer = build_tokenizer(config.data, config.model.vocab_size)
    shapes = weight_shapes(config.model)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    table = weights(config.model, chosen)
    with staged_folder(out) as staging:
        shards = plan_shards(table, shapes, torch_dtype.itemsize, shard_bytes)
        index = write_shards(shards, WeightReader(checkpoint, shapes), staging, torch_dtype)
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        hf = hf_config(config.model, chosen, tokenizer.eos_id, "bfloat16" if dtype == "bf16" else "float32")
        (staging / "config.json").write_text(json.dumps(hf, indent=1))
        (staging / "tokenizer.json").write_text(tokenizer_json(tokenizer))
    return out
