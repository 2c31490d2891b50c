"""ModelConfig: the single description of a model (the [model] table of a run config). It sits below
everything that reads it (the model builder, the model math, presets, the planner), and imports
nothing of Colossus, so none of them depends on another through it."""

from __future__ import annotations

from dataclasses import dataclass

FFN_TYPES = ("geglu", "swiglu", "gelu")
NORM_PLACEMENTS = ("sandwich", "pre")
MOE_BALANCE = ("global_batch", "micro_batch", "bias")


@dataclass
class ModelConfig:
    """The single description of a model: the model builder, the trainer's MFU, the planner and the
    ledger all read it (through colossus.modelmath for any number derived from it)."""

    name: str = "tiny"
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    ffn_dim: int = 512
    ffn_type: str = "geglu"
    n_experts: int = 8
    top_k: int = 2
    vocab_size: int = 256
    seq_len: int = 256
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    attn_softcap: float = 30.0  # c in c*tanh(x/c); 0 disables and uses fused SDPA
    embedding_multiplier: float = 16.0  # Grok-1: sqrt(d_model)
    output_multiplier: float = 0.5773502691896257  # Grok-1: 1/sqrt(3)
    norm: str = "sandwich"
    norm_eps: float = 1e-5
    router_renormalize: bool = False  # Grok-1 gates are the plain softmax probabilities
    moe_aux_loss_coef: float = 0.01  # Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4)
    moe_z_loss_coef: float = 0.001  # router z-loss (Zoph et al. 2022, ST-MoE, eq. 5)
    # What the load-balancing loss balances: the experts' load over the whole global batch (Qiu et al.
    # 2025, "global-batch" balance: the same loss for every layout and micro-batch split), over each
    # micro-batch on each rank, or no loss but DeepSeek-V3's routing bias moved towards balance.
    moe_balance: str = "global_batch"  # global_batch, micro_batch, bias
    moe_bias_rate: float = 0.001  # moe_balance = bias: how far each step moves an expert's bias (gamma)
    capacity_factor: float = 0.0  # 0 = dropless; otherwise tokens per expert <= cf * tokens * top_k / experts
    init_std: float = 0.02

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1
