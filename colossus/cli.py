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
  colossus train g.toml --dry-run --world-size 98304   # rank 0 of a planned run, built here in meta tensors

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
    train.add_argument("--dry-run", action="store_true",
                       help="build the real sharded model and optimizer of rank 0 of --world-size ranks on this "
                            "machine (fake process group, meta tensors: no data, no compute) and print its bytes "
                            "beside the planner's")
    train.add_argument("--world-size", type=int, metavar="N", help="with --dry-run: the ranks of the run to build")
    train.add_argument("--json", action="store_true", help="with --dry-run: print one JSON object")

    models = commands.add_parser("models", help="list model presets with parameters and FLOPs per token",
                                 description="List the model presets: total and active parameters, FLOPs per token.")
    models.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    add_plan_parser(commands)
    add_simulate_parser(commands)
    report = commands.add_parser("report", help="write RUN/report.md and report.html with figures, ledger and thresholds",
                                 description="Write a report of a run folder: loss, validation, throughput and MFU, "
                                             "expert load, interruptions and restarts, the compute ledger and the "
                                             "regulatory thresholds (report.md, report.html and PNG figures in the folder).")
    report.add_argument("run", metavar="RUN", help="a run folder written by `colossus train`")
    export = commands.add_parser(
        "export", help="write a run's newest weights as a Hugging Face checkpoint (llama, mixtral or grok-1 layout)",
        description="Write the run's newest intact checkpoint as a Hugging Face model folder: config.json, "
                    "safetensors shards with their index, and tokenizer.json (transformers, vLLM and SGLang load it).",
        epilog="example:\n  colossus export runs/dense hf/dense --arch llama --dtype fp32",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("run", metavar="RUN", help="a run folder written by `colossus train`")
    export.add_argument("out", metavar="OUT", help="the folder to write (must not exist)")
    export.add_argument("--format", choices=("hf",), default="hf", help="hf: Hugging Face safetensors (default)")
    export.add_argument("--arch", choices=("auto", "llama", "mixtral", "grok-1"), default="auto",
                        help="the layout: llama (dense), mixtral (MoE), grok-1 (Grok-style MoE), auto (the first "
                             "that fits the model; default)")
    export.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="tensor dtype (default bf16)")
    export.add_argument("--shard-gb", type=float, default=5.0, metavar="GB",
                        help="the largest shard file, in GB (default 5, as the Hub's tools); memory holds one shard")
    importer = commands.add_parser(
        "import", help="read a Hugging Face checkpoint (llama, mixtral or grok-1 layout) into a run folder",
        description="Convert a Hugging Face model folder (config.json, safetensors shards) into a run folder: "
                    "config.toml with the model's [model], the tokenizer, and a DCP checkpoint (step 0) with each "
                    "rank's shards for the layout of --set parallel.* (default one process). Streamed: memory "
                    "holds one piece of at most 64 MiB at a time (and one tensor as it is read), not the model. train.init_from, "
                    "`colossus generate` and `colossus train --dry-run` accept the result.",
        epilog="examples:\n  colossus import hf/grok-1 --out runs/grok-1 --set parallel.tp=8 --set parallel.ep=8 "
               "--world-size 64\n"
               "  colossus train runs/grok-1/config.toml --set train.init_from=runs/grok-1 --out runs/grok-1-ft",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    importer.add_argument("hf_dir", metavar="HF_DIR", help="a Hugging Face model folder")
    importer.add_argument("--out", required=True, metavar="RUN", help="the run folder to write (must not exist)")
    importer.add_argument("--arch", choices=("auto", "llama", "mixtral", "grok-1"), default="auto",
                          help="the layout HF_DIR is in (default auto: as its config.json says)")
    importer.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                          help="a config key of the run, e.g. --set parallel.tp=2 for the shards' layout (repeatable)")
    importer.add_argument("--world-size", type=int, metavar="N",
                          help="the ranks the shards are for (default: the product of the parallel degrees)")
    generate = commands.add_parser(
        "generate", help="continue a prompt with a trained run's newest checkpoint",
        description="Print the prompt and its continuation, sampled from the run's newest intact checkpoint "
                    "with a KV cache (its model and tokenizer come from the run's config.toml).",
        epilog="examples:\n  colossus generate runs/tiny --prompt \"def \" --max-new-tokens 200\n"
               "  colossus generate runs/tiny --prompt \"import \" --temperature 0   # greedy",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_argument("run", metavar="RUN", help="a run folder written by `colossus train`")
    generate.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens to add (default 200)")
    generate.add_argument("--temperature", type=float, default=0.8, metavar="T", help="sampling temperature; 0 is greedy (default 0.8)")
    generate.add_argument("--top-k", type=int, default=40, metavar="K", help="sample among the K most likely tokens (default 40)")
    generate.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    generate.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token (slow; a reference)")
    generate.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu (default) or cuda")
    launch = commands.add_parser(
        "launch", help="print the torchrun command(s) for a run on N nodes",
        description="Print the exact torchrun command to run on each node (c10d rendezvous on the head node). "
                    "Everything after -- is passed to `colossus train`.",
        epilog="examples:\n  colossus launch --nodes 2 --procs-per-node 8 --head 10.0.0.1 -- configs/tiny.toml --out runs/a\n"
               "  colossus launch --replica-groups 3 --procs-per-node 3 --max-restarts 3 -- configs/tiny.toml \\\n"
               "      --out runs/ft --set parallel.dp_replicate=3\n"
               "Under Slurm, scripts/slurm/train.sbatch finds the head node itself (REPLICA_GROUPS=R for groups).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    launch.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    launch.add_argument("--procs-per-node", type=int, default=8, help="processes per node, one per GPU (default 8)")
    launch.add_argument("--head", default="127.0.0.1", help="address of the rendezvous (head) node")
    launch.add_argument("--port", type=int, default=29500, help="rendezvous port on the head node (default 29500)")
    launch.add_argument("--max-restarts", type=int, default=None,
                        help="torchrun restarts after a failure (default 0; 3 with --replica-groups)")
    launch.add_argument("--replica-groups", type=int, default=0, metavar="R",
                        help="split the job into R fault-tolerant replica groups (torchft): the Lighthouse, then one "
                             "torchrun job per group that restarts on its own; sets [faults] replica_groups")
    launch.add_argument("--lighthouse-port", type=int, default=29510, help="the Lighthouse's port on --head (default 29510)")
    launch.add_argument("--spare-nodes", type=int, default=0, metavar="S",
                        help="with --replica-groups on several nodes: S more nodes per group wait in its rendezvous "
                             "as hot spares, and one takes the place of a node that dies (default 0)")
    launch.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN ARGS",
                        help="arguments for `colossus train` (config, --out, --set ...)")

    rendezvous = commands.add_parser(
        "rendezvous", help="serve the replica groups' torchrun rendezvous (colossus launch prints it)",
        description="Keep every replica group's torchrun rendezvous store (ports PORT .. PORT + GROUPS - 1) on "
                    "this node, beside the torchft Lighthouse, until interrupted: a group's rendezvous then "
                    "outlives any of its own nodes, so torchrun can restart it with a spare node in place of a "
                    "dead one.")
    rendezvous.add_argument("--port", type=int, default=29500, help="the first group's port (default 29500)")
    rendezvous.add_argument("--groups", type=int, required=True, metavar="R", help="number of replica groups")

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
    bench.add_argument("--precision", choices=("fp32", "bf16"),
                       help="matmul precision (default: bf16 on a GPU, fp32 on a CPU; train.precision=bf16 on a "
                            "CPU needs a bf16 profile)")
    bench.add_argument("--json", action="store_true", help="print the profile as JSON instead of a table")
    return parser


PLAN_EPILOG = """\
examples:
  colossus plan --model grok-1 --cluster colossus-100k --tokens 6e12
  colossus plan --model grok-1 --cluster dgx-h100-1024 --layout tp=8,recompute=full
  colossus plan --model grok-1 --cluster colossus-100k --batch-tokens 8e6 --json
  colossus plan --model my_model.toml --cluster my_cluster.toml --gpus 4096 --json
  colossus plan --model tiny --cluster local-2 --write-config t.toml   # then: torchrun --nproc-per-node 2 -m colossus.train t.toml

--layout fixes any of the layout keys (the rest are searched; the same words as [parallel] and [train]):
  tp, pp, vpp, cp, ep          tensor, pipeline (and virtual), context and expert parallel sizes
  dp                           the data-parallel size dp_replicate x dp_shard x ep (split by zero)
  dp_replicate, dp_shard       the data-parallel split: replicas (HSDP) and ranks that shard
  zero                         0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + weights
                               (searched: 0, 2, 3; the trainer runs 1 as 2)
  mbs, gbs                     micro-batch and global batch, sequences (train.micro_batch, train.global_batch)
  recompute                    none, selective (the attention core) or full (whole blocks)
  recompute_every              recompute every k-th block only
  precision                    bf16 or fp8 (fp32 on a measured machine, local-N)
  pp_schedule                  1f1b, interleaved-1f1b (vpp >= 2) or zbv (zero bubble, vpp = 2)
  pp_layers                    blocks per pipeline stage, first to last, e.g. 3/3/2 (default: balanced,
                               the embedding and the output counting as a block each)
A model file is a [model] table with the trainer's keys (or a preset = "..." key); a cluster file is a
[cluster] table with gpu, n_gpus, gpus_per_node, nic_gbps (per GPU)."""

SIMULATE_EPILOG = """\
examples:
  colossus simulate --cluster colossus-100k --days 30
  colossus simulate --cluster colossus-100k --model grok-1 --tokens 6e12 --checkpoint-interval auto --plot goodput.png
  colossus simulate --cluster colossus-100k --model grok-1 --tokens 2e13 --grow 20:colossus-200k --json
  colossus simulate --cluster dgx-h100-16384 --days 54 --checkpoint-interval 1800   # Llama 3's log

Failures default to per-component rates fitted to Llama 3's 54-day log on 16,384 H100 (419 unexpected,
47 planned interruptions); --failures FILE.toml overrides any ([failures] <cause>_per_day, planned_per_day).
The model (default grok-1) sets the checkpoint size and, through `colossus plan`, speed and power."""


def add_plan_parser(commands: argparse._SubParsersAction) -> None:
    from colossus.models.presets import PRESETS

    plan = commands.add_parser(
        "plan", help="choose a parallel layout and predict speed, memory, days, energy and cost",
        description="Search every valid parallel layout of a model on a cluster and rank those that fit in "
                    "memory by predicted throughput (an analytical cost model; see README, Planning).",
        epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("--model", required=True, metavar="PRESET|FILE.toml",
                      help=f"a model preset ({', '.join(PRESETS)}) or a TOML file with a [model] table")
    plan.add_argument("--cluster", required=True, metavar="PRESET|FILE.toml",
                      help="colossus-100k, colossus-200k, dgx-a100-N, dgx-h100-N, hgx-h200-N (N GPUs), a TOML file, "
                           "or local-N (N processes on this machine, from `colossus bench`)")
    plan.add_argument("--gpus", type=int, metavar="N", help="use N GPUs of the cluster (default: all)")
    plan.add_argument("--layout", default="", metavar="K=V,...", help="fix layout keys, e.g. tp=8,pp=4,recompute=full")
    plan.add_argument("--tokens", type=float, metavar="N", help="training tokens: adds days, GPU-hours, energy and cost")
    plan.add_argument("--batch-tokens", type=float, metavar="N",
                      help="tokens per step to plan for when gbs is not fixed (default 16.8M, Llama 3's batch; on "
                           "local-N the trainer's 8 sequences): the planner keeps the batch near it at any scale")
    plan.add_argument("--usd-per-gpu-hour", type=float, metavar="X", help="price for the cost (default: the cluster's)")
    plan.add_argument("--profile", metavar="FILE.json",
                      help="with --cluster local-N: the machine profile from `colossus bench` (default: its cache file)")
    plan.add_argument("--top", type=int, default=5, metavar="K", help="layouts to list (default 5)")
    plan.add_argument("--json", action="store_true", help="print one JSON object (the best layout) instead of tables")
    plan.add_argument("--write-config", metavar="FILE.toml",
                      help="write the trainer config of the best layout ([model], [parallel], batch, precision)")


def add_simulate_parser(commands: argparse._SubParsersAction) -> None:
    from colossus.plan.simulation import DEFAULT_REPLICA_TIMEOUT_S, DEFAULT_RESTART_S, DEFAULT_STORAGE_GB_S

    sim = commands.add_parser(
        "simulate", help="failures, checkpoint interval, goodput, days and power of a run (Monte Carlo)",
        description="Simulate a long run on a cluster: unexpected and planned interruptions, lost work, "
                    "restarts, the best checkpoint interval (Young, Daly and Monte Carlo), goodput, wall-clock "
                    "days (p50/p90), energy and power swings. Speeds come from `colossus plan`.",
        epilog=SIMULATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sim.add_argument("--cluster", required=True, metavar="PRESET|FILE.toml", help="as for `colossus plan`")
    sim.add_argument("--gpus", type=int, metavar="N", help="use N GPUs of the cluster (default: all)")
    length = sim.add_mutually_exclusive_group(required=True)
    length.add_argument("--days", type=float, metavar="D", help="simulate D days of wall-clock time")
    length.add_argument("--tokens", type=float, metavar="N", help="simulate until N tokens are trained")
    sim.add_argument("--model", default="grok-1", metavar="PRESET|FILE.toml", help="model (default grok-1)")
    sim.add_argument("--layout", default="", metavar="K=V,...", help="fix layout keys, as for `colossus plan`")
    sim.add_argument("--checkpoint-interval", default="auto", metavar="S|auto",
                     help="seconds of training between checkpoints, or auto: the Monte Carlo optimum (default)")
    sim.add_argument("--checkpoint-mode", choices=("async", "sync"), default="async",
                     help="async: the loop waits only for staging (default); sync: for the whole write")
    sim.add_argument("--trials", type=int, default=200, metavar="N", help="Monte Carlo trials (default 200)")
    sim.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    sim.add_argument("--restart-s", type=float, default=DEFAULT_RESTART_S, metavar="S",
                     help=f"restart cost before the checkpoint load (default {DEFAULT_RESTART_S:g})")
    sim.add_argument("--repair-hours", type=float, default=0.0, metavar="H",
                     help="hours to repair a node a hardware failure took out; the run waits only when none of its "
                          "spare nodes (the GPUs the plan leaves over) is free (default 0: spares without limit)")
    sim.add_argument("--storage-gb-s", type=float, default=DEFAULT_STORAGE_GB_S, metavar="X",
                     help=f"checkpoint storage bandwidth, GB/s (default {DEFAULT_STORAGE_GB_S:g})")
    sim.add_argument("--failures", metavar="FILE.toml", help="override failure rates ([failures] table)")
    sim.add_argument("--recovery", choices=("restart", "replica"), default="restart",
                     help="restart: every failure restarts the whole job from its checkpoint (default); replica: "
                          "fault-tolerant replica groups ([faults] replica_groups), where a failed group takes the "
                          "state from a live peer while the others train on")
    sim.add_argument("--job-wide", metavar="CAUSE,...",
                     help="with --recovery replica: the failure causes that still restart the whole job (default "
                          "network_switch_cable,dependency; the causes are those of the Llama 3 log)")
    sim.add_argument("--replica-timeout-s", type=float, default=DEFAULT_REPLICA_TIMEOUT_S, metavar="S",
                     help="with --recovery replica: how long the other groups wait on a dead one before a collective "
                          f"gives up (NCCL; [faults] replica_timeout_s; default {DEFAULT_REPLICA_TIMEOUT_S:g})")
    sim.add_argument("--hot-spares", action=argparse.BooleanOptionalAction, default=True,
                     help="with --recovery replica: spare nodes wait in each group's rendezvous (colossus launch "
                          "--spare-nodes) and one replaces a dead node once torchrun notices it (default); "
                          "--no-hot-spares: a node is swapped in --restart-s")
    sim.add_argument("--replica-groups", type=int, default=0, metavar="R",
                     help="with --recovery replica: R groups (the layout's dp_replicate); default: as many as the "
                          "layout's data parallelism allows")
    sim.add_argument("--grow", metavar="DAY:CLUSTER", help="switch to a bigger cluster on DAY (re-planned), --tokens only")
    sim.add_argument("--plot", metavar="FILE.png", help="write goodput against checkpoint interval")
    sim.add_argument("--json", action="store_true", help="print one JSON object")


def run_launch(args: argparse.Namespace) -> int:
    from colossus.launch import plan_launch

    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.max_restarts is None:  # a replica group is meant to come back on its own
        args.max_restarts = 3 if args.replica_groups else 0
    if args.replica_groups:
        from colossus.launch import plan_replica_launch

        launch = plan_replica_launch(args.replica_groups, args.nodes, args.procs_per_node, args.head, args.port,
                                     args.lighthouse_port, train_args, args.max_restarts, args.spare_nodes)
        print("\n".join(launch.commands()))
        return 0
    if args.spare_nodes:
        raise UserError("--spare-nodes needs --replica-groups: a spare takes a dead node's place in its group while "
                        "the other groups train on")
    plan = plan_launch(args.nodes, args.procs_per_node, args.head, args.port, train_args, args.max_restarts)
    if plan.nodes == 1:
        print(plan.command())
    else:
        print(f"# run on each of the {plan.nodes} nodes (the same line everywhere; {plan.head} hosts the rendezvous):")
        print(plan.command())
    return 0


def run_rendezvous(args: argparse.Namespace) -> int:
    import threading

    from colossus.launch import serve_rendezvous

    _stores = serve_rendezvous(args.port, args.groups)  # served while this process holds them
    print(f"colossus rendezvous: the torchrun rendezvous of replica groups 0-{args.groups - 1} on ports "
          f"{args.port}-{args.port + args.groups - 1}; stop it after the groups", flush=True)
    threading.Event().wait()  # until interrupted (SIGINT: KeyboardInterrupt; SIGTERM ends the process)
    return 0


def run_train(args: argparse.Namespace) -> int:
    import faulthandler

    from colossus.config import load_config

    # A process killed by a fatal signal (SIGSEGV, SIGABRT from "terminate called ..." in a native
    # thread, SIGBUS) prints every thread's Python stack to its stderr first: each rank's own log says
    # where it died.
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError, OSError):  # a stderr that is no file (captured, say)
        pass

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    config = load_config(args.config, overrides)
    if args.dry_run or args.world_size is not None or args.json:
        return run_dry_run(args, config)
    from colossus.train.trainer import replica_folder, train  # torch loads only once the config is known to be good

    from colossus.parallel.runtime import exit_without_teardown
    from colossus.train.guards import EXIT_PREEMPTED

    out = Path(args.out) if args.out else Path("runs") / config.model.name
    summary = train(config, out)
    if not summary["preempted"] and os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        val_loss = "none" if summary["val_loss"] is None else f"{summary['val_loss']:.4f}"
        print(f"done: step {summary['step']}, val_loss {val_loss} "
              f"(unigram baseline {summary['unigram_val_loss']:.4f}); run folder {replica_folder(out, config)}")
    code = EXIT_PREEMPTED if summary["preempted"] else 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_without_teardown(code)  # a rank of a torchrun job that finished cleanly ends here
    return code


def run_dry_run(args: argparse.Namespace, config) -> int:
    if not args.dry_run:
        raise UserError("--world-size and --json go with --dry-run (a real run takes its world size from torchrun)")
    if args.world_size is None or args.world_size < 1:
        raise UserError("--dry-run needs --world-size N, the number of ranks of the run to build (N >= 1)")
    from colossus.train.dry_run import FIELDS, dry_run

    report = dry_run(config, args.world_size)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{config.model.name} on {args.world_size:,} ranks, {report['layout']['dp']:,} data-parallel: rank 0 "
          f"(it holds the most), built in {report['build_s']:.0f} s")
    for field in FIELDS:
        ours, planned = report[field], report["planner"][field]
        print(f"  {field.removesuffix('_per_rank_max').replace('_', ' ')}: {_bytes(ours)} "
              f"(planner {_bytes(planned)}, {ours / planned - 1 if planned else 0:+.1%})")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from colossus.plan.planner import load_model, plan, print_plan, resolve_cluster, write_config
    from colossus.plan.search import parse_layout

    model = load_model(args.model)
    cluster, profile = resolve_cluster(args.cluster, args.gpus, Path(args.profile) if args.profile else None)
    planned = plan(model, cluster, parse_layout(args.layout), args.tokens, args.usd_per_gpu_hour, args.top, profile,
                   spares=args.gpus is None, batch_tokens=args.batch_tokens)  # --gpus N: exactly N
    if args.write_config:
        written = write_config(planned, Path(args.write_config))
        print(f"wrote {written}: {planned.best.layout.world_size:,} processes", file=sys.stderr)
    if args.json:
        print(json.dumps(planned.report, indent=1))
    else:
        print_plan(planned)
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    from colossus.plan.cluster import get_cluster
    from colossus.plan.failures import load_failure_model
    from colossus.plan.planner import load_model
    from colossus.plan.search import parse_layout
    from colossus.plan.simulation import SimulationOptions, plot_goodput, print_simulation, simulate_run

    interval = None
    if args.checkpoint_interval != "auto":
        try:
            interval = float(args.checkpoint_interval)
        except ValueError:
            raise UserError(f"--checkpoint-interval {args.checkpoint_interval!r} must be a number of seconds or auto") from None
    if args.grow:
        day, sep, name = args.grow.partition(":")
        try:
            when = float(day)
        except ValueError:
            when = -1.0
        if not sep or not name or when <= 0:
            raise UserError(f"--grow {args.grow!r}: expected DAY:CLUSTER, e.g. 20:colossus-200k")
    options = SimulationOptions(
        days=args.days, tokens=args.tokens, layout=parse_layout(args.layout), checkpoint_interval_s=interval,
        checkpoint_mode=args.checkpoint_mode, trials=args.trials, seed=args.seed, restart_s=args.restart_s,
        repair_hours=args.repair_hours, storage_gb_s=args.storage_gb_s, grow=(when, None) if args.grow else None,
        recovery=args.recovery, replica_groups=args.replica_groups, replica_timeout_s=args.replica_timeout_s,
        hot_spares=args.hot_spares,
        **({"job_wide": frozenset(c for c in args.job_wide.split(",") if c)} if args.job_wide is not None else {}))
    options.check()  # the flags' own errors before any file, model or cluster is read
    if args.grow:
        options.grow = (when, get_cluster(name))
    if args.failures:
        options.failures = load_failure_model(Path(args.failures))
    cluster = get_cluster(args.cluster)
    if args.gpus is not None:
        cluster = cluster.with_gpus(args.gpus)
    report = simulate_run(load_model(args.model), cluster, options)
    if args.plot:
        plot_goodput(report, Path(args.plot))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_simulation(report)
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from colossus.generate import generate_text, load_run

    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device!r}: use cpu or cuda")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is visible to torch here; use --device cpu")
    loaded = load_run(Path(args.run), args.device)
    print(generate_text(loaded, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                        cache=not args.no_cache))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from colossus.export import export_run

    out = export_run(Path(args.run), Path(args.out), args.arch, args.dtype, int(args.shard_gb * 1e9))
    print(f"wrote {out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from colossus.hf_import import import_checkpoint

    if args.world_size is not None and args.world_size < 1:
        raise UserError(f"--world-size must be at least 1, got {args.world_size}")
    done = import_checkpoint(Path(args.hf_dir), Path(args.out), args.arch, args.overrides, args.world_size)
    print(f"wrote {done['run']}: {done['arch']} checkpoint, {done['tensors']} tensors as step 0 for "
          f"{done['layout']} ({done['ranks']} rank{'s' if done['ranks'] > 1 else ''}, {done['files']} files)")
    if done["tokenizer"] == "byte":
        print("note: the byte tokenizer (HF_DIR has no tokenizer.json other than Colossus's byte one); "
              "set data.tokenizer to the model's tokenizer.json if it has another")
    print(f"fine-tune: colossus train {done['run']}/config.toml --set train.init_from={done['run']} --out NEW_RUN")
    return 0


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
    import torch  # loads only once the flags are known to be good

    from colossus.plan.profile import measure

    print(f"measuring this machine ({'10-20 s' if args.quick else 'under a minute'}) ...", file=sys.stderr)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.precision]
    profile = measure(threads=args.threads, quick=args.quick, dtype=dtype)
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
    handlers = {"train": run_train, "models": run_models, "launch": run_launch, "rendezvous": run_rendezvous, "plan": run_plan, "simulate": run_simulate, "report": run_report, "bench": run_bench,
                "generate": run_generate, "export": run_export, "import": run_import}
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
