"""The model math: parameters and FLOPs of a ModelConfig, in one place.

Every other part of Colossus (the model builder, the trainer's MFU, the planner, the ledger) gets
these numbers from here and never re-derives them. Each function is a small, pure formula with its
source; the model builder checks its own parameter count against `params_total`.

Conventions
- "Active" parameters are those one token touches: all non-expert weights plus `top_k` of the
  `n_experts` expert FFNs (a dense model has n_experts = top_k = 1).
- Model FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): 6 N + 12 L H Q T, with N the
  active parameters, L layers, H query heads, Q head dim, T sequence length. Attention is counted over
  the full T x T square, as PaLM and flop counters do, even though causal attention could skip half.
- The exact count sums 2 m n k over every matmul of the forward pass and triples it for the
  backward (Kaplan et al. 2020, section 2.1); it differs from the convention only by parameters that
  are not matmul weights (norm scales, and the input embedding when it is not tied).
"""

from __future__ import annotations

from colossus.modelconfig import ModelConfig

# FFN weight matrices per expert: gated units (GeGLU, SwiGLU) have gate, up and down projections.
_FFN_MATRICES = {"geglu": 3, "swiglu": 3, "gelu": 2}


def attention_params(m: ModelConfig) -> int:
    """Q and output projections (H*Q x d each) plus K and V (KV*Q x d each); no biases (Grok-1)."""
    return 2 * m.d_model * m.n_heads * m.head_dim + 2 * m.d_model * m.n_kv_heads * m.head_dim


def expert_params(m: ModelConfig) -> int:
    """One FFN: 3 matrices d x ffn_dim for gated units, 2 for a plain GELU MLP; no biases."""
    return _FFN_MATRICES[m.ffn_type] * m.d_model * m.ffn_dim


def router_params(m: ModelConfig) -> int:
    """The router is one d x n_experts matrix (Grok-1: no bias); a dense model has none."""
    return m.d_model * m.n_experts if m.is_moe else 0


def norm_params_per_layer(m: ModelConfig) -> int:
    """RMSNorm scales: sandwich norm has 4 per block (before and after attention and FFN), pre-norm 2."""
    return (4 if m.norm == "sandwich" else 2) * m.d_model


def embedding_params(m: ModelConfig) -> int:
    """Token embedding, plus a separate output matrix when the embeddings are not tied."""
    return m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)


def layer_params(m: ModelConfig, active: bool = False) -> int:
    experts = min(m.top_k, m.n_experts) if active else m.n_experts
    return attention_params(m) + experts * expert_params(m) + router_params(m) + norm_params_per_layer(m)


def parameter_shapes(m: ModelConfig) -> tuple[list[tuple[str, tuple[int, ...], str]], list[tuple[str, tuple[int, ...], str]]]:
    """The model's parameters as (name, shape, how tensor parallelism splits it): those of one block, and
    the rest (embedding, output, final norm). The split is what colossus.parallel.tensor does:
    "colwise" dim 0 over tp, "rowwise" dim 1, "replicated" none; expert weights [experts, in, out] are
    split on dim 0 by expert parallelism and on their hidden dimension (2 for "expert_in", 1 for
    "expert_out") by tp. The planner's per-rank memory adds FSDP's sharding to this."""
    d, q, f = m.d_model, m.head_dim, m.ffn_dim
    block = [("attention.wq.weight", (m.n_heads * q, d), "colwise"),
             ("attention.wk.weight", (m.n_kv_heads * q, d), "colwise"),
             ("attention.wv.weight", (m.n_kv_heads * q, d), "colwise"),
             ("attention.wo.weight", (d, m.n_heads * q), "rowwise")]
    norms = ("attention_norm", "post_attention_norm", "ffn_norm", "post_ffn_norm") if m.norm == "sandwich" else (
        "attention_norm", "ffn_norm")
    block += [(f"{norm}.weight", (d,), "replicated") for norm in norms]
    gated = m.ffn_type in ("geglu", "swiglu")
    if m.is_moe:
        block += [("ffn.router.weight", (m.n_experts, d), "replicated"),
                  ("ffn.experts.w_in", (m.n_experts, d, f), "expert_in"),
                  ("ffn.experts.w_out", (m.n_experts, f, d), "expert_out")]
        if gated:
            block.append(("ffn.experts.w_up", (m.n_experts, d, f), "expert_in"))
    else:
        block += [("ffn.w_in.weight", (f, d), "colwise"), ("ffn.w_out.weight", (d, f), "rowwise")]
        if gated:
            block.append(("ffn.w_up.weight", (f, d), "colwise"))
    rest = [("embedding.weight", (m.vocab_size, d), "colwise"), ("norm.weight", (d,), "replicated")]
    if not m.tie_embeddings:
        rest.append(("output.weight", (m.vocab_size, d), "colwise"))
    return block, rest


