"""Time from SIGKILL to the first step after recovery: a global torchrun restart from the newest DCP
checkpoint against a replica group that takes the current state from a live peer (torchft).

usage: python bench/recovery.py [--models tiny,dense100m] [--kill-at 7] [--repeat N] [--json] [--out FILE]

Both ways train the same model on the same 3 data-parallel replicas, one process each, on this machine
(gloo, 1 thread per process; the stdlib corpus):
  restart  one torchrun job of 3 processes (--max-restarts 1), parallel.dp_replicate = 3, a checkpoint
           every 5 steps (30 steps in all); one worker is SIGKILLed after step KILL_AT, torchrun restarts all three, and
           they resume from the newest checkpoint.
  replica  3 replica groups ([faults] replica_groups = 3), each its own torchrun job of one process, and
           a torchft Lighthouse; one group's worker is SIGKILLed after step KILL_AT, its torchrun
           restarts it, and it takes the state of a live group in its first quorum while the other two
           keep training.
The restarted process's `startup` event (events.jsonl) splits the time into: process start (torchrun
notices the death and starts the process again), imports (Python, torch, Colossus), process group
(the job's own ranks), model build, then the state (checkpoint read; or torchft's Manager and quorum
set-up, then the state transfer) and the first step. For replica recovery it also gives how long the
surviving groups stalled: from the kill to their first step without the dead group, less one step.
With --repeat N each figure is the median of N runs (three processes share this machine's cores, so
single runs vary by seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from throughput import SHAPES  # noqa: E402  (the same model shapes as the throughput bench)

STEPS, INTERVAL, GROUPS = 30, 5, 3


def write_config(folder: Path, model: str, replica: bool, lighthouse: str = "") -> Path:
    tables = {
        "model": dict(SHAPES[model]),
        "train": dict(steps=STEPS, global_batch=GROUPS, micro_batch=1, warmup_steps=2, threads=1),
        "checkpoint": dict(interval=INTERVAL, keep=1),
        "eval": dict(interval=100, batches=1, sample_tokens=0),
        "log": dict(interval=1, tensorboard=False),
        "parallel": dict(dp_replicate=GROUPS),
    }
    if replica:
        tables["faults"] = dict(replica_groups=GROUPS, lighthouse=lighthouse)
    path = folder / "run.toml"
    path.write_text(tomli_w.dumps(tables))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []


def last_step(run: Path) -> int:
    return max((r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r), default=0)


def torchrun(nproc: int, folder: Path, config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RUST_LOG": "warn"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
               "--max-restarts=1", "--monitor-interval=0.1", "-m", "colossus.train", str(config), "--out", "run", *extra]
    log = open(folder / f"torchrun-{len(list(folder.glob('torchrun-*.log')))}.log", "w+")  # not a pipe: it could fill
    job = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True,
                           start_new_session=True)
    job.log = log
    return job


def errors(job: subprocess.Popen) -> str:
    job.log.seek(0)
    return job.log.read()[-3000:]


def kill_worker(job: subprocess.Popen) -> float:
    """SIGKILL one worker of a torchrun job (its highest-numbered child); the time of the kill."""
    workers = sorted(int(p) for p in subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True,
                                                     text=True).stdout.split())
    killed = time.time()
    os.kill(workers[-1], signal.SIGKILL)
    return killed


def wait(condition, what: str, jobs: list[subprocess.Popen], timeout: float = 1800) -> None:
    deadline = time.time() + timeout
    while not condition():
        for job in jobs:
            if job.poll() is not None:
                raise SystemExit(f"bench/recovery.py: a job ended ({job.returncode}) before {what}:\n"
                                 f"{errors(job)}")
        if time.time() > deadline:
            raise SystemExit(f"bench/recovery.py: {what} did not happen in {timeout:.0f} s")
        time.sleep(0.05)


def finish(jobs: list[subprocess.Popen]) -> None:
    for job in jobs:
        job.wait(timeout=1800)
        if job.returncode != 0:
            raise SystemExit(f"bench/recovery.py: a job failed ({job.returncode}):\n{errors(job)}")


def breakdown(startup: dict, killed: float) -> dict:
    """Seconds from the kill: each stage of the restarted process, in order."""
    parts = {"process_start": startup["process_started"] - killed, "imports": startup["imported_s"],
             "process_group": startup["process_group_s"] - startup["imported_s"],
             "model_build": startup["built_s"] - startup["process_group_s"]}
    if "transfer_s" in startup:  # replica recovery
        parts["quorum_setup"] = startup.get("replica_setup_s", 0.0) + startup.get("quorum_s", 0.0)
        parts["state"] = startup["transfer_s"]
    else:
        parts["quorum_setup"] = 0.0
        parts["state"] = startup.get("checkpoint_read_s", 0.0)
    total = startup["process_started"] + startup["first_step_s"] - killed
    parts["first_step"] = total - sum(parts.values())  # the step itself, with what the trainer does around it
    parts["total"] = total
    return {key: round(value, 3) for key, value in parts.items()}


def step_time(run: Path) -> float:
    times = [r["step_time_s"] for r in read_jsonl(run / "metrics.jsonl") if "step_time_s" in r]
    return statistics.median(times[2:] or times)


def run_restart(model: str, kill_at: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="recovery-restart-") as tmp:
        folder = Path(tmp)
        job = torchrun(GROUPS, folder, write_config(folder, model, replica=False))
        run = folder / "run"
        wait(lambda: last_step(run) >= kill_at and (run / "checkpoints" / f"step-{INTERVAL}" / "COMMITTED").exists(),
             f"step {kill_at}", [job])
        killed = kill_worker(job)
        finish([job])
        startup = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "startup" and e["restart"] == 1][0]
        resumed = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"][0]["step"]
        return {"model": model, "mode": "restart", "killed_after_step": kill_at, "resumed_from_step": resumed,
                "step_time_s": round(step_time(run), 3), **breakdown(startup, killed)}


def run_replica(model: str, kill_at: int) -> dict:
    from torchft._torchft import LighthouseServer

    from colossus.launch import HEARTBEAT_TIMEOUT_MS, JOIN_TIMEOUT_MS

    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=JOIN_TIMEOUT_MS,
                                  heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS)
    try:
        with tempfile.TemporaryDirectory(prefix="recovery-replica-") as tmp:
            folder = Path(tmp)
            config = write_config(folder, model, replica=True, lighthouse=lighthouse.address())
            jobs = [torchrun(1, folder, config, "--set", f"faults.replica_group={group}") for group in range(GROUPS)]
            runs = [folder / "run" / f"replica-{group}" for group in range(GROUPS)]
            wait(lambda: last_step(runs[1]) >= kill_at, f"step {kill_at}", jobs)
            killed = kill_worker(jobs[1])
            finish(jobs)
            startup = [e for e in read_jsonl(runs[1] / "events.jsonl") if e["event"] == "startup" and e["restart"] == 1][0]
            step = step_time(runs[0])
            recovered = [e for e in read_jsonl(runs[1] / "events.jsonl") if e["event"] == "recovered_from_peer"][0]
            short = [e for e in read_jsonl(runs[0] / "events.jsonl") if e["event"] == "replicas_short"
                     and killed < e["time"] <= recovered["time"]]  # the survivors' steps during the outage
            return {"model": model, "mode": "replica", "killed_after_step": kill_at,
                    "rejoined_at_step": recovered["step"], "steps_without_it": len(short),
                    "survivor_stall_s": round(short[0]["time"] - killed - step, 3) if short else None,
                    "step_time_s": round(step, 3), **breakdown(startup, killed)}
    finally:
        lighthouse.shutdown()


def median_of(runs: list[dict]) -> dict:
    """Each number the median over the runs (the first run's other fields); `runs` keeps them all."""
    merged = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and all(isinstance(r.get(key), (int, float)) for r in runs):
            merged[key] = round(statistics.median(r[key] for r in runs), 3)
    merged["runs"] = runs
    return merged


COLUMNS = ("process_start", "imports", "process_group", "model_build", "quorum_setup", "state", "first_step", "total")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,dense100m", help="comma-separated shapes of bench/throughput.py")
    parser.add_argument("--kill-at", type=int, default=7, help="SIGKILL a worker after this step (default 7)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; figures are medians (default 1)")
    parser.add_argument("--out", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    os.environ.setdefault("RUST_LOG", "warn")
    results = []
    for model in args.models.split(","):
        for run in (run_restart, run_replica):
            runs = []
            for _ in range(args.repeat):
                runs.append(run(model, args.kill_at))
                print(f"# {model} {runs[-1]['mode']}: {runs[-1]['total']:.1f} s", file=sys.stderr)
            results.append(median_of(runs))
    report = {"cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(), "threads_per_process": 1,
              "processes": GROUPS, "repeat": args.repeat, "command": " ".join(["python", "bench/recovery.py", *sys.argv[1:]]), "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{report['cpu_model']}, {GROUPS} processes of 1 thread; seconds from SIGKILL")
    print("| model | recovery | " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " | step | survivors stalled |")
    print("|---" * (len(COLUMNS) + 4) + "|")
    for r in results:
        stall = r.get("survivor_stall_s")
        print(f"| {r['model']} | {r['mode']} | " + " | ".join(f"{r[c]:.2f}" for c in COLUMNS)
              + f" | {r['step_time_s']:.2f} | {'-' if stall is None else f'{stall:.2f}'} |")
    return 0


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
