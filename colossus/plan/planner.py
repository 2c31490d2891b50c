"""`colossus plan` as a library: the best parallel layouts for a model on a cluster, with speed, memory
and the cost of a whole run, and the trainer config that runs the best one. The command line
(colossus/cli.py) parses the flags; the report's JSON keys are a contract (outside scripts read them)."""

from __future__ import annotations

import os
import re
import sys
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import tomli_w

from colossus import modelmath
from colossus.account.thresholds import evaluate, load_thresholds
from colossus.config import ModelConfig, config_from_dict, layout_tables
from colossus.errors import UserError
from colossus.files import write_atomic
from colossus.models.presets import PRESETS, get_preset
from colossus.plan.cluster import Cluster, get_cluster, local_cluster
from colossus.plan.costmodel import Prediction, Software, eager_cpu_software, run_totals
from colossus.plan.search import SearchResult, search

def load_model(spec: str) -> ModelConfig:
    """A preset name, or a TOML file whose [model] table uses the trainer's keys."""
    if spec in PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if not path.exists():
        raise UserError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing TOML file")
    try:
        tables = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"model file {path} is not valid TOML ({exc})") from None
    if not isinstance(tables.get("model"), dict):
        raise UserError(f"model file {path} has no [model] table (keys as in `colossus train` configs)")
    return config_from_dict({"model": tables["model"]}).model


@dataclass
class Plan:
    """What `colossus plan` found: the ranked layouts and the report of the best (the --json object)."""

    model: ModelConfig
    cluster: Cluster
    result: SearchResult
    report: dict

    @property
    def best(self) -> Prediction:
        return self.result.ranked[0]


