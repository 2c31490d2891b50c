"""The cost model: step time, memory and power of one parallel layout, from small named formulas.

Inputs are plain data: a ModelConfig (its numbers come from colossus.modelmath, the one source of
truth), a Cluster and a Layout. A GPU is described by its datasheet (colossus/hardware.py); a measured
machine (plan/profile.py, written by `colossus bench`) can replace the datasheet for compute and
all-reduce, which is how the planner predicts this machine's own CPU steps.

The Layout is the trainer's own (colossus.layout), with Megatron-LM's conventions (Narayanan et al.
2021; Korthikanti et al. 2022): tensor parallelism (tp) always with sequence parallelism, inside the
NVLink domain; context parallelism (cp) next; expert parallelism (ep) over data-parallel ranks;
pipeline stages (pp) outermost, with `vpp` interleaved virtual stages each. GPUs = tp * cp * pp * dp.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from colossus import modelmath
from colossus.errors import UserError
from colossus.hardware import ATTENTION_KERNELS, GPU, NIC_EFFICIENCY, NVLINK_EFFICIENCY, attention_efficiency, gemm_peak_efficiency
from colossus.layout import Layout, distinct_shares, expert_shard_dim, rank_share
from colossus.modelconfig import ModelConfig
from colossus.plan.cluster import Cluster

GIB = 2**30


@dataclass
class Prediction:
    layout: Layout
    step_time_s: float
    tokens_per_s: float
    model_flops_per_token: float
    model_tflops_per_gpu: float
    mfu: float
    memory_gib_per_gpu: float
    fits: bool
    memory_gib: dict[str, float] = field(default_factory=dict)  # breakdown
    time_s: dict[str, float] = field(default_factory=dict)  # breakdown of one step

    def to_json(self) -> dict:
        out = asdict(self)
        out["layout"] = self.layout.to_json()
        return out


# ------------------------------------------------------------------------------------ compute

# GEMM tiles: CUTLASS's and cuBLAS's bf16 kernels on Ampere and Hopper compute 128 x 256 or 128 x 128
# output tiles, one per SM at a time, and the library's heuristic picks the one that wastes least (NVIDIA
# "Matrix Multiplication Background" user's guide, sections on tile and wave quantization). A GEMM whose
# sides are not multiples of the tile computes the padding, and one whose tile count is not a multiple
# of the SM count leaves SMs idle in its last wave.
TILES = ((128, 256), (128, 128))
# Each tile first fills its software pipeline before the first MMA, and then writes its result: about one
# 64-deep k-block of the inner loop (CUTLASS's Hopper mainloop stage) that does no math. A k much longer
# than that hides it.
TILE_FILL_K = 64.0


def wave_fill(gpu: GPU, tiles: float) -> float:
    """Share of the SMs' time a kernel of `tiles` equal tiles keeps busy: its last wave may be partial."""
    tiles = math.ceil(tiles)
    return tiles / (math.ceil(tiles / gpu.sms) * gpu.sms) if gpu.sms else 1.0


def gemm_efficiency(gpu: GPU, m: float, n: float, k: float, fitted: dict[str, float] | None = None,
                    batch: float = 1) -> float:
    """Achievable fraction of peak for `batch` m x k by k x n GEMMs: the architecture's large-GEMM
    efficiency (fitted), times the useful share of the padded tiles, of the waves over the SMs and of
    each tile's k-loop. The output may be tiled either way round, by either tile, and a side narrower than
    the tile gets a narrower one (the libraries hold 128 x 64 kernels for them); the best one counts."""
    def fill(rows: float, cols: float, tile_m: int, tile_n: int) -> float:
        tile_n = min(tile_n, max(64, 2 ** math.ceil(math.log2(max(cols, 1)))))
        tiles_m, tiles_n = math.ceil(rows / tile_m), math.ceil(cols / tile_n)
        padding = rows * cols / (tiles_m * tile_m * tiles_n * tile_n)
        return padding * wave_fill(gpu, batch * tiles_m * tiles_n)

    best = max(fill(a, b, *tile) for a, b in ((m, n), (n, m)) for tile in TILES)
    return gemm_peak_efficiency(gpu, fitted) * best * k / (k + TILE_FILL_K)


