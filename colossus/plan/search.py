"""Layout search: every valid layout for a model, a cluster and a global batch, ranked by predicted
throughput among those that fit in memory.

Keys fixed with `--layout K=V,...` are taken as given; the others are enumerated. A layout is valid
when its parallel sizes multiply to the GPU count, divide what they split (heads, KV heads, layers,
experts, sequence) and the global batch splits into whole micro-batches on every data-parallel rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from colossus.errors import UserError
from colossus.layout import (LAYOUT_KEYS, RECOMPUTE, TORCH_DTYPE_NAMES, Layout, check_fits, check_value,
                             layout_from_keys, least_micro_batches)
from colossus.modelconfig import ModelConfig
from colossus.plan.cluster import Cluster
from colossus.plan.costmodel import Prediction, Software, predict

# Without gbs the global batch is held near a token budget at any scale (--batch-tokens): about 16M
# tokens per step by default (Llama 3 405B's batch, Dubey et al. 2024, section 3.4). Past the critical
# batch size more tokens per step stop buying progress (McCandlish et al. 2018), so a bigger cluster
# should train the same batch faster, with tp, cp and pp, rather than a bigger batch with more dp.
# A layout's batch is the budget rounded up to whole micro-batches on every data-parallel rank (a multiple
# of pp for interleaved schedules); layouts whose batch comes out more than BATCH_TOLERANCE times the
# budget are searched only when no other layout exists.
DEFAULT_BATCH_TOKENS = 16 * 2**20
BATCH_TOLERANCE = 1.25
# On a measured machine (--cluster local-N) the default batch is the trainer's own default,
# train.global_batch = 8 sequences (or one micro-batch per rank when that is more): a plan runs here.
LOCAL_BATCH_SEQUENCES = 8
_TEXT_KEYS = ("recompute", "precision", "pp_schedule")


def parse_layout(text: str) -> dict[str, int | str]:
    """`tp=8,pp=4,recompute=full` -> a dict of fixed layout keys (a UserError names a bad one). The keys
    are colossus.layout.Layout's fields, and `dp`, the data-parallel degree (see layout_from_keys)."""
    fixed: dict[str, int | str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in LAYOUT_KEYS:
            raise UserError(f"--layout {item!r}: expected K=V with K one of {', '.join(LAYOUT_KEYS)}")
        if key == "pp_layers":  # blocks per stage, first to last: 7/8/8/7
            try:
                value = tuple(int(count) for count in value.split("/"))
            except ValueError:
                raise UserError(f"--layout pp_layers={value!r} must be block counts per stage, e.g. 3/3/2") from None
        elif key not in _TEXT_KEYS:
            try:
                value = int(value)
            except ValueError:
                raise UserError(f"--layout {key}={value!r} must be an integer") from None
        check_value(key, value, f"--layout {key}")
        fixed[key] = value
    return fixed


def _divisors(n: int, limit: int | None = None) -> list[int]:
    found = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    found += [n // d for d in found if d * d != n]
    return sorted(d for d in set(found) if limit is None or d <= limit)


@dataclass
class SearchResult:
    ranked: list[Prediction]  # fitting layouts, fastest first
    considered: int
    best_unfit: Prediction | None  # the least memory-hungry layout, when none fits
    fastest_unfit: Prediction | None = None  # and the fastest (search(keep_unfit=True))


def _smooth_sizes(limit: int) -> list[int]:
    """Sizes 2^a 3^b up to limit: the pipeline depths that divide the GPU counts a plan uses."""
    return sorted(2**a * 3**b for a in range(limit.bit_length()) for b in range(12) if 2**a * 3**b <= limit)


def _schedules(fixed: dict, vpp: int) -> list[str]:
    """The pipeline schedules that run vpp stages per rank: 1F1B one, interleaved 1F1B several, ZB-V two."""
    if "pp_schedule" in fixed:
        return [fixed["pp_schedule"]]
    return ["1f1b"] if vpp == 1 else ["interleaved-1f1b", "zbv"] if vpp == 2 else ["interleaved-1f1b"]


def candidates(m: ModelConfig, n_gpus: int, gpus_per_node: int, fixed: dict,
               max_batch_tokens: float = float("inf"), precision: str = "bf16",
               batch_tokens: float = DEFAULT_BATCH_TOKENS, uneven: bool = False) -> list[Layout]:
    """Every layout allowed by the model, the GPU count and the fixed keys (and, when gbs is not
    fixed, whose batch near batch_tokens stays within max_batch_tokens) that the trainer's own checks accept
    (colossus.layout.check_fits): whatever the planner ranks, `colossus train` can be given."""
    pick = lambda key, options: [fixed[key]] if key in fixed else options  # noqa: E731
    layouts = []
    tps = pick("tp", [t for t in _divisors(gpus_per_node) if m.n_heads % t == 0 and m.n_kv_heads % t == 0])
    cps = pick("cp", [c for c in (1, 2, 4, 8, 16) if m.seq_len % (2 * c) == 0 or c == 1])
    # Pipeline sizes: the layer count's divisors; with `uneven`, also 2^a 3^b sizes that split it unevenly
    # (the trainer balances the blocks, the embedding and the output over the stages: layout.stage_layers).
    pps = pick("pp", sorted(set(_divisors(m.n_layers, 128)) | set(_smooth_sizes(min(m.n_layers, 128)) if uneven else ())))
    eps = pick("ep", _divisors(m.n_experts) if m.is_moe else [1])
    mbss = pick("mbs", [1, 2, 4, 8])
    recomputes = pick("recompute", list(RECOMPUTE))
    # ZeRO 1 only when fixed: the trainer's FSDP2 runs it as stage 2 (gradients always sharded), so a
    # searched plan says 2, whose memory is what the run holds.
    zeros = pick("zero", [0, 2, 3])
    precision = fixed.get("precision", precision)
    for tp in tps:
        for cp in cps:
            for pp in pps:
                if n_gpus % (tp * cp * pp):
                    continue
                dp = n_gpus // (tp * cp * pp)
                if "dp" in fixed and fixed["dp"] != dp:
                    continue
                # Interleaving over any split with a block or more per stage (costmodel paces a pipeline by
                # its fullest rank).
                vpps = pick("vpp", [v for v in (1, 2, 4, 8) if pp * v <= m.n_layers] if pp > 1 else [1])
                for ep in eps:
                    if dp % ep or m.n_experts % ep:
                        continue
                    for mbs in mbss:
                        unit = dp * mbs
                        for vpp, schedule in ((v, s) for v in vpps if v == 1 or pp > 1 for s in _schedules(fixed, v)):
                            least, multiple = least_micro_batches(schedule, pp, vpp)
                            if "gbs" in fixed:
                                gbs = fixed["gbs"]
                                micro = gbs // unit
                                if gbs % unit or micro < least or micro % multiple:
                                    continue
                            else:
                                micro = max(least, math.ceil(batch_tokens / m.seq_len / unit))
                                micro = math.ceil(micro / multiple) * multiple
                                gbs = unit * micro
                                if gbs * m.seq_len > max_batch_tokens:
                                    continue
                            for recompute in recomputes:
                                for zero in zeros:
                                    if zero > 0 and dp * cp == 1 and "zero" not in fixed:
                                        continue  # nothing to shard over
                                    layout = _split(m, fixed, dict(
                                        tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, zero=zero, mbs=mbs, gbs=gbs,
                                        recompute=recompute, recompute_every=fixed.get("recompute_every", 1),
                                        precision=precision, pp_schedule=schedule,
                                        pp_layers=fixed.get("pp_layers", ())), dp)
                                    if layout is not None:
                                        layouts.append(layout)
    return layouts


def _split(m: ModelConfig, fixed: dict, keys: dict, dp: int) -> Layout | None:
    """The layout with data-parallel degree `dp` split into dp_replicate x dp_shard x ep as the ZeRO
    stage and the fixed keys say (layout_from_keys), or None where they cannot be or the trainer's checks
    refuse it."""
    split = {key: fixed[key] for key in ("dp_replicate", "dp_shard") if key in fixed}
    try:
        layout = layout_from_keys({**keys, **split, "dp": dp}, checked=True)
        check_fits(layout, m)
    except UserError:
        return None
    return layout


# A cluster need not train on every GPU: a count with small prime factors, a little below, splits into
# parallel groups that the cluster's own count may not (100,000 = 2^5 x 5^5 leaves data-parallel groups of
# 3,125, which divide none of a model's dimensions), and the rest wait as hot spares for the next failure
# (an assumption: up to 2% of the GPUs, the few largest such counts).
SPARE_FRACTION = 0.02
SPARE_COUNTS = 4


def gpu_counts(n_gpus: int, gpus_per_node: int) -> list[int]:
    """The GPU counts a plan may use on a cluster of n_gpus: all of them, and the few largest counts within
    SPARE_FRACTION below that are whole nodes of the form 2^a 3^b (or 5 times that)."""
    def smooth(count: int) -> bool:
        for prime in (2, 3):
            while count % prime == 0:
                count //= prime
        return count in (1, 5)

    low = math.ceil(n_gpus * (1 - SPARE_FRACTION))
    below = [c for c in range(n_gpus - n_gpus % gpus_per_node, low - 1, -gpus_per_node) if c != n_gpus and smooth(c)]
    return [n_gpus, *below[:SPARE_COUNTS]]


def search(m: ModelConfig, cluster: Cluster, fixed: dict, top: int = 5, profile: object | None = None,
           software: Software = Software(), spares: bool = True, batch_tokens: float | None = None,
           fitted: dict[str, float] | None = None, keep_unfit: bool = False) -> SearchResult:
    """Rank every layout of `m` on `cluster` that fits; with `spares`, layouts on slightly fewer GPUs
    too (gpu_counts), the rest kept as hot spares. Without a fixed gbs the batch is held near
    `batch_tokens` (default: DEFAULT_BATCH_TOKENS, or LOCAL_BATCH_SEQUENCES on a measured machine)."""
    if batch_tokens is not None and not batch_tokens > 0:
        raise UserError(f"--batch-tokens must be positive, got {batch_tokens:g}")
    counts = gpu_counts(cluster.n_gpus, cluster.gpus_per_node) if spares else [cluster.n_gpus]
    _check_fixed(m, cluster, fixed, counts)
    # A measured machine is planned in the precision it was measured in (fp32 on a CPU).
    precision = next((p for p, name in TORCH_DTYPE_NAMES.items() if name == getattr(profile, "dtype", "")), "bf16")
    if batch_tokens is None:
        batch_tokens = LOCAL_BATCH_SEQUENCES * m.seq_len if profile is not None else DEFAULT_BATCH_TOKENS
    # Widening passes until one finds layouts: near the batch budget, then any batch; each first with even
    # pipeline splits, then uneven ones too (a GPU count with a factor 3 needs a pipeline of 3, 6, 12, ...
    # stages; searched only when needed, as they double the layouts and the time).
    near = batch_tokens * BATCH_TOLERANCE
    layouts: list[Layout] = []
    for limit, uneven in ((near, False), (near, True), (float("inf"), False), (float("inf"), True)):
        layouts = [layout for n in counts for layout in candidates(m, n, cluster.gpus_per_node, fixed, limit,
                                                                   precision, batch_tokens, uneven)]
        if layouts:
            break
    if not layouts:
        raise UserError(_why_no_layout(m, cluster, fixed))
    layer_costs: dict = {}
    predictions = [predict(m, cluster, layout, profile, layer_costs, software, fitted) for layout in layouts]
    fitting = sorted((p for p in predictions if p.fits), key=lambda p: (-p.tokens_per_s, p.memory_gib_per_gpu))
    if fitting and limit == float("inf") and "gbs" not in fixed:
        # No layout comes near the budget: keep the batch as near it as this cluster allows.
        smallest = min(p.layout.gbs for p in fitting)
        fitting = [p for p in fitting if p.layout.gbs <= smallest * BATCH_TOLERANCE]
    best_unfit = None if fitting else min(predictions, key=lambda p: p.memory_gib_per_gpu)
    fastest_unfit = max(predictions, key=lambda p: p.tokens_per_s) if keep_unfit and not fitting else None
    return SearchResult(fitting[:top], len(layouts), best_unfit, fastest_unfit)


def _check_fixed(m: ModelConfig, cluster: Cluster, fixed: dict, counts: list[int]) -> None:
    """Name the first fixed key that cannot work, before searching."""
    n = cluster.n_gpus
    if "tp" in fixed and (m.n_heads % fixed["tp"] or m.n_kv_heads % fixed["tp"]):
        raise UserError(f"--layout tp={fixed['tp']} does not divide the model's {m.n_heads} heads and {m.n_kv_heads} KV heads")
    if "pp" in fixed and fixed["pp"] > m.n_layers:
        raise UserError(f"--layout pp={fixed['pp']} is more pipeline stages than the model's {m.n_layers} layers")
    if "ep" in fixed and m.n_experts % fixed["ep"]:
        raise UserError(f"--layout ep={fixed['ep']} does not divide the model's {m.n_experts} experts")
    if "cp" in fixed and fixed["cp"] > 1 and m.seq_len % (2 * fixed["cp"]):
        raise UserError(f"--layout cp={fixed['cp']}: 2*cp must divide seq_len {m.seq_len}")
    product = 1
    for key in ("tp", "pp", "dp", "cp"):
        product *= fixed.get(key, 1)
    full = all(k in fixed for k in ("tp", "pp", "dp", "cp"))
    if all(count % product or (full and product != count) for count in counts):
        given = " x ".join(f"{k}={fixed[k]}" for k in ("tp", "pp", "dp", "cp") if k in fixed)
        spare = f" or the {', '.join(f'{c:,}' for c in counts[1:])} it may use with spares" if len(counts) > 1 else ""
        raise UserError(f"--layout {given} does not divide the {n:,} GPUs{spare} (tp x pp x dp x cp must equal them)")
    if "vpp" in fixed and "pp" in fixed and fixed["pp"] * fixed["vpp"] > m.n_layers:
        raise UserError(f"--layout pp={fixed['pp']} x vpp={fixed['vpp']} is more stages than the model's {m.n_layers} layers")


def _why_no_layout(m: ModelConfig, cluster: Cluster, fixed: dict) -> str:
    if "gbs" in fixed:
        return (f"no layout splits gbs={fixed['gbs']} sequences into whole micro-batches over the data-parallel ranks "
                f"of {cluster.n_gpus:,} GPUs; choose a gbs that the data-parallel size times mbs divides")
    return (f"no valid layout of {cluster.n_gpus:,} GPUs for this model and --layout "
            f"({', '.join(f'{k}={v}' for k, v in fixed.items()) or 'nothing fixed'}); try another --gpus")