def resolve_cluster(spec: str, gpus: int | None = None, profile_path: Path | None = None) -> tuple[Cluster, object | None]:
    """A cluster preset or file, or `local-N`: N processes on this machine as `colossus bench` measured
    it, each with its share of the cores as the trainer gives it (the profile from profile_path, else
    the cached one for that thread count, measured now if there is none); returns the cluster and the
    profile (or None)."""
    profile = None
    local = re.fullmatch(r"local-(\d+)", spec)
    if local:
        from colossus.plan.profile import MachineProfile, profile_for

        processes = max(1, int(local.group(1)))
        if profile_path is not None:
            profile = MachineProfile.load(profile_path)
        else:
            threads = max(1, (os.cpu_count() or 1) // processes)
            profile = profile_for(threads, "fp32", processes, say=lambda text: print(text, file=sys.stderr))
        cluster = local_cluster(profile, processes)
    else:
        if profile_path is not None:
            raise UserError("--profile goes with --cluster local-N (this machine); datasheet clusters need none")
        cluster = get_cluster(spec)
    if gpus is not None:
        cluster = cluster.with_gpus(gpus)
    return cluster, profile


def plan(model: ModelConfig, cluster: Cluster, layout: dict | None = None, tokens: float | None = None,
         usd_per_gpu_hour: float | None = None, top: int = 5, profile: object | None = None,
         spares: bool = True, batch_tokens: float | None = None) -> Plan:
    """Rank the layouts of `model` on `cluster` that fit (`layout` fixes some keys, as --layout does);
    with `tokens`, the whole run's days, energy, cost and regulatory thresholds. A measured machine
    (`profile`) is planned as our eager trainer runs there."""
    if tokens is not None and not tokens > 0:
        raise UserError(f"--tokens must be positive, got {tokens:g}")
    if usd_per_gpu_hour is not None and usd_per_gpu_hour < 0:
        raise UserError(f"--usd-per-gpu-hour must be >= 0, got {usd_per_gpu_hour:g}")
    if top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    software = eager_cpu_software(model) if profile is not None else Software()
    started = time.perf_counter()
    result = search(model, cluster, dict(layout or {}), top=top, profile=profile, software=software, spares=spares,
                    batch_tokens=batch_tokens)
    elapsed = time.perf_counter() - started
    if not result.ranked:
        smallest = result.best_unfit
        raise UserError(
            f"{model.name} fits in no layout of {cluster.n_gpus:,} x {cluster.gpu.name} ({cluster.gpu.hbm_gb:g} GB): "
            f"the leanest of {result.considered:,} layouts ({smallest.layout.describe()}) needs "
            f"{smallest.memory_gib_per_gpu:.0f} GiB per GPU; use more GPUs, recompute=full, zero=3 or a GPU with more memory")
    best = result.ranked[0]
    usd = usd_per_gpu_hour if usd_per_gpu_hour is not None else cluster.usd_per_gpu_hour
    report = best.to_json()
    report.update({
        "model": model.name,
        "params_total": modelmath.params_total(model),
        "params_active": modelmath.params_active(model),
        "cluster": cluster.name,
        "gpu": cluster.gpu.name,
        "n_gpus": cluster.n_gpus,
        "gpus_used": best.layout.world_size,  # the rest are hot spares (search.gpu_counts)
        "spare_gpus": cluster.n_gpus - best.layout.world_size,
        "spares": cluster.n_gpus - best.layout.world_size,  # GPUs, whole nodes (issue 19's key; spare_gpus kept)
        "spare_nodes": (cluster.n_gpus - best.layout.world_size) // cluster.gpus_per_node,
        "batch_tokens": best.layout.gbs * model.seq_len,
        "layouts_considered": result.considered,
        "search_s": elapsed,
        "alternatives": [p.to_json() for p in result.ranked[1:]],
    })
    if cluster.note:
        report["cluster_note"] = cluster.note
    if tokens is not None:
        report.update(run_totals(best, cluster, tokens, usd))
        report["tokens"] = tokens
        report["usd_per_gpu_hour"] = usd
        # The projected ledger: the run's model FLOPs against the regulatory thresholds, and the day
        # of training each limit is passed (a plan is a run from scratch: no fine-tuning lineage).
        total = report["total_model_flops"]
        report["total_flops"] = total
        report["thresholds"] = evaluate(load_thresholds(), total, total, report["cost_usd"], finetune=False,
                                        flops_per_unit=best.tokens_per_s * 86400 * best.model_flops_per_token, unit="day")
    return Plan(model, cluster, result, report)


def run_config(planned: Plan) -> dict[str, dict]:
    """The trainer config that runs the best layout: the whole [model] table, the layout's [parallel]
    keys and its batch and precision in [train] (colossus.config.layout_tables: the one translation)."""
    tables = layout_tables(planned.best.layout)
    return {"model": asdict(planned.model), "parallel": tables["parallel"], "train": tables["train"]}


def write_config(planned: Plan, path: Path) -> Path:
    """Write run_config() as TOML, with a header that says how to launch it."""
    layout = planned.best.layout
    config_from_dict(run_config(planned))  # the trainer's own validation, before anything is written
    header = (f"# colossus plan: {planned.model.name} on {planned.cluster.name}, {layout.describe()}\n"
              f"# {planned.best.step_time_s:.3g} s per step predicted; launch {layout.world_size:,} processes, e.g.\n"
              f"#   torchrun --nproc-per-node {min(layout.world_size, planned.cluster.gpus_per_node)}"
              + (f" --nnodes {-(-layout.world_size // planned.cluster.gpus_per_node)}"
                 if layout.world_size > planned.cluster.gpus_per_node else "")
              + f" -m colossus.train {path}\n")
    if path.is_dir():
        raise UserError(f"--write-config {path} is a folder; give a file name such as {path / 'run.toml'}")
    try:
        write_atomic(path, header + tomli_w.dumps(run_config(planned)))
    except OSError as exc:
        raise UserError(f"cannot write --write-config {path} ({exc.strerror})") from None
    return path


def print_plan(planned: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    report, result, cluster, model = planned.report, planned.result, planned.cluster, planned.model
    console = Console(width=max(Console().width, 150))  # the layout table needs the room
    console.print(
        f"[bold]{model.name}[/bold]: {report['params_total'] / 1e9:.1f}B parameters ({report['params_active'] / 1e9:.1f}B active), "
        f"{report['model_flops_per_token'] / 1e9:.0f} GFLOP/token, sequence {model.seq_len:,}\n"
        f"[bold]{cluster.name}[/bold]: {cluster.n_gpus:,} x {cluster.gpu.name} ({cluster.gpu.hbm_gb:g} GB), "
        f"{cluster.gpus_per_node} per node, {cluster.nic_gbps:g} Gb/s per GPU"
        + (f"\n  {cluster.note}" if cluster.note else "")
    )
    best_layout = result.ranked[0].layout
    console.print(f"searched {result.considered:,} layouts in {report['search_s']:.2f} s; batch {best_layout.gbs:,} x "
                  f"{model.seq_len:,} = {report['batch_tokens'] / 1e6:.1f}M tokens per step"
                  + (f"; the best trains on {report['gpus_used']:,} GPUs and keeps {report['spare_gpus']:,} as hot spares"
                     if report["spare_gpus"] else ""))
    table = Table(title="Fastest layouts that fit")
    for column in ("#", "tp", "pp", "vpp", "dp", "ep", "cp", "mbs", "gbs", "recompute", "zero", "step s", "tokens/s", "MFU", "GiB/GPU"):
        table.add_column(column, justify="right")
    for rank, p in enumerate(result.ranked, 1):
        lay = p.layout
        table.add_row(str(rank), str(lay.tp), str(lay.pp), str(lay.vpp), f"{lay.dp:,}", str(lay.ep), str(lay.cp),
                      str(lay.mbs), f"{lay.gbs:,}", lay.recompute, str(lay.zero), f"{p.step_time_s:.2f}",
                      f"{p.tokens_per_s:,.0f}", f"{p.mfu:.1%}", f"{p.memory_gib_per_gpu:.1f}")
    console.print(table)
    best: Prediction = result.ranked[0]
    console.print(f"best: {best.layout.describe()}: {best.step_time_s:.2f} s per step, {best.tokens_per_s:,.0f} tokens/s, "
                  f"{best.model_tflops_per_gpu:.3g} model TFLOP/s per GPU, MFU {best.mfu:.1%}")
    console.print("  memory per GPU (GiB): " + ", ".join(f"{k} {v:.1f}" for k, v in best.memory_gib.items())
                  + f" = {best.memory_gib_per_gpu:.1f} of {cluster.gpu.hbm_gb * 1e9 / 2**30:.1f}")
    console.print("  time per step (s): " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in best.time_s.items() if v > 0))
    if "days" in report:
        console.print(
            f"{report['tokens']:.3g} tokens: {report['days']:.1f} days, {report['gpu_hours'] / 1e6:.2f}M GPU-hours, "
            f"{report['energy_mwh']:,.0f} MWh ({report['facility_power_mw']:.1f} MW facility, PUE {cluster.pue:g}), "
            f"${report['cost_usd'] / 1e6:,.1f}M at ${report['usd_per_gpu_hour']:g}/GPU-hour, "
            f"{report['total_model_flops']:.2e} model FLOPs")
        for entry in report["thresholds"]:
            if not entry["applies"]:
                continue
            when = (f"crossed on day {entry['crosses_at_day']:.1f}" if entry["crossed"] else
                    f"not crossed ({report['total_flops'] / entry['limit_flops']:.1%} of it)")
            cost = f" and ${entry['limit_usd'] / 1e6:,.0f}M" if entry.get("limit_usd") else ""
            console.print(f"  {entry['name']:>10}: > {entry['limit_flops']:.0e} FLOP{cost} ({entry['status']}): {when}"
                          + (f"; asks: {entry['asks']}" if entry["crossed"] else ""))
