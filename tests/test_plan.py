"""The planner: memory and time formulas, the layout search, the published-runs validation and the
`colossus plan` command line (its flags and JSON keys are a contract)."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from colossus import modelmath
from colossus.config import ModelConfig, config_from_dict
from colossus.errors import UserError
from colossus.models.presets import get_preset
from colossus.plan.cluster import get_cluster
from colossus.hardware import GEMM_EFFICIENCY, GPUS
from colossus.layout import LAYOUT_KEYS, layout_from_keys, least_micro_batches, stage_layers
from colossus.plan.costmodel import (Machine, Software, all_reduce_time, flash_attention_time, gemm_efficiency, gemm_time,
                                     memory_breakdown, predict)
from colossus.plan.planner import plan, write_config
from colossus.plan.search import candidates, parse_layout, search
from colossus.plan.validation import Validator, source_of, validated_runs
from conftest import REPO, run_colossus

GPT_175B = ModelConfig(name="gpt-175b", n_layers=96, d_model=12288, n_heads=96, n_kv_heads=96, head_dim=128,
                       ffn_dim=4 * 12288, ffn_type="gelu", n_experts=1, top_k=1, vocab_size=51200, seq_len=2048,
                       norm="pre")


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator(validated_runs())


def test_published_runs_step_time(validator: Validator) -> None:
    """Every validated published run, in sample (the shipped constants): median step-time error at most
    4.5% and none worse than 12% over 33 runs: MoE runs, runs on 8,000 to 16,384 GPUs, A100, H100 and
    H200 (issue 19 asks for 5%). The memory model refuses two layouts that were run, known misses: Llama 3
    405B's (interleaved, no recompute), and the 1T model's interleaved schedule with selective recompute
    (the 1 + (p-1)/(p m) factor on 1F1B's activations is Korthikanti et al.'s own, section 4.2.3; that run's
    chunk count and its state's bytes per parameter are not published)."""
    rows = validator.rows
    assert len(rows) >= 33
    assert sum(1 for row in rows if row["model"].get("n_experts", 1) > 1) >= 3
    assert sum(1 for row in rows if row["cluster"]["n_gpus"] >= 8000) >= 2
    assert {row["cluster"]["gpu"] for row in rows} >= {"a100-80gb", "h100-sxm", "h200-sxm"}
    checked = validator.in_sample()
    errors = {c.name: c.error for c in checked}
    worst = max(errors, key=lambda name: abs(errors[name]))
    assert statistics.median(abs(e) for e in errors.values()) <= 0.045, errors
    assert abs(errors[worst]) <= 0.12, (worst, errors[worst])
    assert {c.name for c in checked if not c.fits} <= {"llama3-405b-8192gpu", "llama3-405b-16384gpu",
                                                       "korthikanti-2022-1t-selective"}


def test_left_out_sources_and_the_shipped_constants_are_the_fit(validator: Validator) -> None:
    """The only fitted constants, the large-GEMM efficiency of each architecture, are what the published
    rows give (hardware.GEMM_EFFICIENCY is the fit, not a hand-set value); refit without each source in
    turn, that source's rows are predicted with a median error at most 6% (issue 19 asks for 8%)."""
    assert validator.fit(validator.rows) == {arch: GEMM_EFFICIENCY[arch] for arch in ("ampere", "hopper")}
    left = validator.left_out()
    assert {c.name for c, _ in left} == {row["name"] for row in validator.rows}
    assert statistics.median(abs(c.error) for c, _ in left) <= 0.06
    sources = {source_of(row) for row in validator.rows}
    assert len(sources) >= 10  # a refit without one source still has the others


@pytest.mark.parametrize("recompute, sequence_parallel, published_ms", [
    ("none", False, 19.6), ("none", True, 19.0), ("full", False, 27.2), ("selective", False, 20.9),
    ("selective", True, 20.3)])
def test_a_22b_layer_takes_korthikanti_table_4s_time(recompute: str, sequence_parallel: bool,
                                                     published_ms: float) -> None:
    """Korthikanti et al. 2022, Table 4: forward + backward of one layer of their 22B GPT (tp 8, micro-batch 4,
    written-out attention), five ways. With the backward's tensor-parallel collectives behind its GEMMs, as
    their Megatron-LM ran them (section 6.2), each is within 2.5% (without, 4-7% slower)."""
    model = config_from_dict({"model": next(row for row in validated_runs()
                                            if row["name"] == "korthikanti-2022-22b-full")["model"]}).model
    layout = layout_from_keys(dict(tp=8, pp=1, dp=1, mbs=4, gbs=4, recompute=recompute, zero=0))
    software = Software(fused_attention=False, sequence_parallel=sequence_parallel, overlap_grad_reduce=False,
                        overlap_tp_backward=True)
    predicted = predict(model, get_cluster("dgx-a100-8"), layout, software=software)
    layer_ms = (predicted.time_s["compute"] + predicted.time_s["tensor_parallel"]) / model.n_layers * 1e3
    assert layer_ms == pytest.approx(published_ms, rel=0.025)


def test_h200_measurements_are_predicted() -> None:
    """Our own steps on one H200 (bench/results/h200-2026-11-29.jsonl, torch.compile): the dense ~1B model
    within 10% of its measured step and the MoE within 15%, as the trainer runs them (SDPA only without
    the soft-cap, compiled element-wise code, gradients freed each step)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_throughput", REPO / "bench" / "throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [row for line in (REPO / "bench" / "results" / "h200-2026-11-29.jsonl").read_text().splitlines()
            for row in json.loads(line)["rows"] if row["mode"] == "compiled"]
    assert {row["shape"] for row in rows} == {"dense1b", "moe1b"}
    for row in rows:
        model = config_from_dict({"model": bench.GPU_SHAPES[row["shape"]]}).model
        layout = layout_from_keys(dict(tp=1, pp=1, dp=1, mbs=row["batch"], gbs=row["batch"], zero=0, recompute="none"))
        software = Software(fused_attention=model.attn_softcap == 0, overlap_grad_reduce=False, persistent_grads=False)
        predicted = predict(model, get_cluster("hgx-h200-8").with_gpus(1), layout, software=software)
        bound = 0.15 if model.is_moe else 0.10
        assert abs(predicted.step_time_s / row["step_s"] - 1) <= bound, (row["shape"], predicted.step_time_s, row["step_s"])


def test_gemm_tiles_waves_and_flash_attention() -> None:
    """The GEMM model's mechanisms: a GEMM one tile wider than the SMs hold runs a second, nearly empty
    wave, or smaller tiles in three fuller ones (the library picks the better); a side that is not a multiple of the tile pays for the padding; a short
    inner dimension pays each tile's pipeline fill. Causal FlashAttention computes half the scores' blocks
    (and the diagonal), its backward 2.5x its forward; fp8 GEMMs pay for casting their operands."""
    h100 = GPUS["h100-sxm"]
    full = gemm_efficiency(h100, 128 * 132, 256, 8192)  # 132 tiles: one wave
    spill = gemm_efficiency(h100, 128 * 133, 256, 8192)  # 133 tiles: two waves, or 266 half tiles: three
    assert spill == pytest.approx(full * max(133 / 264, 266 / 396), rel=1e-6)
    assert gemm_efficiency(h100, 128 * 132, 200, 8192) == pytest.approx(full * 200 / 256, rel=1e-6)
    assert gemm_efficiency(h100, 128 * 132, 256, 64) == pytest.approx(full * 0.5 * (8192 + 64) / 8192, rel=1e-6)
    assert full < GEMM_EFFICIENCY["hopper"]
    causal = flash_attention_time(h100, 32, 8192, 8192, 128, "bf16")
    dense_flops = 4 * 32 * 8192 * 8192 * 128
    waves = 2048 / (16 * 132)  # 32 heads x 64 query blocks over 132 SMs: 16 waves, the last partial
    assert causal == pytest.approx(dense_flops * (64 + 1) / 128 / (989e12 * (521 / 989) * waves), rel=1e-6)
    # FlashAttention-2 on Hopper runs at its published 308 TFLOP/s, cuDNN's 521: the same work takes longer.
    flash2 = flash_attention_time(h100, 32, 8192, 8192, 128, "bf16", "flash2")
    assert flash2 == pytest.approx(causal * 521 / 308, rel=1e-9)
    with pytest.raises(UserError, match="attention_kernel must be one of flash2, flash3, cudnn"):
        Software(attention_kernel="flash4")
    bf16, fp8 = gemm_time(h100, 16384, 8192, 8192, "bf16"), gemm_time(h100, 16384, 8192, 8192, "fp8")
    assert bf16 / 2 < fp8 < bf16  # twice the peak, less the casts


def test_activation_memory_matches_korthikanti_for_gpt() -> None:
    """GPT (MHA, 4h GELU MLP, pre-norm): 34 s b h bytes per layer in Korthikanti et al. (2022, eq. 1,
    without the 5 a s^2 b score terms) minus the two 1-byte dropout masks = 32 h per token."""
    assert modelmath.activation_bytes_per_token(GPT_175B) == 32 * 12288
    assert modelmath.activation_bytes_per_token(GPT_175B, "full") == 2 * 12288  # only the layer input


def test_zero_stages_shard_state_as_the_trainer_holds_it() -> None:
    """The trainer's state per parameter (FSDP2, mixed precision, AdamW): fp32 parameters, gradients and
    two moments, 4 + 4 + 8, plus the 2-byte bf16 copies held through the step. Unsharded that is ZeRO's
    18 bytes (Rajbhandari et al. 2020, Figure 1, K = 12); stage 2 keeps the copies whole and shards the
    16 (as the paper's stage 2 does); stage 1 runs as 2 (FSDP2 always shards gradients); stage 3 shards
    everything, its copies gathered a layer or two at a time (costmodel's "buffers")."""
    total = lambda zero, dp, precision="bf16": sum(modelmath.state_bytes_per_param(zero, dp, precision).values())  # noqa: E731
    assert total(0, 64) == 18
    assert total(1, 64) == total(2, 64) == pytest.approx(2 + 16 / 64)
    assert total(3, 64) == pytest.approx(16 / 64)
    assert total(0, 64, "fp32") == 16  # fp32 computes with the parameters themselves
    assert total(2, 64, "fp32") == pytest.approx(4 + 16 / 64)


def test_memory_falls_with_sharding_recompute_and_parallelism() -> None:
    keys = dict(tp=8, pp=8, dp=8, mbs=1, gbs=64, recompute="none", zero=0)
    base = layout_from_keys(keys)
    total = lambda changes: sum(memory_breakdown(GPT_175B, layout_from_keys({**keys, **changes})).values())  # noqa: E731
    assert total({"zero": 3}) < total({"zero": 1}) < total({})
    assert total({"recompute": "full"}) < total({"recompute": "full", "recompute_every": 2}) < total({})
    # weights under ZeRO 0: 175B / (tp 8 * pp 8) in fp32 (4 bytes) and its bf16 copies (2), plus the
    # embedding on the first stage
    weights = memory_breakdown(GPT_175B, base)["weights"]
    assert weights == pytest.approx((174.6e9 / 64 + 51200 * 12288 * 7 / 8 / 8) * (4 + 2), rel=0.02)


def test_all_reduce_follows_the_ring_formula() -> None:
    """Bus bandwidth convention: time = 2 (n-1)/n * bytes / bandwidth (+ latency); NVLink beats the NIC."""
    machine = Machine(GPUS["h100-sxm"], 8, 400.0)
    one_gb = 1e9
    inside, across = all_reduce_time(machine, one_gb, 8, True), all_reduce_time(machine, one_gb, 8, False)
    assert inside == pytest.approx(2 * 7 / 8 * one_gb / (450e9 * 0.82), rel=0.01)
    assert across > 5 * inside
    assert all_reduce_time(machine, one_gb, 1, False) == 0


def test_interleaving_shrinks_the_bubble_and_more_gpus_go_faster() -> None:
    cluster = get_cluster("dgx-a100-512")
    plain = predict(GPT_175B, cluster, layout_from_keys(dict(tp=8, pp=8, dp=8, mbs=1, gbs=512, recompute="full", zero=1)))
    interleaved = predict(GPT_175B, cluster, layout_from_keys(dict(tp=8, pp=8, vpp=4, dp=8, mbs=1, gbs=512,
                                                                  recompute="full", zero=1)))
    assert interleaved.time_s["pipeline_bubble"] < plain.time_s["pipeline_bubble"] / 3
    assert interleaved.step_time_s < plain.step_time_s
    bigger = predict(GPT_175B, get_cluster("dgx-a100-1024"), layout_from_keys(dict(tp=8, pp=8, dp=16, mbs=1, gbs=512,
                                                                                   recompute="full", zero=1)))
    assert bigger.step_time_s < plain.step_time_s and 0.3 < bigger.mfu < 0.6


def test_every_candidate_is_valid() -> None:
    """Parallel sizes multiply to the GPU count and divide what they split; micro-batches fill the pipeline."""
    model = get_preset("grok-1")
    layouts = candidates(model, 4096, 8, {})
    assert len(layouts) > 100
    for lay in layouts:
        assert lay.tp * lay.pp * lay.dp * lay.cp == 4096
        assert model.n_heads % lay.tp == 0 and model.n_kv_heads % lay.tp == 0 and model.n_experts % lay.ep == 0
        least, multiple = least_micro_batches(lay.pp_schedule, lay.pp, lay.vpp)
        assert lay.gbs % (lay.dp * lay.mbs) == 0 and lay.micro_batches >= least and lay.micro_batches % multiple == 0
        assert lay.stages <= model.n_layers
    assert {lay.pp_schedule for lay in layouts} == {"1f1b", "interleaved-1f1b", "zbv"}


def test_a_fixed_batch_on_a_cluster_that_does_not_factor_plans_an_uneven_pipeline() -> None:
    """Llama 3's batch (2,048 sequences of 8,192 tokens) for grok-1 on colossus-100k: 98,304 GPUs (the rest
    spares) leave at most 2,048 data-parallel ranks, so tp x pp x cp holds the factor 3, and only a
    pipeline can: 3, 6, 12, ... stages, which split grok-1's 64 layers unevenly."""
    planned = plan(get_preset("grok-1"), get_cluster("colossus-100k"), layout={"gbs": 2048})
    report = planned.report
    lay = report["layout"]
    assert report["fits"] and lay["gbs"] == 2048 and report["gpus_used"] == 98_304
    assert report["spare_gpus"] == 1_696 and lay["pp"] % 3 == 0 and 64 % lay["pp"]
    layout = layout_from_keys({k: (tuple(v) if k == "pp_layers" else v) for k, v in lay.items()})
    assert sum(stage_layers(layout, 64)) == 64 and len(set(stage_layers(layout, 64))) > 1


def test_the_batch_stays_near_its_budget_at_any_scale() -> None:
    """Without gbs the planner holds the batch near --batch-tokens (16.8M by default) on 1,024 and on
    100,000 GPUs, with tensor, context and pipeline parallelism rather than a bigger batch; a budget the
    cluster cannot reach gets the smallest batch it allows, not the fastest huge one; the JSON names the
    GPUs used and the spares (whole nodes)."""
    grok = get_preset("grok-1")
    budget = 16 * 2**20
    for cluster in ("dgx-h100-1024", "colossus-100k"):
        report = plan(grok, get_cluster(cluster)).report
        assert budget <= report["batch_tokens"] <= 1.25 * budget, (cluster, report["layout"])
        assert report["batch_tokens"] == report["layout"]["gbs"] * grok.seq_len
    big = plan(grok, get_cluster("colossus-100k")).report
    assert big["gpus_used"] + big["spares"] == 100_000 and big["spares"] % 8 == 0 and big["spares"] > 0
    lay = big["layout"]
    assert lay["tp"] * lay["cp"] * lay["pp"] >= 32  # dp alone would need 12,288 sequences (100M tokens)
    half = plan(grok, get_cluster("colossus-100k"), batch_tokens=8e6).report
    assert 8e6 <= half["batch_tokens"] <= 1.25 * 8e6 and half["step_time_s"] < big["step_time_s"]
    tiny = plan(grok, get_cluster("colossus-100k"), batch_tokens=1e6).report  # below tp8 x cp16's smallest
    assert tiny["batch_tokens"] <= 8e6, tiny["layout"]
    with pytest.raises(UserError, match="--batch-tokens"):
        plan(grok, get_cluster("colossus-100k"), batch_tokens=0)


def test_126_layers_plan_on_16_interleaved_stages() -> None:
    """Llama 3 405B's depth over its 16 pipeline ranks on 16,384 H100s, interleaved (32 stages of 3 or 4
    blocks, the embedding and the output counted as one each; Llama 3 ran 1F1B with 7, 8 x 14, 7)."""
    llama = ModelConfig(name="llama3-405b", n_layers=126, d_model=16384, n_heads=128, n_kv_heads=8, head_dim=128,
                        ffn_dim=53248, ffn_type="swiglu", n_experts=1, top_k=1, vocab_size=128256, seq_len=8192)
    result = search(llama, get_cluster("dgx-h100-16384"), {"pp": 16, "vpp": 2, "tp": 8, "gbs": 1024})
    best = result.ranked[0].layout
    assert (best.pp, best.vpp) == (16, 2) and best.pp_schedule in ("interleaved-1f1b", "zbv")
    split = stage_layers(best, 126)
    assert len(split) == 32 and sum(split) == 126 and set(split) == {3, 4} and split[0] == split[-1] == 3


def test_fixed_keys_are_kept() -> None:
    fixed = parse_layout("tp=4,pp=2,recompute=full,zero=1")
    result = search(get_preset("grok-1"), get_cluster("dgx-h100-1024"), fixed)
    assert result.ranked
    for p in result.ranked:
        assert (p.layout.tp, p.layout.pp, p.layout.recompute, p.layout.zero) == (4, 2, "full", 1)


@pytest.mark.parametrize("text, words", [
    ("tp=3", ["tp=3", "48 heads"]),
    ("pp=65", ["pp=65", "64 layers"]),
    ("ep=3", ["ep=3", "8 experts"]),
    ("tp=8,pp=4,dp=3,cp=1", ["does not divide", "1,024 GPUs"]),
    ("recompute=some", ["recompute", "none, selective, full"]),
    ("zero=5", ["zero=5", "ZeRO stage"]),
    ("size=2", ["size=2", "tp, pp"]),
])
def test_impossible_layouts_are_one_line_errors(text: str, words: list[str]) -> None:
    with pytest.raises(UserError) as error:
        search(get_preset("grok-1"), get_cluster("dgx-h100-1024"), parse_layout(text))
    assert all(word in str(error.value) for word in words), str(error.value)


def test_cluster_presets_and_files(tmp_path: Path) -> None:
    colossus = get_cluster("colossus-100k")
    assert (colossus.n_gpus, colossus.gpus_per_node, colossus.nic_gbps, colossus.gpu.name) == (100_000, 8, 400, "H100 SXM5")
    mixed = get_cluster("colossus-200k")
    assert sum(count for _, count in mixed.gpus_by_type()) == 200_000 and "slowest" in mixed.note
    assert get_cluster("hgx-h200-64").gpu.hbm_gb == 141
    path = tmp_path / "mine.toml"
    path.write_text('[cluster]\nn_gpus = 16\ngpus_per_node = 4\nnic_gbps = 100\n'
                    '[cluster.gpu]\nname = "X1"\nbf16_tflops = 500\nhbm_gb = 96\nhbm_tb_s = 4\nnvlink_gb_s = 400\ntdp_w = 600\n')
    mine = get_cluster(str(path))
    assert (mine.n_gpus, mine.gpu.bf16_tflops, mine.gpu.fp8_tflops) == (16, 500, 0)
    for bad, words in [("[cluster]\ngpu = \"z100\"\nn_gpus = 8\n", "unknown GPU 'z100'"),
                       ("[cluster]\ngpu = \"h100-sxm\"\nn_gpus = 0\n", "cluster.n_gpus must be positive"),
                       ("[cluster]\ngpu = \"h100-sxm\"\nn_gpus = 8\nspeed = 1\n", "unknown key cluster.speed")]:
        path.write_text(bad)
        with pytest.raises(UserError, match=words):
            get_cluster(str(path))
    with pytest.raises(UserError, match="multiple of 8"):
        get_cluster("dgx-h100-12")


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return run_colossus("plan", *args, timeout=120)


def test_grok1_on_colossus() -> None:
    """The acceptance plan: a layout that fits in 80 GB, its MFU, days and cost, in seconds."""
    planned = plan(get_preset("grok-1"), get_cluster("colossus-100k"), tokens=6e12)
    report = planned.report
    lay = report["layout"]
    # 100,000 = 2^5 x 5^5 leaves data-parallel groups FSDP cannot split the experts over evenly: the plan
    # trains on 98,304 = 2^15 x 3 and keeps the rest as hot spares
    assert lay["tp"] * lay["pp"] * lay["dp"] * lay["cp"] == report["gpus_used"] == 98_304
    assert report["spare_gpus"] == 100_000 - 98_304 and report["n_gpus"] == 100_000
    assert lay["dp_replicate"] * lay["dp_shard"] * lay["ep"] == lay["dp"]
    assert report["fits"] and report["memory_gib_per_gpu"] * 2**30 <= 80e9
    # About 1.5 s on a 2-vCPU Xeon with the suite idle; the bound is for a blow-up (pipeline costs recomputed
    # per rank and layout once made this 42 s), not a timing test: a loaded CI machine is slower.
    assert report["search_s"] < 10.0
    # consistency: tokens / (tokens per second) is the run time; cost is GPU-hours times the price
    assert report["days"] == pytest.approx(6e12 / report["tokens_per_s"] / 86400)
    assert report["cost_usd"] == pytest.approx(report["gpu_hours"] * 2.0)
    assert report["mfu"] == pytest.approx(report["model_tflops_per_gpu"] * 1e12 / 989e12)
    # 2,304 sequences (the 16.8M-token batch) over 98,304 GPUs: 512-token micro-batches, small GEMMs
    assert 0.1 < report["mfu"] < 0.7
    assert report["model_flops_per_token"] == modelmath.flops_per_token(get_preset("grok-1"))


def test_plan_command_line_and_its_json_keys(tmp_path: Path) -> None:
    """`colossus plan` prints the table, and --json the contract's keys (outside scripts read them);
    --write-config writes the trainer config of the same plan."""
    started = time.perf_counter()
    result = run_plan("--model", "grok-1", "--cluster", "colossus-100k", "--tokens", "6e12")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert "MFU" in result.stdout and "days" in result.stdout and "$" in result.stdout and elapsed < 30
    config = tmp_path / "g.toml"
    result = run_plan("--model", "grok-1", "--cluster", "colossus-100k", "--tokens", "6e12", "--json",
                      "--write-config", str(config))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("layout", "step_time_s", "tokens_per_s", "model_flops_per_token", "model_tflops_per_gpu", "mfu",
                "memory_gib_per_gpu", "fits", "days", "gpu_hours", "energy_mwh", "cost_usd", "gpus_used", "spares",
                "batch_tokens"):
        assert key in report, key
    assert set(report["layout"]) >= {"tp", "pp", "vpp", "dp", "ep", "cp", "mbs", "gbs", "recompute", "zero", "precision"}
    assert set(report["layout"]) >= set(LAYOUT_KEYS)
    assert_config_is_the_plan(tomllib.loads(config.read_text()), report["layout"])


def assert_config_is_the_plan(tables: dict, layout: dict) -> None:
    """A written config says the plan's layout in the trainer's keys."""
    parallel, train = tables["parallel"], tables["train"]
    for key in ("tp", "pp", "vpp", "cp", "ep", "dp_replicate", "dp_shard", "zero", "recompute", "recompute_every"):
        assert parallel[key] == layout[key], key
    assert parallel["dp_replicate"] * parallel["dp_shard"] * parallel["ep"] == layout["dp"]
    assert (train["global_batch"], train["micro_batch"], train["precision"]) == (layout["gbs"], layout["mbs"],
                                                                                 layout["precision"])


def test_written_config_is_the_plan_and_the_trainer_reads_it(tmp_path: Path) -> None:
    """The grok-1 plan as a run config: the trainer's loader accepts it unchanged, and on one process it
    stops with one line naming the world size the plan needs (its tp x ep experts the trainer runs)."""
    from colossus.config import layout_from_config, load_config
    from colossus.parallel.runtime import resolve_layout

    planned = plan(get_preset("grok-1"), get_cluster("colossus-100k"))
    path = write_config(planned, tmp_path / "g.toml")
    assert_config_is_the_plan(tomllib.loads(path.read_text()), planned.report["layout"])
    config = load_config(path)
    assert config.model == get_preset("grok-1")
    with pytest.raises(UserError) as error:
        resolve_layout(config, 1, "cuda")
    message = str(error.value)
    assert f"needs {planned.report['gpus_used']:,} processes, but 1 was launched" in message and "\n" not in message
    assert layout_from_config(config, planned.report["gpus_used"], "cuda") == planned.best.layout  # both ways


def test_fully_fixed_layout_and_model_file(tmp_path: Path) -> None:
    model = tmp_path / "model.toml"
    model.write_text('[model]\npreset = "large"\nn_layers = 16\n')
    result = run_plan("--model", str(model), "--cluster", "dgx-h100-64", "--json",
                      "--layout", "tp=8,pp=1,vpp=1,dp=8,ep=1,cp=1,mbs=1,gbs=64,recompute=full,zero=1,precision=bf16")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["layout"]["gbs"] == 64 and report["alternatives"] == []
    assert report["params_total"] == modelmath.params_total(config_from_dict({"model": {"preset": "large", "n_layers": 16}}).model)


@pytest.mark.parametrize("args, words", [
    (["--model", "grok-9", "--cluster", "colossus-100k"], "neither a preset"),
    (["--model", "grok-1", "--cluster", "tpu-pod"], "unknown cluster 'tpu-pod'"),
    (["--model", "grok-1", "--cluster", "dgx-a100-8"], "fits in no layout"),
    (["--model", "grok-1", "--cluster", "colossus-100k", "--layout", "tp=16"], "tp=16"),
    (["--model", "grok-1", "--cluster", "colossus-100k", "--gpus", "200000"], "--gpus 200000"),
    (["--model", "grok-1", "--cluster", "colossus-100k", "--batch-tokens", "-5"], "--batch-tokens"),
])
def test_plan_user_errors(args: list[str], words: str) -> None:
    result = run_plan(*args)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_gpu_names_map_to_their_datasheet_rows():
    """torch.cuda.get_device_name() strings find their own catalog row: a PCIe or NVL H100 is not an
    SXM part (756 / 835 vs 989 dense BF16 TFLOP/s), so MFU and energy would be off."""
    from colossus.hardware import gpu_from_device_name, gpu_key

    expected = {"NVIDIA H100 80GB HBM3": "h100-sxm", "NVIDIA H100 PCIe": "h100-pcie", "NVIDIA H100 NVL": "h100-nvl",
                "NVIDIA H200": "h200-sxm", "NVIDIA H200 NVL": "h200-nvl", "NVIDIA A100-SXM4-40GB": "a100-40gb", "NVIDIA A100-SXM4-80GB": "a100-80gb",
                "NVIDIA A100-PCIE-40GB": "a100-pcie-40gb", "NVIDIA A100 80GB PCIe": "a100-pcie-80gb"}
    found = {name: gpu_key(gpu_from_device_name(name)) for name in expected}
    assert found == expected
    assert gpu_from_device_name("NVIDIA GeForce RTX 4090") is None
    assert gpu_from_device_name("NVIDIA H100 PCIe").peak_flops("bf16") < gpu_from_device_name("NVIDIA H100 NVL").peak_flops("bf16") \
        < gpu_from_device_name("NVIDIA H100 80GB HBM3").peak_flops("bf16")
