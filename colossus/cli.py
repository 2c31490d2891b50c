"""The `colossus` command line. Each subcommand parses its flags and calls one library function;
a UserError from anywhere becomes one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from colossus import __version__
from colossus.errors import UserError

if TYPE_CHECKING:  # at run time the profile module (and torch) loads only for `colossus bench`
    from colossus.plan.profile import MachineProfile

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Colossus: train, plan and account for Grok-style mixture-of-experts language models,
from one laptop CPU to a 100,000-GPU cluster.

Start with `colossus train`: it trains the `tiny` MoE on this machine's Python standard
library (no download) into ./runs/tiny; run it again to resume."""

TRAIN_EPILOG = """\
examples:
  colossus train                                   # tiny MoE on the stdlib corpus, CPU, ~3 minutes
  colossus train --steps 600                       # resume ./runs/tiny and train on to step 600
  colossus train configs/tiny.toml --out runs/a --set train.lr=1e-3 --set model.n_layers=6
  colossus train --set model.preset=small --set data.tokenizer=bpe --set model.vocab_size=4096

The run folder holds config.toml (resolved config), metrics.jsonl, events.jsonl, tb/ (TensorBoard),
checkpoints/step-N/ and summary.json. Values in --set are TOML: numbers, true/false, "strings".

exit status: 0 done; 2 bad input (one line on stderr); 75 stopped by SIGTERM/SIGINT after writing a
checkpoint (run the same command to continue); 86 a hung rank stopped by the watchdog."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colossus", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"colossus {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="train a model (or resume a run)", epilog=TRAIN_EPILOG,
                                description="Train a model from a TOML config, or resume the run in --out.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", nargs="?", metavar="CONFIG.toml", help="run config; omitted: the tiny defaults")
    train.add_argument("--out", metavar="DIR", help="run folder (default: runs/<model name>); an existing run resumes")
    train.add_argument("--steps", type=int, metavar="N", help="train until step N (same as --set train.steps=N)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config key, e.g. --set train.lr=1e-3 (repeatable)")

    models = commands.add_parser("models", help="list model presets with parameters and FLOPs per token",
                                 description="List the model presets: total and active parameters, FLOPs per token.")
    models.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    from colossus.plan.command import add_parser as add_plan_parser
    from colossus.plan.simulate_command import add_parser as add_simulate_parser

    add_plan_parser(commands)
    add_simulate_parser(commands)
    report = commands.add_parser("report", help="write RUN/report.md and report.html with figures, ledger and thresholds",
                                 description="Write a report of a run folder: loss, validation, throughput and MFU, "
                                             "expert load, interruptions and restarts, the compute ledger and the "
                                             "regulatory thresholds (report.md, report.html and PNG figures in the folder).")
    report.add_argument("run", metavar="RUN", help="a run folder written by `colossus train`")
    launch = commands.add_parser(
        "launch", help="print the torchrun command(s) for a run on N nodes",
        description="Print the exact torchrun command to run on each node (c10d rendezvous on the head node). "
                    "Everything after -- is passed to `colossus train`.",
        epilog="example:\n  colossus launch --nodes 2 --procs-per-node 8 --head 10.0.0.1 -- configs/tiny.toml --out runs/a\n"
               "Under Slurm, scripts/slurm/train.sbatch finds the head node itself.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    launch.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    launch.add_argument("--procs-per-node", type=int, default=8, help="processes per node, one per GPU (default 8)")
    launch.add_argument("--head", default="127.0.0.1", help="address of the rendezvous (head) node")
    launch.add_argument("--port", type=int, default=29500, help="rendezvous port on the head node (default 29500)")
    launch.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a failure (default 0)")
    launch.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN ARGS",
                        help="arguments for `colossus train` (config, --out, --set ...)")

    bench = commands.add_parser(
        "bench", help="measure this machine (matmul, memory, dispatch, all-reduce) for the planner",
        description="Measure what this machine achieves: matmul FLOP/s over a grid of shapes, memory bandwidth,\n"
                    "the cost of one small eager op, and all-reduce times across 2 local processes (gloo on a\n"
                    "CPU, NCCL on GPUs). Writes the machine profile that `colossus plan` reads.",
        epilog="examples:\n"
               "  colossus bench                  # under a minute; writes ~/.cache/colossus/machine_profile.json\n"
               "  colossus bench --quick          # fewer shapes and sizes, 10-20 s\n"
               "  colossus bench --threads 1 --out profile-1t.json --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--out", metavar="FILE", help="where to write the profile (default: machine_profile.json "
                                                     "in the cache folder, ~/.cache/colossus)")
    bench.add_argument("--threads", type=int, metavar="N", help="CPU threads for the measurement "
                                                                "(default: torch's, all cores)")
    bench.add_argument("--quick", action="store_true", help="a smaller grid and fewer sizes: 10-20 s")
    bench.add_argument("--json", action="store_true", help="print the profile as JSON instead of a table")
    return parser


def run_launch(args: argparse.Namespace) -> int:
    from colossus.launch import plan_launch

    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    plan = plan_launch(args.nodes, args.procs_per_node, args.head, args.port, train_args, args.max_restarts)
    if plan.nodes == 1:
        print(plan.command())
    else:
        print(f"# run on each of the {plan.nodes} nodes (the same line everywhere; {plan.head} hosts the rendezvous):")
        print(plan.command())
    return 0


def run_train(args: argparse.Namespace) -> int:
    from colossus.config import load_config

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    config = load_config(args.config, overrides)
    from colossus.train.trainer import train  # torch loads only once the config is known to be good

    out = Path(args.out) if args.out else Path("runs") / config.model.name
    summary = train(config, out)
    if summary["preempted"]:
        from colossus.train.guards import EXIT_PREEMPTED

        return EXIT_PREEMPTED
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(f"done: step {summary['step']}, val_loss {summary['val_loss']:.4f} "
          f"(unigram baseline {summary['unigram_val_loss']:.4f}); run folder {out}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from colossus.plan.command import run_plan as plan

    return plan(args)


def run_simulate(args: argparse.Namespace) -> int:
    from colossus.plan.simulate_command import run_simulate as simulate

    return simulate(args)


def run_report(args: argparse.Namespace) -> int:
    from colossus.account.report import write_report

    markdown, page = write_report(Path(args.run))
    print(f"wrote {markdown} and {page}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from colossus import modelmath
    from colossus.models.presets import PRESETS

    rows = [modelmath.summary(cfg) for cfg in PRESETS.values()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Model presets: parameters, and FLOPs per trained token (6 N_active + 12 L H Q T)")
    for column in ("name", "layers", "d_model", "experts", "total", "active", "GFLOP/token"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for cfg, row in zip(PRESETS.values(), rows):
        experts = f"{cfg.n_experts} (top-{cfg.top_k})" if cfg.is_moe else "dense"
        table.add_row(row["name"], str(cfg.n_layers), str(cfg.d_model), experts, _human(row["params_total"]),
                      _human(row["params_active"]), f"{row['flops_per_token'] / 1e9:,.3f}")
    Console().print(table)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from colossus.data.cache import make_dir
    from colossus.plan.profile import default_profile_path

    out = Path(args.out) if args.out else default_profile_path()
    if out.is_dir():  # found before a minute of measuring, not after
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'machine_profile.json'}")
    make_dir(out.parent)
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    from colossus.plan.profile import measure  # torch loads only once the flags are known to be good

    print(f"measuring this machine ({'10-20 s' if args.quick else 'under a minute'}) ...", file=sys.stderr)
    profile = measure(threads=args.threads, quick=args.quick)
    profile.save(out)
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(profile), indent=1))
        return 0
    _print_profile(profile)
    print(f"wrote {out}")
    return 0


def _print_profile(profile: MachineProfile) -> None:
    from rich.console import Console
    from rich.table import Table

    from colossus.plan.profile import bus_bandwidth

    console = Console()
    peak = profile.peak_flops()
    peak_shape = next(row[:3] for row in profile.matmul if row[3] == peak)
    console.print(f"[bold]{profile.name}[/bold]: {profile.device}, {profile.dtype} matmuls, "
                  f"{profile.threads} thread{'s' * (profile.threads != 1)}")
    console.print(f"matmul peak {peak / 1e9:,.1f} GFLOP/s at m x n x k = {_shape(peak_shape)}")
    sizes = sorted({row[0] for row in profile.matmul})
    shapes = [(size, size, size) for size in sizes] + [(sizes[0], sizes[-1], sizes[-1])]  # last: one thin side
    table = Table(title="matmul of m x k by k x n")
    for column in ("m x n x k", "GFLOP/s", "of peak", "time"):
        table.add_column(column, justify="right")
    for m, n, k in shapes:
        flops = profile.matmul_flops(m, n, k)
        table.add_row(_shape((m, n, k)), f"{flops / 1e9:,.2f}", f"{flops / peak:.0%}",
                      _seconds(profile.matmul_time(m, n, k)))
    console.print(table)
    console.print(f"memory bandwidth {profile.memory_bytes_per_s / 1e9:,.1f} GB/s "
                  "(c = a + b over tensors larger than the caches)")
    console.print(f"op overhead {profile.op_overhead_s * 1e6:,.1f} µs (one eager add of 4 elements)")
    if not profile.allreduce:
        console.print("all-reduce: not measured (one device)")
        return
    table = Table(title=f"all-reduce of float32 ({'nccl' if profile.device == 'cuda' else 'gloo'})")
    for column in ("processes", "size", "time", "bus GB/s"):
        table.add_column(column, justify="right")
    for processes, nbytes, seconds in profile.allreduce:
        table.add_row(str(int(processes)), _bytes(nbytes), _seconds(seconds),
                      f"{bus_bandwidth(nbytes, seconds, int(processes)) / 1e9:,.2f}")
    console.print(table)


def _shape(shape: list[float] | tuple[int, ...]) -> str:
    return " x ".join(str(int(side)) for side in shape)


def _seconds(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if seconds >= scale:
            return f"{seconds / scale:,.2f} {unit}"
    return f"{seconds * 1e6:,.1f} µs"


def _bytes(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{int(nbytes)} B"


def _human(count: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(int(count))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": run_train, "models": run_models, "launch": run_launch, "plan": run_plan, "simulate": run_simulate, "report": run_report, "bench": run_bench}
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return handlers[args.command](args)
    except UserError as exc:
        print(f"colossus {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"colossus {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