def gemm_time(gpu: GPU, m: float, n: float, k: float, precision: str, fitted: dict[str, float] | None = None,
              batch: float = 1) -> float:
    """Roofline of one GEMM: the slower of its FLOPs at the achievable rate and its bytes (bf16
    operands and result, fp8 inputs) at HBM bandwidth (Williams et al. 2009, Roofline). An fp8 GEMM
    first scales and casts its bf16 operands: a read for the scale (amax), a read and a one-byte write
    for the cast, memory-bound (Micikevicius et al. 2022, FP8 formats; Transformer Engine's current
    scaling)."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    flops_time = 2.0 * batch * m * n * k / (gpu.peak_flops(precision) * gemm_efficiency(gpu, m, n, k, fitted, batch))
    operand_bytes = 1 if precision == "fp8" else 2
    bytes_time = batch * (operand_bytes * (m * k + k * n) + 2 * m * n) / (gpu.hbm_tb_s * 1e12)
    cast_time = batch * (2 + 2 + 1) * (m * k + k * n) / (gpu.hbm_tb_s * 1e12) if precision == "fp8" else 0.0
    return max(flops_time, bytes_time) + cast_time


# FlashAttention computes each head's scores in 128-row query blocks, one thread block each, and never
# writes them (Dao 2023, FlashAttention-2, section 3.2); a causal mask skips the blocks above the
# diagonal. Its backward runs five matmuls to the forward's two (it recomputes the scores: section 3.1.2).
FLASH_BLOCK = 128
FLASH_BACKWARD_RATIO = 5 / 2


def flash_attention_time(gpu: GPU, batch_heads: float, rows: float, cols: float, head_dim: float, precision: str,
                         kernel: str = "cudnn") -> float:
    """Forward of fused causal attention: `batch_heads` heads of `rows` queries over `cols` keys (a
    context-parallel rank's queries see every key), at the kernel's published rate
    (hardware.ATTENTION_EFFICIENCY) over the blocks' waves."""
    blocks = batch_heads * math.ceil(rows / FLASH_BLOCK)
    key_blocks = math.ceil(cols / FLASH_BLOCK)
    causal = (key_blocks + 1) / (2 * key_blocks)  # the share of score blocks at or below the diagonal
    flops = 4.0 * batch_heads * rows * cols * head_dim * causal
    precision = "bf16" if precision == "fp8" else precision  # attention stays bf16 in fp8 training recipes
    return flops / (gpu.peak_flops(precision) * attention_efficiency(gpu, kernel) * wave_fill(gpu, blocks))


# Elementwise traffic per stored activation byte over forward + backward: written and read once in
# the forward, read and its gradient written and read in the backward (norms, activations, residuals
# are memory-bound; Korthikanti et al. 2022 section 4 counts what is stored, each is touched ~4x).
ELEMENTWISE_PASSES = 4.0
# An optimizer step reads and writes fp32 master weights, both moments and the gradient, and writes
# the bf16 weights: (4 + 4 + 4 + 4) * 2 + 2 bytes per parameter it owns (memory-bound, ZeRO section 3).
OPTIMIZER_BYTES_PER_PARAM = 34.0


@dataclass(frozen=True)
class Software:
    """What the training framework overlaps and fuses. The defaults are today's stacks (FlashAttention,
    gradient reduction overlapped with the backward); the published 2021-2022 Megatron-LM runs had
    neither, and their rows in plan/data/published_runs.toml say so."""

    fused_attention: bool = True  # no T x T score matrix in memory (Dao et al. 2022, FlashAttention)
    # Which fused kernel (hardware.ATTENTION_KERNELS): cuDNN's is what Transformer Engine and PyTorch's
    # SDPA (2.9 and later, on Hopper) run; "flash2" is FlashAttention-2 (PyTorch's SDPA "flash" backend).
    attention_kernel: str = "cudnn"
    overlap_grad_reduce: bool = True  # gradient reduction (and FSDP's gathers) during compute (Li et al. 2020)
    # Norms, activations and the loss as fused kernels that keep only their inputs (Korthikanti et al.
    # 2022); False is eager PyTorch (modelmath.activation_bytes_per_token says what more it keeps).
    fused_elementwise: bool = True
    # A gradient buffer that lives through the whole step (Megatron-LM); False: gradients are created by
    # the backward and freed by zero_grad(set_to_none=True), as in plain PyTorch and FSDP2.
    persistent_grads: bool = True
    # Sequence-parallel all-gathers and reduce-scatters split into chunks, each moved while the GEMM on
    # the previous one runs (Transformer Engine's userbuffers; Wang et al. 2023, "Overlap communication
    # with dependent computation via decomposition", ASPLOS): only what outlasts the layer's GEMMs waits.
    # Off by default: Colossus's trainer (DTensor) does not overlap them.
    overlap_tp_comm: bool = False
    # The backward's tensor-parallel collective on each column-parallel layer's input gradient (the
    # all-reduce, or with sequence parallelism the reduce-scatter) runs while that layer's weight-gradient
    # GEMM computes, and the sequence-parallel re-gather of its input while the input-gradient GEMM does;
    # the row-parallel layers' gradient all-gathers still wait (Megatron-LM's asynchronous
    # tensor-model-parallel all-reduce, on by default since September 2021, and its sequence-parallel form,
    # core/tensor_parallel/layers.py; Korthikanti et al. 2022, sections 4.2.2 and 6.2: it is why their full
    # recompute costs 39% rather than 33%; with it this model gives their Table 4's 22B layer backward,
    # 11.9 ms, where without it 13.3). Off by default: Colossus's trainer waits for each collective.
    overlap_tp_backward: bool = False
    # Bytes per parameter that a separate pass moves every micro-batch to add the backward's weight gradients
    # into the accumulated ones. 0: the weight-gradient GEMM accumulates into the gradient buffer itself
    # (Megatron-LM's gradient_accumulation_fusion, from 2022; Transformer Engine), or FSDP reduces each
    # micro-batch's gradients and adds only its shard. 6: autograd adds 16-bit gradients, reading both and
    # writing the sum (Megatron-LM of 2021 in fp16). A row that accumulates otherwise says how.
    grad_accumulation_bytes: float = 0.0
    # Tensor parallelism splits the norms, dropout and residuals over the sequence too (Korthikanti et al.
    # 2022, section 4.2.2; Colossus always does). False: Megatron-LM before 2022, where each tp rank
    # repeats them on the whole sequence.
    sequence_parallel: bool = True
    # MoE dispatch by kernels that write each token's copies straight into expert order on the receiving
    # rank and sum the gate-weighted expert outputs as they come back (DeepEP, Zhao et al. 2025): no
    # separate permute, unpermute and combine passes in HBM. False: the all-to-all moves tokens and
    # the permutation is its own kernels (Megatron-Core's alltoall dispatcher, Colossus's trainer).
    fused_dispatch: bool = False

    def __post_init__(self):
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise UserError(f"software.attention_kernel must be one of {', '.join(ATTENTION_KERNELS)}, "
                            f"got {self.attention_kernel!r}")


def eager_cpu_software(m: ModelConfig) -> Software:
    """What colossus's own trainer runs on a CPU: SDPA unless the soft-cap is on, eager (unfused)
    norms and activations, no overlap of gloo reductions, gradients freed by zero_grad."""
    return Software(fused_attention=m.attn_softcap == 0, overlap_grad_reduce=False, fused_elementwise=False,
                    persistent_grads=False)


# Passes over the T x T attention scores when attention is not fused: the scores GEMM writes them,
# the fused scale-mask-softmax reads and writes, dropout reads and writes (plus a mask), AV reads
# (about 6 in the forward); the backward touches each about twice (Korthikanti et al. 2022, section
# 4.1 counts 5 a s^2 b stored bytes of these tensors).
SCORE_PASSES_FORWARD = 6.0
SCORE_PASSES_BACKWARD = 10.0


@dataclass(frozen=True)
class Machine:
    """What the cost model needs to know about one device and its links. `profile` (a measured
    MachineProfile) replaces the datasheet GEMM and all-reduce formulas when given."""

    gpu: GPU
    gpus_per_node: int
    nic_gbps: float
    profile: object | None = None
    fitted: dict[str, float] | None = None  # large-GEMM efficiencies by architecture, refit (validation)

    def gemm(self, m: float, n: float, k: float, precision: str) -> float:
        if self.profile is not None:
            return self.profile.matmul_time(int(m), int(n), int(k))
        return gemm_time(self.gpu, m, n, k, precision, self.fitted)

    def memory_time(self, nbytes: float) -> float:
        if self.profile is not None:
            return nbytes / self.profile.memory_bytes_per_s
        return nbytes / (self.gpu.hbm_tb_s * 1e12)

    def link_bytes_per_s(self, inside_node: bool) -> float:
        """Bus bandwidth of a collective: NVLink inside a node, the GPU's own NIC across nodes."""
        if inside_node:
            return self.gpu.nvlink_gb_s / 2 * 1e9 * NVLINK_EFFICIENCY
        return self.nic_gbps / 8 * 1e9 * NIC_EFFICIENCY


# Latency per step of a collective's algorithm (NCCL: ~5 us inside a node, ~10 us across);
# NCCL uses trees across nodes, so the step count grows with log2 of the group.
LATENCY_INSIDE_S = 5e-6
LATENCY_ACROSS_S = 10e-6


def _latency(n: int, inside: bool) -> float:
    return (LATENCY_INSIDE_S if inside else LATENCY_ACROSS_S) * 2 * math.ceil(math.log2(n)) if n > 1 else 0.0


def all_reduce_time(machine: Machine, nbytes: float, n: int, inside_node: bool) -> float:
    """Ring all-reduce: every GPU sends and receives 2 (n-1)/n of the buffer (Thakur et al. 2005;
    NCCL's "bus bandwidth" convention, nccl-tests doc/PERFORMANCE.md)."""
    if n <= 1:
        return 0.0
    if machine.profile is not None:
        return machine.profile.allreduce_time(nbytes, n)
    return 2 * (n - 1) / n * nbytes / machine.link_bytes_per_s(inside_node) + _latency(n, inside_node)


def all_gather_time(machine: Machine, nbytes: float, n: int, inside_node: bool) -> float:
    """All-gather or reduce-scatter of an nbytes result: (n-1)/n of it crosses each link (half an all-reduce)."""
    if n <= 1:
        return 0.0
    if machine.profile is not None:
        return machine.profile.allreduce_time(nbytes, n) / 2
    return (n - 1) / n * nbytes / machine.link_bytes_per_s(inside_node) + _latency(n, inside_node) / 2


def all_to_all_time(machine: Machine, nbytes: float, n: int, inside_node: bool) -> float:
    """All-to-all of nbytes per GPU: (n-1)/n of it leaves each GPU (Rajbhandari et al. 2022, DeepSpeed-MoE,
    section 5), the same traffic per link as an all-gather of nbytes."""
    return all_gather_time(machine, nbytes, n, inside_node)


@dataclass(frozen=True)
class LayerCost:
    """One transformer layer, one micro-batch, one GPU: seconds of each part."""

    forward_gemm: float  # projections and FFN/experts
    attention_core: float  # QK^T and AV GEMMs (forward)
    attention_backward: float  # their gradients
    score_forward: float  # unfused attention only: memory traffic over the T x T scores, forward
    score_backward: float  # and backward
    elementwise: float  # forward + backward memory-bound work
    tp_comm: float  # sequence-parallel all-gathers / reduce-scatters, forward + backward
    ep_comm: float  # MoE dispatch and combine all-to-alls, forward + backward
    cp_comm: float  # all-gather of keys and values, and reduce-scatter of their gradients (not overlapped)


def layer_cost(m: ModelConfig, machine: Machine, tp: int, cp: int, ep: int, mbs: int, precision: str,
               software: Software = Software()) -> LayerCost:
    seq = m.seq_len
    tokens = mbs * seq / cp  # tokens of this GPU's micro-batch
    d, q = m.d_model, m.head_dim
    heads, kv = m.n_heads / tp, max(m.n_kv_heads / tp, 1)
    gemm = lambda rows, cols, inner: machine.gemm(rows, cols, inner, precision)  # noqa: E731
    forward = gemm(tokens, (heads + 2 * kv) * q, d) + gemm(tokens, d, heads * q)
    gated = m.ffn_type in ("geglu", "swiglu")
    ffn_in = 2 if gated else 1
    if m.is_moe:
        forward += gemm(tokens, m.n_experts, d)  # router
        local_experts = m.n_experts / ep
        per_expert = ep * tokens * m.top_k / m.n_experts  # tokens each local expert receives
        forward += local_experts * (ffn_in * gemm(per_expert, m.ffn_dim / tp, d) + gemm(per_expert, d, m.ffn_dim / tp))
    else:
        forward += ffn_in * gemm(tokens, m.ffn_dim / tp, d) + gemm(tokens, d, m.ffn_dim / tp)
    # Scores and values per head and sequence: (T/cp x Q) by (Q x T), then (T/cp x T) by (T x Q).
    if machine.profile is not None:
        attention = mbs * heads * (gemm(seq / cp, seq, q) + gemm(seq / cp, q, seq))
        attention_backward = 2 * attention
    elif software.fused_attention:
        attention = flash_attention_time(machine.gpu, mbs * heads, seq / cp, seq, q, precision, software.attention_kernel)
        attention_backward = FLASH_BACKWARD_RATIO * attention
    else:  # batched GEMMs over every head, full T x T scores (the mask applied afterwards)
        batched = lambda rows, cols, inner: gemm_time(machine.gpu, rows, cols, inner, "bf16", machine.fitted,  # noqa: E731
                                                      mbs * heads)
        attention = batched(seq / cp, seq, q) + batched(seq / cp, q, seq)
        attention_backward = 2 * attention
    element_bytes = modelmath.ACTIVATION_ELEMENT_BYTES[precision]
    score_forward = score_backward = 0.0
    measured_pointwise = machine.profile is not None and getattr(machine.profile, "pointwise_elements_per_s", 0) > 0
    if not software.fused_attention and not measured_pointwise:
        scores = mbs * heads * (seq / cp) * seq * element_bytes
        score_forward = machine.memory_time(SCORE_PASSES_FORWARD * scores)
        score_backward = machine.memory_time(SCORE_PASSES_BACKWARD * scores)
    stored = modelmath.activation_bytes_per_token(m, element_bytes=element_bytes) * tokens / tp
    if measured_pointwise:
        # A measured machine: element-ops at its measured pointwise rate, forward + 2x backward, and
        # every op's dispatch and autograd bookkeeping (small models on CPUs are bound by these).
        elements = tokens * modelmath.pointwise_elements_per_token(m, software.fused_attention, seq) / tp
        ops = OPS_PER_MOE_LAYER if m.is_moe else OPS_PER_DENSE_LAYER
        elementwise = 3 * elements / machine.profile.pointwise_elements_per_s + ops * machine.profile.autograd_op_s
    else:
        elementwise = machine.memory_time(ELEMENTWISE_PASSES * (stored + unsplit_bytes(m, tokens, tp, element_bytes, software)))
        if m.is_moe:
            elementwise += machine.memory_time(moe_routing_bytes(m, tokens / tp, element_bytes, software.fused_dispatch))
        if machine.profile is not None:
            elementwise += (OPS_PER_MOE_LAYER if m.is_moe else OPS_PER_DENSE_LAYER) * machine.profile.op_overhead_s
    inside_tp = tp <= machine.gpus_per_node
    activation = tokens * d * element_bytes  # one full-sequence activation of this micro-batch
    # Sequence parallelism: 2 all-gathers + 2 reduce-scatters forward, the same backward (Korthikanti, section 4.2.2).
    tp_comm = 8 * all_gather_time(machine, activation, tp, inside_tp)
    inside_ep = tp * cp * ep <= machine.gpus_per_node
    routed = tokens * m.top_k * d * element_bytes / tp
    ep_comm = 4 * all_to_all_time(machine, routed, ep, inside_ep) if m.is_moe else 0.0  # dispatch + combine, fwd + bwd
    inside_cp = tp * cp <= machine.gpus_per_node
    kv_bytes = 2 * tokens * m.n_kv_heads * q * element_bytes / tp
    # Context parallel as the trainer runs it (parallel/context.py) and Llama 3 did (Dubey et al. 2024,
    # section 3.3.2): each rank gathers the other ranks' keys and values before its attention, and the
    # backward reduce-scatters their gradients; attention waits for the gather.
    cp_comm = 2 * (cp - 1) * kv_bytes / machine.link_bytes_per_s(inside_cp) if cp > 1 else 0.0
    return LayerCost(forward, attention, attention_backward, score_forward, score_backward, elementwise, tp_comm, ep_comm, cp_comm)


def unsplit_bytes(m: ModelConfig, tokens: float, tp: int, element_bytes: float, software: Software) -> float:
    """Activation bytes of one layer that every tp rank holds whole without sequence parallelism: 10 sbh of
    Korthikanti et al.'s sbh(10 + 24/t + 5as/ht) (eq. 2; with it, all 34 sbh are split over t), for
    2-byte elements."""
    if software.sequence_parallel or tp == 1:
        return 0.0
    return 10 * m.d_model * tokens * (1 - 1 / tp) * element_bytes / 2


# An MoE layer's memory-bound work besides its GEMMs, forward: the router's fp32 logits written, then
# read and written by the softmax and read by the top-k (4 passes over tokens x experts); the permutation
# of each token's k copies into expert order (read and write) and back (read and write), and the
# gate-weighted combine (read the k copies, write the token). The backward moves the same bytes twice
# (the gradients of inputs and outputs). (Megatron-Core's moe_utils permute/unpermute do exactly these
# gathers and scatters; Liu et al. 2025, MoE Parallel Folding, section 3.3 lists them as the dispatcher's
# cost beside the all-to-all.)
ROUTER_PASSES = 4
PERMUTE_PASSES = 5  # permute read + write, unpermute read + write, combine read (the write is per token)


def moe_routing_bytes(m: ModelConfig, tokens: float, element_bytes: float, fused_dispatch: bool = False) -> float:
    """Bytes an MoE layer's router, permutation and combine move over forward + backward, for `tokens`
    (the router's only, where the dispatch kernels permute and combine: Software.fused_dispatch)."""
    router = ROUTER_PASSES * tokens * m.n_experts * 4
    permute = 0.0 if fused_dispatch else (PERMUTE_PASSES * m.top_k + 1) * tokens * m.d_model * element_bytes
    return 3 * (router + permute)


# The loss over the vocabulary, memory-bound: a fused cross-entropy reads the bf16 logits for their
# log-sum-exp, and in the backward reads them again and writes their gradient (Megatron-LM's
# vocab-parallel cross-entropy); eager PyTorch first casts them to fp32 (write), and log-softmax reads and
# writes fp32, its backward reads two fp32 tensors and writes one, then the cast back (Korthikanti et al.
# 2022, section 4.1, count the fp32 logits the same way).
CROSS_ENTROPY_BYTES_FUSED = 2 + 2 + 2
CROSS_ENTROPY_BYTES_EAGER = 4 + 4 + 4 + 3 * 4 + 2


# Eager ops (top-level aten calls) of one forward + backward of our own block (models/grok.py), for
# the per-op cost on measured machines, and of everything outside the blocks per micro-batch
# (embedding, final norm, logits, loss). Counted with torch.profiler; tests/test_calibration.py
# recounts them, so a change to the model that moves them fails there first.
OPS_PER_DENSE_LAYER = 204  # RMSNorm as F.rms_norm: 236 when the norm was written out op by op
OPS_PER_MOE_LAYER = 308  # (345 then)
OPS_PER_MICRO_BATCH = 78  # dense 70, MoE 89 (the loss's load-balancing terms are computed outside the model)


# ------------------------------------------------------------------------------------ memory


def stage_params(m: ModelConfig, layout: Layout) -> tuple[float, float]:
    """(dense, expert) parameters held by one GPU of the pipeline rank that holds the most blocks (it
    paces the pipeline), with the embedding (first stage) or the output projection (last stage) it
    holds; with tied embeddings the last stage holds a copy of the embedding."""
    shares = [share for _, share in distinct_shares(layout, m.n_layers)]
    share = max(shares, key=lambda s: (s.blocks, s.embedding + s.head))
    experts = m.n_experts * modelmath.expert_params(m) if m.is_moe else 0
    dense_layer = modelmath.layer_params(m) - experts
    ends = (share.embedding + share.head) if layout.pp > 1 else (1 if m.tie_embeddings else 2)
    vocabulary = m.vocab_size * m.d_model
    dense = share.blocks * dense_layer / layout.tp + ends * vocabulary / layout.tp
    return dense, share.blocks * experts / (layout.ep * layout.tp)


# The unit size `colossus bench` times FSDP with: a 128 x 128 Linear layer in float32.
_FSDP_PROBE_BYTES = (128 * 128 + 128) * 4

# Fixed per-GPU memory outside the model: CUDA context, NCCL buffers, allocator fragmentation and
# workspace (observed 2-4 GiB on H100 training jobs; Megatron-LM's memory estimator reserves similar).
RESERVED_GIB = 3.0


def _local_shape(shape: tuple[int, ...], split: str, tp: int, ep: int) -> tuple[int, ...]:
    """A parameter's shape on one rank after tensor and expert parallelism (modelmath.parameter_shapes)."""
    dims = list(shape)
    if split == "colwise":
        dims[0] //= tp
    elif split == "rowwise":
        dims[1] //= tp
    elif split in ("expert_in", "expert_out"):
        dims[0] //= ep
        dims[2 if split == "expert_in" else 1] //= tp
    return tuple(dims)


def _first_shard(shape: tuple[int, ...], dim: int, ranks: int) -> int:
    """Elements of the largest (first) of `ranks` chunks of a tensor split on `dim` as FSDP2 splits it
    (torch.chunk: ceil-sized chunks, the last ranks holding less or nothing)."""
    rows = shape[dim] if shape else 1
    return min(rows, math.ceil(rows / ranks)) * math.prod(shape) // max(rows, 1)


def state_bytes(m: ModelConfig, layout: Layout, pp_rank: int = 0) -> dict[str, float]:
    """Bytes of training state on the rank that holds the most (the first of each sharded group: FSDP2
    gives the first ranks the larger chunks) of pipeline rank `pp_rank`'s stages, as the trainer keeps it
    (modelmath.state_bytes_per_param): fp32 `params`, `gradients` and `optimizer` moments, each
    parameter split by tensor and expert parallelism (modelmath.parameter_shapes) and, under ZeRO 1-3,
    sharded by FSDP over the shard group (dense weights) or its ep-th part (experts, on their second
    dimension the ranks divide where fewer experts remain than ranks: parallelize.expert_shard_dim); and the gathered
    compute `copies` held through the step (ZeRO 0-2). With a few thousand ranks and more, a dense
    matrix has fewer rows than ranks and the first rank's row is far above the average share.
    `colossus train --dry-run` builds the real sharded model and checks these figures."""
    block, rest = modelmath.parameter_shapes(m)
    share = rank_share(layout, m.n_layers, pp_rank)
    layers = share.blocks
    if layout.pp > 1:  # the embedding on the first stage, the final norm and output (or the tied copy) on the last
        vocabulary = ("embedding.weight", (m.vocab_size, m.d_model), "colwise")
        rest = ([vocabulary] if share.embedding else []) + (
            [("norm.weight", (m.d_model,), "replicated"), vocabulary] if share.head else [])
    dense_ranks = layout.shard_group if layout.zero >= 1 else 1
    expert_ranks = max(dense_ranks // layout.ep, 1) if layout.zero >= 1 else 1
    sharded = whole = 0.0
    for count, params in ((layers, block), (1, rest)):
        for _, shape, split in params:
            local = _local_shape(shape, split, layout.tp, layout.ep)
            expert = split.startswith("expert")
            ranks = expert_ranks if expert else dense_ranks
            dim = expert_shard_dim(local, ranks) if expert else 0
            sharded += count * _first_shard(local, dim, ranks)
            whole += count * math.prod(local)
    per = modelmath.state_bytes_per_param(layout.zero, 1, layout.precision)  # bytes per element held
    return {"params": sharded * per["params"], "gradients": sharded * per["gradients"],
            "optimizer": sharded * per["optimizer"], "copies": whole * per["copies"]}


def memory_breakdown(m: ModelConfig, layout: Layout, software: Software = Software(),
                     reserved_gib: float = RESERVED_GIB, cache: dict | None = None) -> dict[str, float]:
    """Bytes per GPU of the most loaded (first) pipeline stage at its peak: as the backward starts, as
    it passes a layer, or (gradients freed each step) as it ends. `cache` memoises the training state
    across the layouts of one search (it depends only on the sharding)."""
    element_bytes = modelmath.ACTIVATION_ELEMENT_BYTES[layout.precision]
    key = ("state", layout.tp, layout.ep, layout.pp, layout.vpp, layout.pp_schedule, layout.pp_layers, layout.zero,
           layout.shard_group, layout.precision)
    state = cache.get(key) if cache is not None else None
    if state is None:  # the pipeline rank holding the most state (the first, the last or a full middle one)
        state = max((state_bytes(m, layout, rank) for rank, _ in distinct_shares(layout, m.n_layers)),
                    key=lambda s: s["params"] + s["copies"])
        if cache is not None:
            cache[key] = state
    weights, grads, optimizer = state["params"] + state["copies"], state["gradients"], state["optimizer"]
    tokens = layout.mbs * m.seq_len / layout.cp
    layers = max(share.blocks for _, share in distinct_shares(layout, m.n_layers))
    stored = lambda recompute: modelmath.activation_bytes_per_token(  # noqa: E731
        m, recompute, element_bytes, software.fused_elementwise, software.fused_attention) * tokens / layout.tp + (
        unsplit_bytes(m, tokens, layout.tp, element_bytes, software) if recompute != "full" else 0.0)
    # 1F1B keeps pp micro-batches in flight on the first stage; interleaving adds (pp-1)/(pp*vpp)
    # (Korthikanti et al. 2022, section 4.2.3).
    in_flight = min(layout.pp, layout.micro_batches)
    if layout.vpp > 1:
        in_flight *= 1 + (layout.pp - 1) / (layout.pp * layout.vpp)
    # What the forward leaves for the backward; parallel.recompute_every recomputes only some blocks.
    fraction = layout.recomputed_fraction(m.n_layers)
    kept = (fraction * stored(layout.recompute) + (1 - fraction) * stored("none")) * layers * in_flight
    # fp32 logits of the loss. Eager PyTorch briefly holds four copies as the backward starts (the
    # logits, log-softmax's output and the gradients of both), one while the layers' backward runs.
    logit = (4 * m.vocab_size * tokens / layout.tp) if layout.pp == 1 else 0.0
    first_copies = 1 if software.fused_elementwise else 4
    # Through each layer the backward also holds that layer's activations again if they were
    # recomputed, and, in eager PyTorch, the gradients of its widest intermediates (the FFN's gate,
    # up and product, or input and activation).
    recomputed = stored("none") if layout.recompute != "none" else 0.0
    gated = m.ffn_type in ("geglu", "swiglu")
    working = 0.0 if software.fused_elementwise else (
        (3 if gated else 2) * min(m.top_k, m.n_experts) * m.ffn_dim * element_bytes * tokens / layout.tp)
    activations = max(kept + first_copies * logit, kept + logit + recomputed + working)
    if not software.persistent_grads:
        # Gradients appear as the backward frees activations: the peak is where it starts (above) or
        # where it ends (all gradients and the first layer's activations); "gradients" is what the end
        # adds over the start.
        grads = max(0.0, grads + stored("none") + working - activations)
    unsharded = 0.0
    if layout.zero >= 3:  # FSDP gathers a layer ahead: two layers' compute copies at once
        layer = modelmath.layer_params(m) / layout.tp
        unsharded = 2 * layer * modelmath.COPY_BYTES[layout.precision] / (layout.ep if m.is_moe else 1)
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations,
            "buffers": unsharded, "reserved": reserved_gib * GIB}


# ------------------------------------------------------------------------------------ step time


def pipeline_bubble(layout: Layout, micro: float, forward: float, weight_gradients: float) -> float:
    """Idle time of a pipeline step, for a rank whose work per micro-batch takes `micro` seconds, of which
    `forward` is its forward and `weight_gradients` the backward's weight-gradient GEMMs.
    1F1B and interleaved 1F1B: (pp - 1) / vpp micro-batch slots (Narayanan et al. 2021, section 2.2.2).
    ZB-V: each rank holds two half-size chunks and fills the bubble with weight-gradient passes W; with
    T_F, T_B (input gradients, recomputation and the rest), T_W per chunk it idles
    (pp - 1)(T_F + T_B - 2 T_W), zero when the three are equal (Qi et al. 2024, section 6)."""
    if layout.pp == 1:
        return 0.0
    if layout.pp_schedule == "zbv":
        rest = micro - forward - weight_gradients
        return (layout.pp - 1) * max(0.0, (forward + rest - 2 * weight_gradients) / 2)
    return (layout.pp - 1) / layout.vpp * micro


def predict(m: ModelConfig, cluster: Cluster, layout: Layout, profile: object | None = None,
            layer_costs: dict | None = None, software: Software = Software(),
            fitted: dict[str, float] | None = None) -> Prediction:
    """Step time, throughput, MFU and memory of one layout. `layer_costs` memoises the per-layer
    costs across the layouts of one search (they depend only on tp, cp, ep, mbs and precision)."""
    machine = Machine(cluster.gpu, cluster.gpus_per_node, cluster.nic_gbps, profile, fitted)
    key = (layout.tp, layout.cp, layout.ep, layout.mbs, layout.precision)
    layer = layer_costs.get(key) if layer_costs is not None else None
    if layer is None:
        layer = layer_cost(m, machine, *key, software)
        if layer_costs is not None:
            layer_costs[key] = layer
    attention_forward = layer.attention_core + layer.score_forward
    # Full recompute reruns the whole forward: its GEMMs and its element-wise third (fwd = 1 of 3 passes),
    # in the fraction of the blocks that recompute (parallel.recompute_every).
    fraction = layout.recomputed_fraction(m.n_layers)
    recompute_extra = fraction * {"none": 0.0, "selective": attention_forward,
                                  "full": layer.forward_gemm + attention_forward + layer.elementwise / 3}[layout.recompute]
    # Backward GEMMs: two per forward one (input and weight gradients; Kaplan et al. 2020, section 2.1).
    compute_layer = (3 * layer.forward_gemm + layer.attention_core + layer.attention_backward
                     + layer.score_forward + layer.score_backward
                     + recompute_extra + layer.elementwise)
    # Recomputing a layer under sequence parallelism repeats its forward all-gathers (Korthikanti 4.2.2).
    repeated = 1.0 + (0.5 * fraction if layout.recompute == "full" else 0.0)
    tp_layer = layer.tp_comm * repeated
    if software.overlap_tp_backward:
        # Half of tp_comm is the backward's: without sequence parallelism its two all-reduces are the
        # column-parallel layers' and hide; with it, of two all-gathers and two reduce-scatters the
        # reduce-scatters hide (the re-gathers are extra traffic, hidden too). At most the backward's GEMMs
        # hide them (the weight gradients' take as long as the forward's).
        hidden = layer.tp_comm / 2 * (0.5 if software.sequence_parallel else 1.0)
        tp_layer -= min(hidden, layer.forward_gemm)
    if software.overlap_tp_comm:
        tp_layer = max(0.0, tp_layer - 3 * layer.forward_gemm)
    ep_layer = layer.ep_comm * repeated
    # a recomputed attention core gathers its keys and values again
    cp_exposed = layer.cp_comm * (1.0 + (0.5 * fraction if layout.recompute != "none" else 0.0))
    forward_layer = layer.forward_gemm + attention_forward + layer.elementwise / 3
    if modelmath.routing_pass(m, layout.micro_batches):  # one more forward, without gradients (train/step.py)
        compute_layer += forward_layer
    tokens_micro = layout.mbs * m.seq_len / layout.cp
    # The last stage also computes the logits and the loss: its GEMM forward + backward.
    # fp8 recipes keep the output layer in bf16 (Megatron-LM's output layer is not a Transformer Engine
    # module; torchtitan's float8 docs filter "output"), as they keep attention.
    head_precision = "bf16" if layout.precision == "fp8" else layout.precision
    logits = 3 * machine.gemm(tokens_micro, m.vocab_size / layout.tp, m.d_model, head_precision)
    if profile is None:
        loss_bytes = CROSS_ENTROPY_BYTES_FUSED if software.fused_elementwise else CROSS_ENTROPY_BYTES_EAGER
        logits += machine.memory_time(loss_bytes * tokens_micro * m.vocab_size / layout.tp)
    if profile is not None and getattr(profile, "autograd_op_s", 0) > 0:
        logits += OPS_PER_MICRO_BATCH * profile.autograd_op_s  # embedding, final norm, loss: per-op costs
    # Each pipeline rank's work per micro-batch (its stages' blocks; the head on the last stage's rank):
    # the slowest paces the pipeline (layout.stage_layers splits the blocks).
    shares = [share for _, share in distinct_shares(layout, m.n_layers)]
    per_layer = compute_layer + tp_layer + ep_layer + cp_exposed
    rank_time = lambda share: share.blocks * per_layer + (logits if share.head else 0.0)  # noqa: E731
    pacing = max(shares, key=rank_time)
    stage, layers_per_stage = rank_time(pacing), pacing.blocks
    p2p = 0.0
    if layout.pp > 1:  # activations to the next stage forward and gradients back, per virtual stage
        element = 4 if profile is not None else 2
        p2p = 2 * layout.vpp * tokens_micro * m.d_model * element / layout.tp / machine.link_bytes_per_s(False)
    n_micro = layout.micro_batches
    dense, expert = stage_params(m, layout)
    # A separate gradient-accumulation pass over the rank's parameters in each micro-batch's backward.
    accumulate = machine.memory_time(software.grad_accumulation_bytes * (dense + expert)) if n_micro > 1 else 0.0
    micro = stage + p2p + accumulate
    bubble = pipeline_bubble(layout, micro, layers_per_stage * forward_layer, layers_per_stage * layer.forward_gemm)
    pipeline = n_micro * micro + bubble

    # Ranks that shard the state (ZeRO 1-3), or that all-reduce whole gradients (ZeRO 0).
    replicas = layout.shard_group if layout.zero >= 1 else layout.dp * layout.cp
    # The ranks a data-parallel collective spans stay inside one node when tp x cp x their count fits in one.
    inside_dp = layout.tp * replicas <= cluster.gpus_per_node
    grad_bytes = modelmath.WEIGHT_BYTES  # gradients are reduced in bf16 (Megatron-LM, FSDP MixedPrecisionPolicy)
    if layout.zero >= 3:
        # FSDP, one unit per layer plus the embeddings: all-gather each unit's weights before its forward
        # and again before its backward, every micro-batch; reduce-scatter its gradients. Overlapping
        # stacks prefetch the next unit during compute and reduce once per step; a plain eager stack
        # (overlap_grad_reduce=False) waits for every collective and reduces every micro-batch.
        units = layers_per_stage + 1
        unit_params = (dense + expert) / units
        gather_one = all_gather_time(machine, unit_params * modelmath.WEIGHT_BYTES, replicas, inside_dp)
        scatter_one = all_gather_time(machine, unit_params * grad_bytes, replicas, inside_dp)
        gather = 2 * n_micro * units * gather_one
        measured_unit = (profile.fsdp_unit_time(replicas, modelmath.parameter_tensors_per_layer(m))
                         if profile is not None and hasattr(profile, "fsdp_unit_time") else None)
        if measured_unit is not None and not software.overlap_grad_reduce:
            # A measured machine knows FSDP's fixed cost per unit (collectives, hooks, copies) from
            # `colossus bench` (64 KB units); bigger units add their extra bytes at the measured bandwidth.
            probe = all_gather_time(machine, _FSDP_PROBE_BYTES, replicas, inside_dp)
            extra = max(0.0, 2 * (gather_one - probe)) + max(0.0, scatter_one - probe)
            data_parallel = n_micro * units * (measured_unit + extra)
        elif software.overlap_grad_reduce:
            data_parallel = max(0.0, gather + units * scatter_one - 0.9 * pipeline) + gather_one
        else:
            data_parallel = gather + n_micro * units * scatter_one
    else:
        # Gradients all-reduced (or reduce-scattered + weights all-gathered: the same volume) once per step;
        # bucketed and overlapped with the last micro-batch's backward (PyTorch DDP, Li et al. 2020).
        sync = all_reduce_time(machine, (dense + expert) * grad_bytes, replicas, inside_dp)
        overlap = 2 / 3 * micro if layout.pp == 1 and software.overlap_grad_reduce else 0.0
        data_parallel = max(0.0, sync - overlap)
    if layout.zero >= 1 and layout.dp_replicate > 1:
        # HSDP: each shard's gradients are also all-reduced across the replicas (outside the node).
        shard_bytes = (dense / replicas + expert / max(replicas // layout.ep, 1)) * grad_bytes
        data_parallel += all_reduce_time(machine, shard_bytes, layout.dp_replicate,
                                         layout.world_size <= cluster.gpus_per_node)
    if layout.dp * layout.cp > 1:  # each step's scalar all-reduces: gradient norm, loss for logging, the stop flag
        data_parallel += 3 * all_reduce_time(machine, 4.0, layout.dp * layout.cp, layout.world_size <= cluster.gpus_per_node)
    owned = dense / (replicas if layout.zero >= 1 else 1) + expert / (max(replicas // layout.ep, 1) if layout.zero >= 1 else 1)
    optimizer = machine.memory_time(OPTIMIZER_BYTES_PER_PARAM * owned)
    step = pipeline + data_parallel + optimizer

    on_cpu = getattr(profile, "device", "") == "cpu"  # no CUDA context on a CPU
    memory = memory_breakdown(m, layout, software, 0.0 if on_cpu else RESERVED_GIB, layer_costs)
    total_memory = sum(memory.values())
    capacity = cluster.gpu.hbm_gb * 1e9
    tokens_per_step = layout.gbs * m.seq_len
    flops_per_token = modelmath.flops_per_token(m)
    tokens_per_s = tokens_per_step / step
    per_gpu = tokens_per_s * flops_per_token / layout.world_size
    peak = (profile.peak_flops() if profile is not None else cluster.gpu.peak_flops(layout.precision))
    time_parts = {
        "compute": n_micro * (layers_per_stage * compute_layer + accumulate),
        "tensor_parallel": n_micro * layers_per_stage * tp_layer,
        "expert_parallel": n_micro * layers_per_stage * ep_layer,
        "context_parallel": n_micro * layers_per_stage * cp_exposed,
        "pipeline_bubble": bubble,
        "data_parallel": data_parallel,
        "optimizer": optimizer,
    }
    return Prediction(layout, step, tokens_per_s, flops_per_token, per_gpu / 1e12, per_gpu / peak,
                      total_memory / GIB, total_memory <= capacity,
                      {k: v / GIB for k, v in memory.items()}, time_parts)



# ------------------------------------------------------------------------------------ a whole run

# A GPU's draw while training: a floor while it waits on communication or the pipeline, rising to its
# TDP while it computes. H100 idles near 10% of TDP and sits near TDP in dense GEMMs; Llama 3 reports
# site power swinging by tens of MW when all GPUs wait at once (Dubey et al. 2024, section 3.3.4).
# The 0.35 floor (a waiting-but-clocked GPU) is an assumption, not a measurement.
GPU_WAITING_POWER_FRACTION = 0.35


def busy_fraction(prediction: Prediction) -> float:
    """Share of the step a GPU spends computing (the rest it waits on communication or the pipeline)."""
    compute = prediction.time_s.get("compute", 0.0) + prediction.time_s.get("optimizer", 0.0)
    return min(1.0, compute / prediction.step_time_s) if prediction.step_time_s > 0 else 0.0


def it_power_w(cluster: Cluster, busy: float) -> float:
    """IT power of the job's GPUs and their nodes: each GPU between its waiting floor and its TDP by
    the busy fraction, plus CPUs, memory, NICs and fans per node (per-node overhead)."""
    gpus = sum(gpu.tdp_w * count for gpu, count in cluster.gpus_by_type())
    draw = gpus * (GPU_WAITING_POWER_FRACTION + (1 - GPU_WAITING_POWER_FRACTION) * busy)
    return draw + cluster.nodes * cluster.node_overhead_w


def run_totals(prediction: Prediction, cluster: Cluster, tokens: float, usd_per_gpu_hour: float) -> dict[str, float]:
    """Days, GPU-hours, facility energy (IT power x PUE) and cost of training `tokens` at this speed."""
    seconds = tokens / prediction.tokens_per_s
    power = it_power_w(cluster, busy_fraction(prediction))
    gpu_hours = cluster.n_gpus * seconds / 3600
    return {
        "days": seconds / 86400,
        "gpu_hours": gpu_hours,
        "it_power_mw": power / 1e6,
        "facility_power_mw": power * cluster.pue / 1e6,
        "energy_mwh": power * cluster.pue * seconds / 3600 / 1e6,
        "cost_usd": gpu_hours * usd_per_gpu_hour,
        "total_model_flops": tokens * prediction.model_flops_per_token,
    }
