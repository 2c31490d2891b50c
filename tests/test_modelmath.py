"""colossus.modelmath: parameter and FLOP counts, checked against real models, a FLOP counter and
arithmetic done by hand."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from colossus import modelmath
from colossus.config import ModelConfig
from colossus.models.grok import build_model
from colossus.models.presets import get_preset
from colossus.train.loss import training_loss

pytestmark = pytest.mark.usefixtures("one_thread")


BASE = ModelConfig(name="t", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48,
                   n_experts=4, top_k=2, vocab_size=64, seq_len=16)

CONFIGS = {
    "moe-geglu-sandwich": BASE,
    "dense-swiglu-pre": dataclasses.replace(BASE, ffn_type="swiglu", norm="pre", n_experts=1, top_k=1),
    "dense-gelu": dataclasses.replace(BASE, ffn_type="gelu", n_experts=1, top_k=1),
    "moe-gelu-pre": dataclasses.replace(BASE, ffn_type="gelu", norm="pre"),
    "untied": dataclasses.replace(BASE, tie_embeddings=False),
    "mha": dataclasses.replace(BASE, n_kv_heads=4),  # n_kv_heads == n_heads
    "moe-top1": dataclasses.replace(BASE, n_experts=3, top_k=1, ffn_dim=40),
    # head_dim * n_heads != d_model is allowed (Grok-1 happens to have them equal)
    "wide-heads": dataclasses.replace(BASE, head_dim=16, ffn_type="swiglu"),
}


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def naive_params(m: ModelConfig) -> int:
    """Count by listing every weight matrix, independently of modelmath."""
    d, h, kv, q, f = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim
    attn = d * h * q + d * kv * q + d * kv * q + h * q * d  # wq, wk, wv, wo
    mats = 3 if m.ffn_type in ("geglu", "swiglu") else 2
    ffn = m.n_experts * mats * d * f
    router = d * m.n_experts if m.n_experts > 1 else 0
    norms = (4 if m.norm == "sandwich" else 2) * d
    emb = m.vocab_size * d * (1 if m.tie_embeddings else 2)
    return m.n_layers * (attn + ffn + router + norms) + emb + d


@pytest.mark.parametrize("name", list(CONFIGS))
def test_params_total_equals_model_numel(name):
    """The model builder allocates exactly params_total parameters (and a naive count agrees)."""
    cfg = CONFIGS[name]
    model = build_model(cfg, "meta")
    assert numel(model) == modelmath.params_total(cfg) == naive_params(cfg)


def test_untied_adds_one_output_matrix():
    """Untying the embeddings adds exactly vocab x d_model parameters."""
    tied, untied = CONFIGS["moe-geglu-sandwich"], CONFIGS["untied"]
    assert modelmath.params_total(untied) - modelmath.params_total(tied) == 64 * 32


def test_tiny_preset_by_hand():
    """params_total, params_active and flops_per_token of the tiny preset, worked by hand.

    tiny: L=4, d=256, H=4, KV=2, Q=64, ffn=512 GeGLU, 8 experts top-2, V=256, T=256, tied, sandwich.
      attention = 2*256*256 + 2*256*128           = 131072 + 65536 = 196608
      expert    = 3*256*512                                         = 393216
      router    = 256*8                                             =   2048
      norms     = 4*256                                             =   1024
      layer (all 8 experts) = 196608 + 8*393216 + 2048 + 1024       = 3345408
      layer (2 active)      = 196608 + 2*393216 + 2048 + 1024       =  986112
      embedding = 256*256 = 65536; final norm = 256
      total  = 4*3345408 + 65536 + 256 = 13381632 + 65792          = 13447424
      active = 4*986112  + 65536 + 256 = 3944448  + 65792          =  4010240
      flops  = 6*4010240 + 12*L*H*Q*T = 24061440 + 12*4*4*64*256
             = 24061440 + 3145728                                   = 27207168
    """
    tiny = get_preset("tiny")
    assert modelmath.params_total(tiny) == 13_447_424
    assert modelmath.params_active(tiny) == 4_010_240
    assert modelmath.attention_flops_per_token(tiny) == 3_145_728
    assert modelmath.flops_per_token(tiny) == 27_207_168
    # a shorter sequence only changes the attention term: 12*4*4*64*128 = 1572864
    assert modelmath.flops_per_token(tiny, seq_len=128) == 24_061_440 + 1_572_864
    summary = modelmath.summary(tiny)
    assert summary["params_total"] == 13_447_424 and summary["name"] == "tiny"


def test_tiny_exact_and_hardware_flops_by_hand():
    """exact/hardware FLOPs of tiny, worked by hand.

    Forward matmul FLOPs per token:
      per layer: qkv 2*256*(4+2*2)*64 = 262144; out 2*256*256 = 131072; router 2*2048 = 4096;
                 ffn 2*2*393216 = 1572864;  scores + values 2 * 2*4*64*256 = 262144
      blocks  = 4 * (262144 + 131072 + 4096 + 1572864 + 262144) = 4 * 2232320 = 8929280
      unembed = 2*256*256 = 131072
      exact   = 3 * (8929280 + 131072) = 27181056
      selective recompute adds scores + values = 4*262144 = 1048576
      full recompute adds the blocks' forward = 8929280
    """
    tiny = get_preset("tiny")
    assert sum(modelmath.forward_matmul_flops(tiny).values()) == 8_929_280 + 131_072
    assert modelmath.exact_flops_per_token(tiny) == 27_181_056
    assert modelmath.hardware_flops_per_token(tiny, "none") == 27_181_056
    assert modelmath.hardware_flops_per_token(tiny, "selective") == 27_181_056 + 1_048_576
    assert modelmath.hardware_flops_per_token(tiny, "full") == 27_181_056 + 8_929_280


@pytest.fixture(scope="module")
def grok1_meta():
    cfg = get_preset("grok-1")
    return cfg, build_model(cfg, "meta")


def test_grok1_on_meta_allocates_nothing(grok1_meta):
    """build_model(grok-1, "meta") puts every parameter and buffer on the meta device."""
    _, model = grok1_meta
    params = list(model.parameters())
    assert params and all(p.is_meta for p in params)
    assert all(b.is_meta for b in model.buffers())


def test_grok1_param_count(grok1_meta):
    """The meta grok-1 model has params_total parameters, within 1% of the published 314B, and
    about a quarter of them are active per token.

    By hand: attention 2*6144*6144 + 2*6144*1024 = 88080384; expert 3*6144*32768 = 603979776;
    router 49152; norms 24576; layer = 88080384 + 8*603979776 + 49152 + 24576 = 4919992320;
    total = 64*4919992320 + 131072*6144 + 6144 = 315684820992.
    active layer = 88080384 + 2*603979776 + 73728 = 1296113664; active = 64*that + 805312512 = 83756587008.
    """
    cfg, model = grok1_meta
    total = modelmath.params_total(cfg)
    assert numel(model) == total == 315_684_820_992
    assert abs(total - 314e9) / 314e9 < 0.01
    active = modelmath.params_active(cfg)
    assert active == 83_756_587_008
    assert 0.2 < active / total < 0.3


def test_norm_params_are_the_only_convention_gap():
    """flops_per_token (6N + 12LHQT) and exact_flops_per_token (sum of matmuls x 3) differ only by
    6 x (norm scales) for tied embeddings, and by 6 x (norms + input embedding) for untied ones."""
    for name, cfg in CONFIGS.items():
        norms = cfg.n_layers * modelmath.norm_params_per_layer(cfg) + cfg.d_model
        gap = modelmath.flops_per_token(cfg) - modelmath.exact_flops_per_token(cfg)
        extra = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
        assert gap == pytest.approx(6 * (norms + extra), rel=1e-12), name
    grok = get_preset("grok-1")
    # 6 * (64 * 4 * 6144 + 6144) = 9474048
    assert modelmath.flops_per_token(grok) - modelmath.exact_flops_per_token(grok) == 9_474_048


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hardware_flops_ordering(name):
    """none < selective < full, selective adds the attention core's forward and full adds one forward
    of all blocks (the exact forward minus the unembedding)."""
    cfg = CONFIGS[name]
    none = modelmath.hardware_flops_per_token(cfg, "none")
    selective = modelmath.hardware_flops_per_token(cfg, "selective")
    full = modelmath.hardware_flops_per_token(cfg, "full")
    assert none < selective < full
    assert none == modelmath.exact_flops_per_token(cfg)
    # attention core forward: QK^T and AV, 2 * 2 * H * Q * T per layer per token
    assert selective - none == pytest.approx(4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.seq_len)
    forward = modelmath.exact_flops_per_token(cfg) / 3
    assert full - none == pytest.approx(forward - 2 * cfg.d_model * cfg.vocab_size)


def test_dense_active_equals_total():
    """A dense model (one expert, top-1) uses every parameter for every token and has no router."""
    for name in ("dense-swiglu-pre", "dense-gelu"):
        cfg = CONFIGS[name]
        assert modelmath.params_active(cfg) == modelmath.params_total(cfg)
        assert modelmath.router_params(cfg) == 0
        assert modelmath.forward_matmul_flops(cfg)["router"] == 0


def test_moe_active_counts_top_k_experts():
    """For an MoE, total - active is exactly (n_experts - top_k) expert FFNs per layer."""
    cfg = CONFIGS["moe-geglu-sandwich"]
    diff = modelmath.params_total(cfg) - modelmath.params_active(cfg)
    assert diff == cfg.n_layers * (4 - 2) * 3 * 32 * 48


def test_seq_len_argument_only_changes_attention():
    """The seq_len argument changes only the T-dependent attention terms, linearly."""
    cfg = CONFIGS["moe-geglu-sandwich"]
    a = modelmath.flops_per_token(cfg, seq_len=8)
    b = modelmath.flops_per_token(cfg, seq_len=24)
    assert b - a == 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 16
    assert modelmath.flops_per_token(cfg) == modelmath.flops_per_token(cfg, seq_len=cfg.seq_len)


def test_dense_forward_and_backward_flops_match_flop_counter():
    """torch's FlopCounterMode, run on a real dense forward and backward, counts what
    forward_matmul_flops predicts: forward = tokens x the sum, backward twice that (exact = 3 x forward)."""
    cfg = dataclasses.replace(CONFIGS["dense-swiglu-pre"], n_layers=1, attn_softcap=30.0)  # full T x T matmuls
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with FlopCounterMode(display=False) as counter:
        out = model(tokens)
    forward = counter.get_total_flops()
    loss = training_loss(out, tokens, cfg).total  # outside the model: no matmuls
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    backward = counter.get_total_flops()
    n_tokens = 2 * cfg.seq_len
    assert forward == pytest.approx(n_tokens * sum(modelmath.forward_matmul_flops(cfg).values()))
    assert backward == pytest.approx(2 * forward)
    assert forward + backward == pytest.approx(n_tokens * modelmath.exact_flops_per_token(cfg))


def test_moe_non_expert_flops_match_flop_counter():
    """For an untied, wide-head MoE, everything except the grouped expert matmuls (which FlopCounterMode
    does not see: attention, router, unembedding) is counted exactly as forward_matmul_flops predicts."""
    cfg = dataclasses.replace(CONFIGS["wide-heads"], n_layers=1, tie_embeddings=False)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(tokens)
    predicted = modelmath.forward_matmul_flops(cfg)
    without_ffn = sum(v for k, v in predicted.items() if k != "ffn")
    assert counter.get_total_flops() == pytest.approx(2 * cfg.seq_len * without_ffn)
