"""A Grok-1-style transformer in plain PyTorch, in reading order: norm, rotary embeddings, attention,
feed-forward, block, model. It knows nothing of parallelism; colossus.parallel wraps it from outside.

Grok-1 (xai-org/grok-1, model.py): tied embeddings scaled by sqrt(d_model) on the way in and logits
scaled by 1/sqrt(3) on the way out; grouped-query attention with RoPE, fp32 logits soft-capped at
30*tanh(x/30); "sandwich" RMSNorms around both sublayers; a mixture of 8 GeGLU experts, top-2.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from colossus import modelmath
from colossus.modelconfig import ModelConfig
from colossus.models import rng
from colossus.models.moe import MoE, RouterStats, activation


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in fp32 whatever the activation dtype (Grok-1)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bit for bit the written-out x * rsqrt(mean(x^2) + eps) * w on a CPU, where torch composes it from
        # the same ops (no faster there); one fused kernel where torch has one (CUDA).
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of position * base^(-2i/head_dim), [len(positions), head_dim], in the rotate-half
    layout (the two halves of the head dim form the rotated pairs, as in Grok-1 and Llama). The sin
    table's first half is negated so that apply_rope needs no negation of its own. `positions` are the
    tokens' places in their sequence: 0, 1, ... for a whole one, others for a part of one."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = torch.outer(positions.to(torch.float32), inv_freq)
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate [batch, heads, seq, head_dim] by position: x cos + (-x2, x1) sin, written as
    x cos + (x2, x1) signed_sin (exactly the same products, one tensor op fewer)."""
    x32 = x.float()
    swapped = x32.roll(x.shape[-1] // 2, dims=-1)
    return (x32 * cos + swapped * signed_sin).type_as(x)


class AttentionCore(nn.Module):
    """softmax(cap(q k^T / sqrt(head_dim)) + causal mask) v on [batch, heads, seq, head_dim]: the part of
    attention whose T x T scores selective recomputation recomputes rather than keeps (a module of
    its own so that it can be wrapped from outside). It picks one kernel per call (kernel_for)."""

    def __init__(self, cfg: ModelConfig, fused: bool = True):
        super().__init__()
        self.softcap = cfg.attn_softcap
        self.train_len = cfg.seq_len
        self.fused = fused  # scaled_dot_product_attention where the soft-cap allows; False: the math reference

    def kernel_for(self, q: torch.Tensor, k: torch.Tensor | None = None) -> str:
        """"sdpa" (no soft-cap: fused), "flex" (soft-capped on a GPU, keys of the training length: one
        FlexAttention kernel) or "math" (written out: the reference, the cap on a CPU, where
        FlexAttention has no backward, and generate()'s shorter contexts)."""
        if self.fused and self.softcap == 0:
            return "sdpa"
        if self.fused and q.is_cuda and (k if k is not None else q).shape[-2] == self.train_len:
            return "flex"
        return "math"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor | None = None,
                k_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the queries to the keys at their own position and before: the positions are
        those of q's and k's tokens in their sequence (None: q and k are one whole sequence)."""
        positions = None if q_positions is None else (q_positions, k_positions if k_positions is not None else q_positions)
        return self.attend(self.kernel_for(q, k), q, k, v, positions)

    def attend(self, kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if kernel == "sdpa":
            if positions is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            visible = positions[1].view(1, -1) <= positions[0].view(-1, 1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
        if kernel == "flex":
            return flex_softcapped_attention(q, k, v, self.softcap, positions=positions)
        return math_attention(q, k, v, self.softcap, positions)


class Attention(nn.Module):
    """Causal grouped-query attention: n_heads queries share n_kv_heads keys and values."""

    def __init__(self, cfg: ModelConfig, fused: bool = True):
        super().__init__()
        self.cfg = cfg
        self.core = AttentionCore(cfg, fused)
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor | None = None, cache: LayerCache | None = None) -> torch.Tensor:
        cfg = self.cfg
        batch, seq, _ = x.shape
        # Head counts come from the weights, so a tensor-parallel shard (fewer local heads) runs as is.
        q = self.wq(x).view(batch, seq, -1, cfg.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, -1, cfg.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, -1, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = self.core(q, k, v, positions)
        else:  # the keys and values of every earlier position come from the cache
            k, v = cache.extend(k, v)
            out = self.core(q, k, v, positions, torch.arange(k.shape[2], device=k.device))
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class KVCache:
    """Every layer's keys and values of up to `max_len` positions, in one allocation (made at the first
    write, in the shape and dtype of the keys: a tensor-parallel rank holds its own heads). Generation
    then computes each new token once instead of recomputing the context."""

    def __init__(self, n_layers: int, max_len: int):
        self.n_layers, self.max_len = n_layers, max_len
        self.buffer: torch.Tensor | None = None  # [layers, 2 (keys, values), batch, heads, max_len, head_dim]
        self.length = 0  # positions held before the current forward (Transformer.forward advances it)

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)


@dataclass
class LayerCache:
    cache: KVCache
    index: int

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys and values after the cached ones; return all of them."""
        cache = self.cache
        if cache.buffer is None:
            batch, heads, _, head_dim = k.shape
            cache.buffer = k.new_zeros(cache.n_layers, 2, batch, heads, cache.max_len, head_dim)
        start, end = cache.length, cache.length + k.shape[2]
        if end > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} positions; {end} asked")
        layer = cache.buffer[self.index]
        layer[0, :, :, start:end] = k
        layer[1, :, :, start:end] = v
        return layer[0, :, :, :end], layer[1, :, :, :end]


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float = 0.0,
                   positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention written out: fp32 logits / sqrt(head_dim), soft-capped to c*tanh(x/c) when
    softcap = c > 0 (Grok-1's core), masked, softmaxed, applied to v. It is the core wherever the
    soft-cap is on and, with softcap = 0, the plain reference that scaled_dot_product_attention is
    measured against (bench/throughput.py). Scales are applied to q, the small operand, rather than
    to the seq x seq logits. `positions` (of the queries, of the keys) place a part of a sequence in
    it: a query sees the keys at its own position and before (default: q and k are the same whole
    sequence)."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    # Group the query heads that share a key/value head, so k and v are broadcast, not copied.
    q = q.float().reshape(batch, kv_heads, heads // kv_heads * q_len, head_dim)
    # The causal mask as an added bias (0, or -inf above the diagonal): one pass over the seq x seq
    # logits that also applies the cap's factor, where masked_fill would copy them and fill them.
    if positions is None:
        bias = torch.full((q_len, k_len), float("-inf"), device=q.device).triu(1)
    else:
        q_positions, k_positions = positions
        bias = torch.zeros((q_len, k_len), device=q.device).masked_fill_(
            k_positions.view(1, -1) > q_positions.view(-1, 1), float("-inf"))
    with torch.autocast(q.device.type, enabled=False):  # autocast would compute these logits in bf16
        if softcap > 0:
            scores = (q / (math.sqrt(head_dim) * softcap)) @ k.float().transpose(-2, -1)
            # bias + c * tanh(s): the same products as masking c * tanh(s); tanh in place (a fresh matmul output)
            logits = torch.add(bias, scores.tanh_().view(batch, kv_heads, -1, q_len, k_len), alpha=softcap)
        else:
            logits = bias + ((q / math.sqrt(head_dim)) @ k.float().transpose(-2, -1)).view(batch, kv_heads, -1, q_len, k_len)
        probs = logits.softmax(dim=-1).view(batch, kv_heads, -1, k_len).to(v.dtype)
    return (probs @ v).view(batch, heads, q_len, head_dim)


def flex_softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float,
                              compiled: bool = True, positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """math_attention's soft-capped causal attention as one fused kernel (FlexAttention, compiled:
    Triton on a GPU): the cap is a score_mod applied to the kernel's fp32 scores, masked blocks are
    skipped, and nothing seq x seq is stored (written out, Grok-1's 8,192-token context would need
    ~13 GB of logits per sequence and layer). Training needs a GPU: FlexAttention has no CPU backward.
    `positions` as in math_attention (a query sees the keys at or before its own position)."""
    from torch.nn.attention.flex_attention import flex_attention

    attend = _compiled_flex_attention() if compiled else flex_attention
    if positions is None:
        mask = _causal_block_mask(q.shape[-2], str(q.device))
    else:
        mask = _positions_block_mask(*positions)
    return attend(q, k, v, score_mod=_softcap_score_mod(float(softcap)), block_mask=mask,
                  enable_gqa=k.shape[1] != q.shape[1])


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)  # eager FlexAttention is a slow reference


@functools.cache
def _softcap_score_mod(softcap: float):
    # One function object per cap, so that compiled code is reused rather than retraced per call.
    def cap(score: torch.Tensor, batch: torch.Tensor, head: torch.Tensor, q_index: torch.Tensor,
            kv_index: torch.Tensor) -> torch.Tensor:
        return softcap * torch.tanh(score / softcap)

    return cap


_POSITION_MASKS: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, object]] = {}