def params_total(m: ModelConfig) -> int:
    """Every parameter the model holds (what the builder allocates)."""
    return m.n_layers * layer_params(m) + embedding_params(m) + m.d_model  # + final RMSNorm


def params_active(m: ModelConfig) -> int:
    """Parameters one token uses: the non-expert weights and top_k experts per layer."""
    return m.n_layers * layer_params(m, active=True) + embedding_params(m) + m.d_model


def attention_flops_per_token(m: ModelConfig, seq_len: int | None = None) -> float:
    """12 L H Q T: QK^T and AV, 2 matmuls x 2 FLOPs x 3 (forward + backward) (PaLM, appendix B)."""
    t = seq_len or m.seq_len
    return 12.0 * m.n_layers * m.n_heads * m.head_dim * t


def flops_per_token(m: ModelConfig, seq_len: int | None = None) -> float:
    """Model FLOPs for one trained token (forward + backward): 6 N_active + 12 L H Q T (PaLM, app. B).
    This is the number behind MFU, the planner and the ledger."""
    return 6.0 * params_active(m) + attention_flops_per_token(m, seq_len)


def forward_matmul_flops(m: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Forward FLOPs per token of each matmul (2 m n k / tokens), summed over layers."""
    t = seq_len or m.seq_len
    per_layer = {
        "attn_qkv": 2.0 * m.d_model * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim,
        "attn_scores": 2.0 * m.n_heads * m.head_dim * t,
        "attn_values": 2.0 * m.n_heads * m.head_dim * t,
        "attn_out": 2.0 * m.n_heads * m.head_dim * m.d_model,
        "router": 2.0 * router_params(m),
        "ffn": 2.0 * min(m.top_k, m.n_experts) * expert_params(m),
    }
    flops = {name: m.n_layers * value for name, value in per_layer.items()}
    flops["unembedding"] = 2.0 * m.d_model * m.vocab_size
    return flops


def exact_flops_per_token(m: ModelConfig, seq_len: int | None = None) -> float:
    """Forward + backward matmul FLOPs: the backward does two matmuls per forward one (input and
    weight gradients), so 3x the forward."""
    return 3.0 * sum(forward_matmul_flops(m, seq_len).values())


def routing_pass(m: ModelConfig, micro_batches: int) -> bool:
    """Whether a step runs a routing pass first: an MoE balanced over the global batch whose ranks
    accumulate micro-batches counts every micro-batch's expert load before the first backward (one more
    forward, without gradients: colossus.train.step.forward_backward)."""
    return m.is_moe and m.moe_balance == "global_batch" and micro_batches > 1


def hardware_flops_per_token(m: ModelConfig, recompute: str = "none", seq_len: int | None = None,
                             recomputed_layers: float = 1.0, micro_batches: int = 1) -> float:
    """FLOPs the hardware executes, counting activation recomputation: "full" reruns each block's
    forward, "selective" only attention's core (Korthikanti et al. 2022, section 5), in the fraction
    `recomputed_layers` of the blocks (parallel.recompute_every); and an MoE's routing pass (one more
    forward) where routing_pass says so."""
    forward = forward_matmul_flops(m, seq_len)
    extra = recomputed_layers * {
        "none": 0.0,
        "full": sum(v for k, v in forward.items() if k != "unembedding"),
        "selective": forward["attn_scores"] + forward["attn_values"],
    }[recompute]
    if routing_pass(m, micro_batches):
        extra += sum(forward.values())
    return exact_flops_per_token(m, seq_len) + extra


# ----------------------------------------------------------------------------------------- memory
# Bytes of training state per parameter, as the trainer keeps it (FSDP2 with mixed precision and
# AdamW): the fp32 parameters are their own master copy (4), with fp32 gradients (4) and fp32 first and
# second moments (8); ZeRO (Rajbhandari et al. 2020) shards them over the data-parallel ranks. A bf16
# (or fp8) run computes with copies FSDP gathers in bf16 (2 bytes each), held from the forward to the
# backward under ZeRO 1-2 and 0, one or two layers at a time under ZeRO 3; an fp32 run gathers fp32 copies
# under ZeRO 1-2 and computes with the parameters themselves under ZeRO 0. (Megatron-LM's distributed
# optimizer keeps bf16 weights, fp32 gradients and fp32 master + moments: 2 + 4 + 12, the same 18 bytes
# unsharded.) Gradients are reduced in bf16 on the wire where precision allows (WEIGHT_BYTES).
WEIGHT_BYTES = 2
MASTER_BYTES = 4
GRAD_BYTES = 4
OPTIMIZER_BYTES = 8
COPY_BYTES = {"bf16": 2, "fp8": 2, "fp32": 4}  # a gathered compute copy of one parameter
# Bytes of each stored activation element (FP8 recipes keep activations for the backward in bf16).
ACTIVATION_ELEMENT_BYTES = {"bf16": 2, "fp8": 2, "fp32": 4}


def state_bytes_per_param(zero: int, dp: int, precision: str = "bf16") -> dict[str, float]:
    """Bytes per parameter on one rank under ZeRO stage `zero` over `dp` sharding ranks, as the trainer
    holds them at the peak of a step (the gathered copies of ZeRO 3, a layer or two at a time, apart):
    `params` (fp32, sharded under ZeRO 1-3), `gradients`, `optimizer` (the moments), `copies` (the
    gathered compute copies held through the step). FSDP2 always shards gradients, so stage 1 holds
    what stage 2 does."""
    shard = dp if zero >= 1 else 1
    copies = 0.0 if zero >= 3 or (zero == 0 and precision == "fp32") else COPY_BYTES[precision]
    return {"params": MASTER_BYTES / shard, "gradients": GRAD_BYTES / shard, "optimizer": OPTIMIZER_BYTES / shard,
            "copies": copies}


def activation_bytes_per_token(m: ModelConfig, recompute: str = "none", element_bytes: int = 2,
                               fused_elementwise: bool = True, fused_attention: bool = True,
                               seq_len: int | None = None) -> float:
    """Activation bytes one layer keeps per token for the backward pass (bf16, no dropout, fused
    attention that stores no T x T scores). Korthikanti et al. 2022, section 4.1 (eq. 2 is
    34 s b h + 5 a s^2 b for GPT: the 5 a s^2 b score terms vanish with fused attention and the dropout
    masks with no dropout), generalised to grouped-query attention, gated FFNs, MoE top-k routing
    and sandwich norms. Divide by the tensor (with sequence parallelism) and context parallel sizes.
      none:      everything below;
      selective: the same with fused attention (its recomputation only skips the score matrices);
      full:      only each layer's input (2 d), recomputing the rest (Korthikanti, Table 2).
    element_bytes scales the bf16 figures (4 for fp32 training). fused_elementwise=False is eager
    PyTorch, whose autograd also keeps each RMSNorm's normalised input, SDPA's output next to its
    head-merged copy, a GLU's activation output next to the product and each expert's output
    (measured on CPU, fp32: tests/test_memory.py). fused_attention=False (written-out attention, as
    with Grok-1's soft-cap in eager mode) also keeps T x T score matrices."""
    scale = element_bytes / 2
    if recompute == "full":
        return 2.0 * m.d_model * scale
    d, q = m.d_model, m.head_dim
    attention = 2 * d + 2 * m.n_heads * q + 4 * m.n_kv_heads * q + 2 * m.n_heads * q  # input, Q, K, V, output-proj input
    gated = m.ffn_type in ("geglu", "swiglu")
    one_ffn = 2 * d + (6 if gated else 4) * m.ffn_dim  # input, (gate, up,) activation output
    ffn = min(m.top_k, m.n_experts) * one_ffn + (2 * d + 4 * m.n_experts if m.is_moe else 0)  # routed copies + router
    n_norms = 4 if m.norm == "sandwich" else 2
    norms = n_norms * 2 * d
    if not fused_elementwise:
        routed = min(m.top_k, m.n_experts)
        norms += n_norms * 2 * d
        attention += 2 * m.n_heads * q
        ffn += routed * 2 * m.ffn_dim if gated else 0
        ffn += routed * 2 * d if m.is_moe else 0  # each expert's output, kept for the gate's product
    if not fused_attention and recompute == "none":
        # Scores written out: the soft-capped (or scaled) logits and the softmax output, per head and
        # key (Korthikanti's 5 a s^2 b less the dropout mask); selective recomputation drops them.
        attention += 2 * 2 * m.n_heads * (seq_len or m.seq_len)
    return float(attention + ffn + norms) * scale


def parameter_tensors_per_layer(m: ModelConfig) -> int:
    """Weight tensors in one block (what per-tensor framework costs scale with): Q, K, V and output
    projections, the norms' scales, the router and the FFN's matrices (stacked over experts)."""
    norms = 4 if m.norm == "sandwich" else 2
    return 4 + norms + _FFN_MATRICES[m.ffn_type] + (1 if m.is_moe else 0)


def pointwise_elements_per_token(m: ModelConfig, fused_attention: bool, seq_len: int | None = None) -> float:
    """Element-wise operations one layer's forward applies per token (each op over each element counts
    one): what bounds a layer's non-matmul time where memory or dispatch, not FLOPs, is the limit.
    RMSNorm ~4 ops over d (square, mean, scale, weight), residual adds, RoPE ~5 over Q and K, copies
    for head layout and grouped-query expansion, unfused attention ~8 over the T scores per head
    (scale, soft-cap tanh, mask, softmax), the router's softmax and top-k, moving each routed token
    to its expert and back (3 over d), and the gate (activation, product: 2 over ffn_dim)."""
    t = seq_len or m.seq_len
    d, q, heads, kv = m.d_model, m.head_dim, m.n_heads, m.n_kv_heads
    norms = (4 if m.norm == "sandwich" else 2) * 4 * d + 2 * d
    attention = 5 * (heads + kv) * q + (heads + 2 * kv) * q + heads * q + 2 * heads * q * (kv < heads)
    if not fused_attention:
        attention += 8 * heads * t
    routed = min(m.top_k, m.n_experts)
    ffn = routed * (2 if m.ffn_type in ("geglu", "swiglu") else 1) * m.ffn_dim
    if m.is_moe:
        ffn += 4 * m.n_experts + 3 * routed * d
    return float(norms + attention + ffn)


def summary(m: ModelConfig) -> dict[str, float | int | str]:
    """The figures `colossus models` prints."""
    return {
        "name": m.name,
        "params_total": params_total(m),
        "params_active": params_active(m),
        "flops_per_token": flops_per_token(m),
    }
