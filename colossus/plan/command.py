"""`colossus plan`: the best parallel layouts for a model on a cluster, with speed, memory and the
cost of a whole run. The flags and JSON keys are a contract (outside scripts read them)."""

from __future__ import annotations

import argparse
import json
import re
import time
import tomllib
from pathlib import Path

from colossus import modelmath
from colossus.config import ModelConfig, config_from_dict
from colossus.errors import UserError
from colossus.models.presets import PRESETS, get_preset
from colossus.plan.cluster import Cluster, get_cluster, local_cluster
from colossus.plan.costmodel import Prediction, Software, eager_cpu_software, run_totals
from colossus.plan.search import SearchResult, parse_layout, search
from colossus.account.thresholds import evaluate, load_thresholds

EPILOG = """\
examples:
  colossus plan --model grok-1 --cluster colossus-100k --tokens 6e12
  colossus plan --model grok-1 --cluster dgx-h100-1024 --layout tp=8,recompute=full
  colossus plan --model my_model.toml --cluster my_cluster.toml --gpus 4096 --json

--layout fixes any of tp, pp, vpp, dp, ep, cp, mbs, gbs (sequences), recompute (none|selective|full),
zero (0-3), precision (bf16|fp8); the keys left out are searched. A model file is a [model] table with
the trainer's keys (or a preset = "..." key); a cluster file is a [cluster] table with gpu, n_gpus,
gpus_per_node, nic_gbps (per GPU)."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser(
        "plan", help="choose a parallel layout and predict speed, memory, days, energy and cost",
        description="Search every valid parallel layout of a model on a cluster and rank those that fit in "
                    "memory by predicted throughput (an analytical cost model; see README, Planning).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("--model", required=True, metavar="PRESET|FILE.toml",
                      help=f"a model preset ({', '.join(PRESETS)}) or a TOML file with a [model] table")
    plan.add_argument("--cluster", required=True, metavar="PRESET|FILE.toml",
                      help="colossus-100k, colossus-200k, dgx-a100-N, dgx-h100-N, hgx-h200-N (N GPUs), a TOML file, "
                           "or local-N (N processes on this machine, from `colossus bench`)")
    plan.add_argument("--gpus", type=int, metavar="N", help="use N GPUs of the cluster (default: all)")
    plan.add_argument("--layout", default="", metavar="K=V,...", help="fix layout keys, e.g. tp=8,pp=4,recompute=full")
    plan.add_argument("--tokens", type=float, metavar="N", help="training tokens: adds days, GPU-hours, energy and cost")
    plan.add_argument("--usd-per-gpu-hour", type=float, metavar="X", help="price for the cost (default: the cluster's)")
    plan.add_argument("--profile", metavar="FILE.json",
                      help="with --cluster local-N: the machine profile from `colossus bench` (default: its cache file)")
    plan.add_argument("--top", type=int, default=5, metavar="K", help="layouts to list (default 5)")
    plan.add_argument("--json", action="store_true", help="print one JSON object (the best layout) instead of tables")


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


def plan(args: argparse.Namespace) -> dict:
    model = load_model(args.model)
    profile, software = None, Software()
    local = re.fullmatch(r"local-(\d+)", args.cluster)
    if local:
        # This machine, N processes, as `colossus bench` measured it, running the eager trainer.
        from colossus.plan.profile import MachineProfile, default_profile_path

        profile = MachineProfile.load(Path(args.profile) if args.profile else default_profile_path())
        cluster = local_cluster(profile, max(1, int(local.group(1))))
        software = eager_cpu_software(model)
    else:
        if args.profile:
            raise UserError("--profile goes with --cluster local-N (this machine); datasheet clusters need none")
        cluster = get_cluster(args.cluster)
    if args.gpus is not None:
        cluster = cluster.with_gpus(args.gpus)
    if args.tokens is not None and not args.tokens > 0:
        raise UserError(f"--tokens must be positive, got {args.tokens:g}")
    if args.usd_per_gpu_hour is not None and args.usd_per_gpu_hour < 0:
        raise UserError(f"--usd-per-gpu-hour must be >= 0, got {args.usd_per_gpu_hour:g}")
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    fixed = parse_layout(args.layout)
    started = time.perf_counter()
    result = search(model, cluster, fixed, top=args.top, profile=profile, software=software)
    elapsed = time.perf_counter() - started
    if not result.ranked:
        smallest = result.best_unfit
        raise UserError(
            f"{model.name} fits in no layout of {cluster.n_gpus:,} x {cluster.gpu.name} ({cluster.gpu.hbm_gb:g} GB): "
            f"the leanest of {result.considered:,} layouts ({smallest.layout.describe()}) needs "
            f"{smallest.memory_gib_per_gpu:.0f} GiB per GPU; use more GPUs, recompute=full, zero=3 or a GPU with more memory")
    best = result.ranked[0]
    usd = args.usd_per_gpu_hour if args.usd_per_gpu_hour is not None else cluster.usd_per_gpu_hour
    report = best.to_json()
    report.update({
        "model": model.name,
        "params_total": modelmath.params_total(model),
        "params_active": modelmath.params_active(model),
        "cluster": cluster.name,
        "gpu": cluster.gpu.name,
        "n_gpus": cluster.n_gpus,
        "layouts_considered": result.considered,
        "search_s": elapsed,
        "alternatives": [p.to_json() for p in result.ranked[1:]],
    })
    if cluster.note:
        report["cluster_note"] = cluster.note
    if args.tokens is not None:
        report.update(run_totals(best, cluster, args.tokens, usd))
        report["tokens"] = args.tokens
        report["usd_per_gpu_hour"] = usd
        # The projected ledger: the run's model FLOPs against the regulatory thresholds, and the day
        # of training each limit is passed (a plan is a run from scratch: no fine-tuning lineage).
        total = report["total_model_flops"]
        report["total_flops"] = total
        report["thresholds"] = evaluate(load_thresholds(), total, total, report["cost_usd"], finetune=False,
                                        flops_per_unit=best.tokens_per_s * 86400 * best.model_flops_per_token, unit="day")
    return {"report": report, "result": result, "cluster": cluster, "model": model}


def run_plan(args: argparse.Namespace) -> int:
    planned = plan(args)
    report = planned["report"]
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print_plan(report, planned["result"], planned["cluster"], planned["model"])
    return 0


def print_plan(report: dict, result: SearchResult, cluster: Cluster, model: ModelConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))  # the layout table needs the room
    console.print(
        f"[bold]{model.name}[/bold]: {report['params_total'] / 1e9:.1f}B parameters ({report['params_active'] / 1e9:.1f}B active), "
        f"{report['model_flops_per_token'] / 1e9:.0f} GFLOP/token, sequence {model.seq_len:,}\n"
        f"[bold]{cluster.name}[/bold]: {cluster.n_gpus:,} x {cluster.gpu.name} ({cluster.gpu.hbm_gb:g} GB), "
        f"{cluster.gpus_per_node} per node, {cluster.nic_gbps:g} Gb/s per GPU"
        + (f"\n  {cluster.note}" if cluster.note else "")
    )
    console.print(f"searched {result.considered:,} layouts in {report['search_s']:.2f} s")
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