@torch.compiler.disable
def _positions_block_mask(q_positions: torch.Tensor, k_positions: torch.Tensor):
    """The block mask of `positions` (built once per pair of position tensors: their owners reuse them
    every step, and the cache keeps them, so an id is never reused for other positions)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (id(q_positions), id(k_positions))
    if key not in _POSITION_MASKS:
        mask = create_block_mask(lambda batch, head, q_index, kv_index: q_positions[q_index] >= k_positions[kv_index],
                                 None, None, len(q_positions), len(k_positions), device=str(q_positions.device))
        _POSITION_MASKS[key] = (q_positions, k_positions, mask)
    return _POSITION_MASKS[key][2]


@torch.compiler.disable  # built once per length and device, also when the block around it is compiled
@functools.cache
def _causal_block_mask(seq: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda batch, head, q_index, kv_index: q_index >= kv_index, None, None, seq, seq, device=device)


class FeedForward(nn.Module):
    """Dense FFN: GeGLU/SwiGLU out(act(gate x) * up x), or a plain GELU MLP out(gelu(in x)); no biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn_type = cfg.ffn_type
        self.w_in = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False) if cfg.ffn_type != "gelu" else None
        self.w_out = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = activation(self.ffn_type, self.w_in(x))
        if self.w_up is not None:
            hidden = hidden * self.w_up(x)
        return self.w_out(hidden)


class Block(nn.Module):
    """One transformer layer. "sandwich" (Grok-1): h += norm(attn(norm(h))); h += norm(ffn(norm(h))).
    "pre" (Llama, GPT): h += attn(norm(h)); h += ffn(norm(h))."""

    def __init__(self, cfg: ModelConfig, fused_attention: bool = True):
        super().__init__()
        sandwich = cfg.norm == "sandwich"
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg, fused_attention)
        self.post_attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if sandwich else nn.Identity()
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe else FeedForward(cfg)
        self.post_ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if sandwich else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> tuple[torch.Tensor, RouterStats | None]:
        # positions and cache as keywords: tensor parallelism lays out the positional inputs (parallel/tensor.py)
        attended = self.attention(self.attention_norm(x), cos, sin, positions=positions, cache=cache)
        h = x + self.post_attention_norm(attended)
        ffn_out = self.ffn(self.ffn_norm(h))
        stats = None
        if isinstance(ffn_out, tuple):
            ffn_out, stats = ffn_out
        return h + self.post_ffn_norm(ffn_out), stats


def scaled(x: torch.Tensor, multiplier: float) -> torch.Tensor:
    """x * multiplier, skipping the pass over x (and its backward) when the multiplier is 1."""
    return x if multiplier == 1.0 else x * multiplier


@dataclass
class ModelOutput:
    """What the model computes; the loss is computed from it outside the model (colossus.train.loss),
    so that a tensor-parallel model's vocabulary-sharded logits and a pipeline's last stage need no
    loss of their own inside the model."""

    logits: torch.Tensor  # [batch, seq, vocab]
    router_probs: torch.Tensor | None  # [n_layers, n_experts] mean router probability per expert (with gradient)
    expert_slots: torch.Tensor | None  # [n_layers, n_experts] (token, expert) slots routed to each expert
    z_loss: torch.Tensor | None  # mean over layers of the router z-loss (unweighted)


class Transformer(nn.Module):
    """Embedding, blocks, final norm and output projection. The blocks are keyed by their index, so
    that a pipeline stage, which is this model with the other stages' parts removed, keeps every
    parameter's name (and checkpoints stay the same whatever the stages)."""

    def __init__(self, cfg: ModelConfig, fused_attention: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(index): Block(cfg, fused_attention) for index in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        counted = sum(p.numel() for p in self.parameters())
        expected = modelmath.params_total(cfg)
        assert counted == expected, f"model has {counted} parameters but modelmath says {expected}"

    def initial_values(self, name: str, index: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """The initial values of parameter `name` at the flat element indices `index` (into the whole
        tensor): norm scales 1, every other weight Normal(0, init_std), output projections scaled by
        1/sqrt(2 n_layers) so the residual stream's variance does not grow with depth (GPT-2, Radford
        et al. 2019). Each value depends only on (seed, name, index) (models/rng.py), so a shard can be
        initialised alone and every way of sharding gives the same model."""
        if name.endswith("norm.weight"):
            return torch.ones(index.shape, device=index.device)
        leaf = name.split(".")[-2] if name.endswith(".weight") else name.split(".")[-1]
        std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers) if leaf in ("wo", "w_out") else self.cfg.init_std
        return rng.normal(rng.key_of(seed, name), index, std)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        for name, param in self.named_parameters():
            index = torch.arange(param.numel(), device=param.device).view(param.shape)
            param.copy_(self.initial_values(name, index, seed))
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """State that is not trained: the MoE routing biases of moe_balance = bias start at 0."""
        for name, buffer in self.named_buffers():
            if name.endswith("router_bias"):
                buffer.zero_()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> ModelOutput:
        """Logits and router statistics for [batch, seq] tokens; `positions` are their places in their
        sequences (default 0, 1, ...; a part of a sequence has others). With a `cache` the tokens follow
        the cached ones (their positions are next) and their keys and values are added to it."""
        if cache is not None:
            positions = torch.arange(cache.length, cache.length + tokens.shape[1], device=tokens.device)
        h, stats = self.blocks(self.embed(tokens), tokens.shape[1] if positions is None else positions, cache=cache)
        if cache is not None:
            cache.length += tokens.shape[1]
        return self.head(h, stats)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return scaled(self.embedding(tokens), self.cfg.embedding_multiplier)

    def blocks(self, h: torch.Tensor, positions: torch.Tensor | int, keys: list[str] | None = None,
               cache: KVCache | None = None) -> tuple[torch.Tensor, list[RouterStats]]:
        """The blocks named by `keys` (default: all, in order) over the residual stream h. `positions`:
        the tokens' places in their sequence, or the length of one whole sequence (0, 1, ..., with the
        plain causal mask; h itself may hold a part of it, split by sequence parallelism)."""
        whole = isinstance(positions, int)
        places = torch.arange(positions, device=h.device) if whole else positions
        cos, sin = rope_tables(places, self.cfg.head_dim, self.cfg.rope_base)
        given = None if whole else positions
        stats = []
        for key in keys if keys is not None else self.layers:
            h, layer_stats = self.layers[key](h, cos, sin, positions=given,
                                              cache=None if cache is None else cache.layer(int(key)))
            if layer_stats is not None:
                stats.append(layer_stats)
        return h, stats

    def head(self, h: torch.Tensor, stats: list[RouterStats]) -> ModelOutput:
        """Final norm and output projection (the tied embedding, or an output weight of its own)."""
        weight = self.embedding.weight if self.output is None else self.output.weight
        logits = scaled(F.linear(self.norm(h), weight), self.cfg.output_multiplier)
        if not stats:
            return ModelOutput(logits, None, None, None)
        return ModelOutput(logits, torch.stack([s.mean_probs for s in stats]), torch.stack([s.slots for s in stats]),
                           torch.stack([s.z_loss for s in stats]).mean())

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
                 top_k: int | None = 40, generator: torch.Generator | None = None, cache: bool = True) -> torch.Tensor:
        """Sample continuations of [batch, seq] prompts. With `cache`, a KVCache of the training context
        computes each new token once; once the text outgrows the context, each token recomputes the
        last seq_len tokens, as the cache-free path does throughout (so both give the same tokens)."""
        kv = KVCache(self.cfg.n_layers, self.cfg.seq_len) if cache else None

        def next_logits(context: torch.Tensor) -> torch.Tensor:
            if kv is not None and kv.length == 0:
                logits = self(context, cache=kv).logits  # the prompt, all at once
            elif kv is not None and context.shape[1] == kv.length + 1:
                logits = self(context[:, -1:], cache=kv).logits  # one new token
            else:  # the context slid past the training length: recompute the window
                logits = self(context).logits
            if hasattr(logits, "full_tensor"):  # a tensor-parallel model's logits are sharded on the vocabulary
                logits = logits.full_tensor()
            return logits[:, -1, :]

        return sample(next_logits, tokens, max_new_tokens, self.cfg.seq_len, temperature, top_k, generator)


@torch.no_grad()
def sample(next_logits, tokens: torch.Tensor, max_new_tokens: int, context_len: int, temperature: float = 0.8,
           top_k: int | None = 40, generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend [batch, seq] tokens by sampling from `next_logits(context)` ([batch, vocab] for the
    position after the context, the last `context_len` tokens) at `temperature`, among the top_k;
    temperature 0 takes the most likely token (greedy)."""
    for _ in range(max_new_tokens):
        logits = next_logits(tokens[:, -context_len:]).float()
        if temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int = 0,
                fused_attention: bool = True) -> Transformer:
    """Build on `device`; on "meta" nothing is allocated (for planning and for sharded initialisation).
    fused_attention=False runs the written-out math_attention everywhere (a reference for benchmarks)."""
    with torch.device(device):
        model = Transformer(cfg, fused_attention)
    if torch.device(device).type != "meta":
        model.init_weights(seed)
    return model
