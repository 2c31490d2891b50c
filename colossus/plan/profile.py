"""What this machine achieves, measured: matmul FLOP/s over a grid of shapes, streaming memory bandwidth,
the fixed cost of one eager op and all-reduce times across local processes. `colossus bench` writes it;
the planner reads it instead of datasheet peaks, which small shapes and CPUs never reach.

Every figure comes from many timings after a warm-up, summarized by their 20th percentile (see
typical_seconds) so that other processes on a shared machine do not move it. Matmul figures are what one
`torch.matmul` call achieves, dispatch included, so small shapes come out slow, as they are in eager
training.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path

import torch

from colossus.errors import UserError

PROFILE_FILE = "machine_profile.json"
# Matmul sizes (each of m, n, k) per device. On 2 cores the whole bench takes ~30 s, --quick 10-20 s
# (most of it the all-reduce workers importing torch).
CPU_SIZES = (16, 64, 256, 1024, 2048)
CPU_QUICK_SIZES = (16, 128, 512)
GPU_SIZES = (64, 256, 1024, 4096, 8192)  # H100-class GPUs approach peak only from ~4096
GPU_QUICK_SIZES = (64, 512, 4096)
# All-reduce sizes in bytes: 4 KiB (latency-bound) to 16 MiB (bandwidth-bound), every 4x.
CPU_ALLREDUCE_BYTES = tuple(4**i * 4096 for i in range(7))
CPU_QUICK_ALLREDUCE_BYTES = tuple(16**i * 4096 for i in range(4))  # 4 KiB .. 16 MiB
GPU_ALLREDUCE_BYTES = tuple(16**i * 4096 for i in range(5))  # 4 KiB .. 256 MiB
# float32 elements per tensor of the bandwidth test: 64 MiB on a CPU (more than a large L3), 1 GiB on a GPU.
_STREAM_NUMEL = {"cpu": 16 * 2**20, "cuda": 256 * 2**20}


@dataclass
class MachineProfile:
    name: str  # "cpu-2-threads" or the CUDA device name
    device: str  # "cpu" or "cuda"
    dtype: str  # of the matmuls: "float32" on CPU, "bfloat16" on GPU
    threads: int  # torch.get_num_threads() during the measurement
    matmul: list[list[float]]  # rows [m, n, k, flop_per_s] for [m,k] x [k,n], a full grid of m x n x k
    memory_bytes_per_s: float  # streaming elementwise bandwidth: c = a + b counts 3 tensors of bytes
    op_overhead_s: float  # one tiny eager op (framework dispatch, on GPU the launch)
    allreduce: list[list[float]]  # rows [processes, bytes, seconds]: float32 all_reduce, gloo / nccl
    # Training's non-matmul work, forward + backward under autograd (0 in profiles from before they
    # were measured): element-ops per second of a typical pointwise mix on activation-sized tensors,
    # and seconds per op on tiny ones (dispatch plus autograd bookkeeping).
    pointwise_elements_per_s: float = 0.0
    autograd_op_s: float = 0.0
    # rows [processes, seconds per unit, seconds per parameter tensor]: what FSDP2 adds to a forward +
    # backward (collectives on this backend, hooks, copies), measured on small layers: the fixed costs
    fsdp_unit: list[list[float]] = field(default_factory=list)
    # The best FLOP/s of large square matmuls (gemm_peak_flops): what MFU is measured against, by the
    # trainer and the planner alike (0 in profiles from before it was measured: the grid's best then).
    gemm_peak: float = 0.0

    def fsdp_unit_time(self, processes: int, tensors: int) -> float | None:
        """FSDP2's fixed cost per forward + backward of a unit holding `tensors` parameter tensors,
        from the nearest measured process count (None when not measured)."""
        if processes <= 1:
            return 0.0
        if not self.fsdp_unit:
            return None
        row = min(self.fsdp_unit, key=lambda row: (abs(row[0] - processes), -row[0]))
        return row[1] + row[2] * tensors

    def matmul_flops(self, m: int, n: int, k: int) -> float:
        """Achievable FLOP/s for this shape: trilinear in log m, log n, log k (and log FLOP/s) between
        the measured grid points, exact on them; shapes outside the grid take the nearest edge."""
        table = {(row[0], row[1], row[2]): row[3] for row in self.matmul}
        axes = [sorted({key[i] for key in table}) for i in range(3)]
        brackets = [_bracket(axis, x) for axis, x in zip(axes, (m, n, k))]
        corners = []  # the up to 8 grid points around the shape, with weights that sum to 1
        for corner in range(8):
            weight, key = 1.0, []
            for axis_index, (lo, hi, frac) in enumerate(brackets):
                upper = corner >> axis_index & 1
                weight *= frac if upper else 1.0 - frac
                key.append(hi if upper else lo)
            if weight:
                corners.append((weight, table[tuple(key)]))
        if len(corners) == 1:  # on a grid point: the measured figure itself, not exp(log(...)) of it
            return corners[0][1]
        return math.exp(sum(weight * math.log(flops) for weight, flops in corners))

    def peak_flops(self) -> float:
        """The fastest matmul measured: what MFU on this machine is measured against."""
        return max(self.gemm_peak, max(row[3] for row in self.matmul))

    def matmul_time(self, m: int, n: int, k: int) -> float:
        """Seconds for one [m,k] x [k,n] matmul."""
        return 2.0 * m * n * k / self.matmul_flops(m, n, k)

    def allreduce_time(self, nbytes: float, processes: int) -> float:
        """Seconds to all-reduce `nbytes` across `processes` local processes (0 for one process).

        Between measured sizes: linear in log bytes and log seconds. Below the smallest: its time
        (latency-bound). Above the largest: its bandwidth. A size never takes less time than a smaller
        one did (the smaller could be padded to it), which irons out noise among latency-bound sizes. A
        process count that was not measured scales the nearest measured one by the ring all-reduce's
        traffic per rank, 2(p-1)/p."""
        if processes <= 1 or nbytes <= 0:
            return 0.0
        measured = sorted({int(row[0]) for row in self.allreduce})
        if not measured:
            raise UserError("this machine profile has no all-reduce measurements; run `colossus bench` "
                            "on a machine with at least 2 devices")
        nearest = min(measured, key=lambda p: (abs(p - processes), -p))
        points, slowest = [], 0.0
        for size, seconds in sorted((row[1], row[2]) for row in self.allreduce if int(row[0]) == nearest):
            slowest = max(slowest, seconds)
            points.append((size, slowest))
        return _loglog_interpolate(points, nbytes) * _ring_factor(processes) / _ring_factor(nearest)

    def save(self, path: Path) -> None:
        """Write as JSON, atomically: a reader sees the old profile or the new one, never half."""
        from colossus.data.cache import make_dir
        from colossus.files import write_atomic

        path = Path(path)
        make_dir(path.parent)
        try:
            write_atomic(path, json.dumps(asdict(self), indent=1) + "\n")
        except OSError as exc:
            raise UserError(f"cannot write machine profile {path} ({exc.strerror}); choose another --out") from None

    @classmethod
    def load(cls, path: Path) -> MachineProfile:
        """Read a profile written by save(); a missing or garbled file is a UserError naming it."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"no machine profile at {path}; run `colossus bench` to measure this machine") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"machine profile {path} is unreadable ({exc}); run `colossus bench` "
                            "to measure this machine again") from None
        problem = _problem(data)
        if problem:
            raise UserError(f"machine profile {path} is garbled ({problem}); run `colossus bench` "
                            "to measure this machine again")
        return cls(**data)


def default_profile_path() -> Path:
    """Next to the token cache: $XDG_CACHE_HOME/colossus or ~/.cache/colossus."""
    from colossus.config import DataConfig
    from colossus.data.cache import cache_root

    return cache_root(DataConfig()) / PROFILE_FILE


def profile_for(threads: int, precision: str = "fp32", processes: int = 1,
                say: Callable[[str], None] = print) -> MachineProfile:
    """This CPU's profile for `threads` intra-op threads and matmuls in `precision` (with all-reduce
    timings when `processes` > 1): the one `colossus bench` wrote if it fits, else one cached earlier
    beside it, else a quick one measured now (10-20 s, said through `say`) and cached for next time."""
    from colossus.layout import TORCH_DTYPE_NAMES

    dtype = TORCH_DTYPE_NAMES[precision]
    bench = default_profile_path()
    keyed = bench.with_name(f"machine_profile-cpu-{threads}t-{dtype}.json")
    for path in (bench, keyed):
        try:
            profile = MachineProfile.load(path)
        except UserError:
            continue
        if (profile.device, profile.threads, profile.dtype) == ("cpu", threads, dtype) and \
                (processes == 1 or profile.allreduce) and profile.gemm_peak > 0:
            return profile
    say(f"measuring this machine for the planner's prediction ({threads} thread{'s' * (threads != 1)}, {dtype}; "
        f"10-20 s, once: `colossus bench --quick`, cached in {keyed})")
    # In a process of its own, so that its buffers do not count in this run's peak memory; on the CPU
    # even where a GPU is visible (CUDA_VISIBLE_DEVICES empty).
    command = [sys.executable, "-m", "colossus", "bench", "--quick", "--threads", str(threads), "--precision", precision,
               "--out", str(keyed), "--json"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise UserError("measuring this machine for the planner took over 10 minutes; run `colossus bench` "
                        "to see why") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise UserError(f"measuring this machine for the planner failed: {lines[-1]}; run `colossus bench` to see why")
    profile = MachineProfile.load(keyed)
    if (profile.device, profile.threads, profile.dtype) != ("cpu", threads, dtype):
        raise UserError(f"the machine profile {keyed} describes {profile.device} with {profile.threads} threads in "
                        f"{profile.dtype}, not the CPU with {threads} in {dtype}; delete it and run again")
    return profile


def gemm_peak_flops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """The best FLOP/s of large square matmuls (median of `repeats` timings each): this machine's GEMM
    peak, the denominator of MFU for the trainer, the planner and the benchmarks alike."""
    sizes = (4096, 8192) if device.type == "cuda" else (1024, 1536, 2048)
    best = 0.0
    for size in sizes:
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        out = torch.empty(size, size, device=device, dtype=dtype)
        seconds = [_run(lambda: torch.mm(a, b, out=out), device, 1) for _ in range(repeats + 1)][1:]  # 1st: warm-up
        best = max(best, 2.0 * size**3 / sorted(seconds)[len(seconds) // 2])
    return best


def measure(threads: int | None = None, sizes: Sequence[int] | None = None, processes: Sequence[int] = (2,),
            quick: bool = False, dtype: torch.dtype | None = None, device: torch.device | None = None) -> MachineProfile:
    """Measure this machine: a CUDA GPU if one is visible (or `device`), else the CPU with `threads`
    intra-op threads (default: torch's current setting, restored afterwards), in `dtype` (default:
    bf16 on a GPU, fp32 on a CPU). `processes` lists the all-reduce world sizes to measure (1 needs
    no measurement; on GPUs, counts above the GPUs visible are skipped)."""
    if threads is not None and threads < 1:
        raise UserError(f"threads must be at least 1, got {threads}")
    if sizes is not None and (not sizes or any(size < 1 for size in sizes)):
        raise UserError(f"matmul sizes must be positive integers, got {list(sizes)}")
    if any(p < 1 for p in processes):
        raise UserError(f"process counts must be at least 1, got {list(processes)}")
    if device is None:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    if sizes is None:
        sizes = (GPU_QUICK_SIZES if quick else GPU_SIZES) if cuda else (CPU_QUICK_SIZES if quick else CPU_SIZES)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used_threads = torch.get_num_threads()
        shapes = [(m, n, k) for m in sorted(set(sizes)) for n in sorted(set(sizes)) for k in sorted(set(sizes))]
        seconds = measure_compute(shapes, device, dtype, quick)
        gemm_peak = gemm_peak_flops(device, dtype)
    finally:
        torch.set_num_threads(before)
    matmul = [[m, n, k, 2.0 * m * n * k / t] for (m, n, k), t in zip(shapes, seconds)]
    memory = 3 * _STREAM_NUMEL[device.type] * 4 / seconds[-2]
    overhead = seconds[-1]
    nbytes = (CPU_QUICK_ALLREDUCE_BYTES if quick else CPU_ALLREDUCE_BYTES) if not cuda else GPU_ALLREDUCE_BYTES
    allreduce, fsdp_unit = [], []
    for world in sorted(set(processes)):
        if world == 1 or (cuda and world > torch.cuda.device_count()):  # NCCL needs a GPU per rank
            continue
        times, unit = measure_allreduce(world, nbytes, "nccl" if cuda else "gloo", quick)
        allreduce += [[world, size, t] for size, t in zip(nbytes, times)]
        fsdp_unit.append([world, *unit])
    name = torch.cuda.get_device_name(device) if cuda else f"cpu-{used_threads}-threads"
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        pointwise, autograd_op = measure_pointwise(device, dtype if cuda else torch.float32, quick)
    finally:
        torch.set_num_threads(before)
    return MachineProfile(name=name, device=device.type, dtype=str(dtype).removeprefix("torch."),
                          threads=used_threads, matmul=matmul, memory_bytes_per_s=memory,
                          op_overhead_s=overhead, allreduce=allreduce, pointwise_elements_per_s=pointwise,
                          autograd_op_s=autograd_op, fsdp_unit=fsdp_unit, gemm_peak=gemm_peak)


# The pointwise mix of a transformer block: scaling, residual adds, RMSNorm's pieces, RoPE's
# multiply-adds, soft-capping (tanh), softmax, GELU gating. Each counts as one element-op per element
# forward; its backward as two (costmodel.pointwise_time uses the same convention).
POINTWISE_OPS = 9


def _pointwise_chain(x: torch.Tensor) -> torch.Tensor:
    h = x * 0.5 + x  # scale, residual
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)  # RMSNorm: pow, (mean), rsqrt, mul
    h = torch.tanh(h / 30.0) * 30.0  # soft-cap
    h = torch.softmax(h, dim=-1)
    return torch.nn.functional.gelu(h) * h


def measure_pointwise(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[float, float]:
    """(element-ops per second, seconds per op) of _pointwise_chain forward + backward: on a
    [4096, 512] activation (throughput) and on a [4, 4] one (per-op dispatch and autograd cost)."""
    results = []
    for rows, cols in ((4096, 512), (4, 4)):
        x = torch.randn(rows, cols, device=device, dtype=dtype, requires_grad=True)

        def step() -> None:
            _pointwise_chain(x).sum().backward()
            x.grad = None

        results.append(interleaved_seconds([step], device, 1.0 if quick else 3.0, min_rounds=3,
                                           sample_s=0.02, burst_s=0.1)[0])
    big, tiny = results
    return 3 * POINTWISE_OPS * 4096 * 512 / big, tiny / count_eager_ops(lambda: _pointwise_chain(x).sum().backward())


def count_eager_ops(step: Callable[[], object]) -> int:
    """Top-level aten calls one call of `step` makes (forward and backward): the unit the cost model
    counts per-op costs in (costmodel.OPS_PER_*_LAYER are counted the same way)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for event in prof.events() if event.name.startswith("aten::")
               and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")))


def measure_compute(shapes: list[tuple[int, int, int]], device: torch.device, dtype: torch.dtype,
                    quick: bool) -> list[float]:
    """Typical seconds of torch.matmul for each (m, n, k), then of a streaming add c = a + b over
    _STREAM_NUMEL float32 elements, then of an add of two 4-element tensors (dispatch alone).

    The matmuls write into preallocated outputs (allocating one would time page faults on a CPU, not
    the matmul), and every operand is a view of one buffer per role, so the grid costs 3 tensors."""
    m_max, n_max, k_max = (max(shape[i] for shape in shapes) for i in range(3))
    a_buf = torch.randn(m_max * k_max, device=device, dtype=dtype)
    b_buf = torch.randn(k_max * n_max, device=device, dtype=dtype)
    out_buf = torch.empty(m_max * n_max, device=device, dtype=dtype)
    calls: list[Callable[[], object]] = [_matmul_call(a_buf, b_buf, out_buf, m, n, k) for m, n, k in shapes]
    numel = _STREAM_NUMEL[device.type]
    x, y, z = (torch.ones(numel, device=device) for _ in range(3))
    calls.append(lambda: torch.add(x, y, out=z))
    tiny_x, tiny_y = torch.ones(4, device=device), torch.ones(4, device=device)
    calls.append(lambda: torch.add(tiny_x, tiny_y))
    cuda = device.type == "cuda"
    # On a GPU a sample is a batch of launches between two synchronizations (a sync per call would time
    # the sync); on a CPU a sample is one call, or a few where a call is too short for the clock.
    return interleaved_seconds(calls, device, budget_s=2.0 if quick else 15.0, min_rounds=3,
                               sample_s=2e-3 if cuda else 2e-5, burst_s=2e-3 if cuda else 1e-3)


def _matmul_call(a_buf: torch.Tensor, b_buf: torch.Tensor, out_buf: torch.Tensor,
                 m: int, n: int, k: int) -> Callable[[], object]:
    a, b, out = a_buf[:m * k].view(m, k), b_buf[:k * n].view(k, n), out_buf[:m * n].view(m, n)
    return lambda: torch.matmul(a, b, out=out)


def interleaved_seconds(calls: list[Callable[[], object]], device: torch.device, budget_s: float,
                        min_rounds: int, sample_s: float, burst_s: float) -> list[float]:
    """Typical seconds per call of each call, sampled in rounds over all of them until `budget_s` is
    spent (at least `min_rounds`, at most 50 rounds).

    Interleaving spreads each call's samples over the whole measurement: another process that takes
    a core for a while (and with it an OpenMP thread every parallel op waits for) then spoils a few
    samples of many calls, which typical_seconds skips, instead of every sample of one call. A sample
    repeats the call to last `sample_s`; a round takes a burst of samples lasting `burst_s`."""
    repeats, bursts = [], []
    for call in calls:
        _run(call, device, 1)  # warm-up: thread pool, allocator, kernel selection
        once = max(_run(call, device, 1), 1e-9)
        repeats.append(max(1, min(10_000, int(sample_s / once))))
        bursts.append(max(1, min(50, int(burst_s / (once * repeats[-1])))))
    samples: list[list[float]] = [[] for _ in calls]
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < min_rounds or (rounds < 50 and time.perf_counter() < deadline):
        for index, call in enumerate(calls):
            samples[index] += [_run(call, device, repeats[index]) for _ in range(bursts[index])]
        rounds += 1
    return [typical_seconds(times) for times in samples]


def typical_seconds(samples: list[float]) -> float:
    """The 20th percentile of timings. On a quiet machine the timings cluster and it is close to the
    median; on a shared one it still is what the hardware does, where most samples of a parallel op
    can wait tens of milliseconds for a descheduled OpenMP thread or peer process (on a 2-core machine
    at load 5, medians of some small matmuls came out over 1000x too slow) and only the fast end of
    the distribution is free of that."""
    ordered = sorted(samples)
    return ordered[int(0.2 * (len(ordered) - 1))]


def _run(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds per call of `repeats` calls in a row."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def measure_allreduce(processes: int, sizes: Sequence[int], backend: str, quick: bool) -> tuple[list[float], list[float]]:
    """Typical seconds of a float32 all_reduce of each size in bytes, across `processes` fresh local
    processes (one thread each; on GPUs one per device), and FSDP2's cost per unit per forward +
    backward there; rank 0 writes the timings to a file."""
    with tempfile.TemporaryDirectory(prefix="colossus-bench-") as folder:
        result = Path(folder) / "allreduce.json"
        # A FileStore rendezvous needs no free port, so parallel benches and test runs cannot collide.
        args = [backend, str(Path(folder) / "store"), list(sizes), str(result), quick]
        # Plain `python -c` children, not multiprocessing's spawn: spawn re-runs the parent's __main__,
        # which may be a script, a REPL or stdin.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))}
        logs = [Path(folder) / f"rank{rank}.log" for rank in range(processes)]
        workers = []
        try:
            for rank, log in enumerate(logs):
                with open(log, "wb") as stderr:
                    workers.append(subprocess.Popen(
                        [sys.executable, "-c", _WORKER, json.dumps([rank, processes, *args])],
                        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr))
            _wait_all(workers, logs, timeout_s=300)
        finally:
            for worker in workers:
                if worker.poll() is None:  # only after a failure: the survivors would wait for it
                    worker.kill()
                    worker.wait()
        measured = json.loads(result.read_text())
        return measured["allreduce"], measured["fsdp_unit_s"]


_WORKER = "import json, sys; from colossus.plan.profile import _allreduce_worker; " \
          "_allreduce_worker(*json.loads(sys.argv[1]))"


def _wait_all(workers: list[subprocess.Popen], logs: list[Path], timeout_s: float) -> None:
    """Return once every worker exited cleanly; a failure or the timeout is a UserError naming the rank."""
    deadline = time.monotonic() + timeout_s
    while any(worker.poll() is None for worker in workers):
        if any(worker.returncode not in (None, 0) for worker in workers):
            break  # the others would wait for the failed rank until their own timeout
        if time.monotonic() > deadline:
            raise UserError(f"the all-reduce benchmark across {len(workers)} processes did not finish "
                            f"in {timeout_s:.0f} s")
        time.sleep(0.05)
    for rank, worker in enumerate(workers):
        if worker.returncode not in (None, 0):
            lines = logs[rank].read_text(errors="replace").strip().splitlines() or ["no output"]
            raise UserError(f"the all-reduce benchmark failed in rank {rank} of {len(workers)} "
                            f"(exit status {worker.returncode}): {lines[-1]}")


def _allreduce_worker(rank: int, world: int, backend: str, store: str, sizes: list[int], result: str,
                      quick: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # one core per process, as in a CPU training run of `world` ranks
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        times = []
        for nbytes in sizes:
            tensor = torch.ones(max(1, nbytes // 4), device=device)
            for _ in range(2):  # warm-up: connections, buffers
                dist.all_reduce(tensor)
            dist.barrier()
            # Back to back, as in training; each call timed alone, so a stall of one process by another
            # on a busy machine spoils few samples. Every rank makes the same calls: the count depends
            # only on the size.
            samples = []
            for _ in range(max(5, min(64 if quick else 128, 2**24 // nbytes))):
                _sync(device)
                start = time.perf_counter()
                dist.all_reduce(tensor)
                _sync(device)
                samples.append(time.perf_counter() - start)
            times.append(typical_seconds(samples))
        unit = _fsdp_unit_seconds(device, world)
        if rank == 0:
            Path(result).write_text(json.dumps({"allreduce": times, "fsdp_unit_s": list(unit)}))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    from colossus.parallel.runtime import exit_without_teardown

    exit_without_teardown(0)  # the mesh's gloo group outlives destroy_process_group


def _fsdp_unit_seconds(device: torch.device, world: int, units: int = 6) -> tuple[float, float]:
    """What FSDP2 adds to one forward + backward across `world` ranks, per sharded unit and per
    parameter tensor in it (its all-gathers and reduce-scatter on this backend, hooks, copy-in and
    copy-out per tensor): stacks of small units of 1 and of 4 Linear layers (2 and 8 tensors), each
    timed with and without fully_shard; the two costs per unit give the fixed and per-tensor parts."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    x = torch.randn(64, 128, device=device)

    def seconds(linears_per_unit: int, sharded: bool) -> float:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*(torch.nn.Sequential(*(torch.nn.Linear(128, 128) for _ in range(linears_per_unit)))
                                      for _ in range(units))).to(device)
        if sharded:
            for unit in model:
                fully_shard(unit, mesh=mesh)
            fully_shard(model, mesh=mesh)
            model.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        samples = []
        for step in range(18):
            _sync(device)
            start = time.perf_counter()
            model(x).sum().backward()
            _sync(device)
            if step >= 3:  # warm-up: buffers, connections
                samples.append(time.perf_counter() - start)
        return typical_seconds(samples)

    # per unit (the root unit holds no parameters of its own, so units, not units + 1)
    small = max(seconds(1, True) - seconds(1, False), 0.0) / units
    large = max(seconds(4, True) - seconds(4, False), 0.0) / units
    per_tensor = max((large - small) / 6, 0.0)
    return max(small - 2 * per_tensor, 0.0), per_tensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ring_factor(processes: int) -> float:
    """Bytes each rank sends per byte reduced in a ring all-reduce: 2(p-1)/p."""
    return 2.0 * (processes - 1) / processes


def bus_bandwidth(nbytes: float, seconds: float, processes: int) -> float:
    """nccl-tests' bus bandwidth: algorithm bandwidth times 2(p-1)/p, comparable across process counts."""
    return nbytes / seconds * _ring_factor(processes)


def _bracket(axis: list[float], x: float) -> tuple[float, float, float]:
    """The grid values around x and x's fractional position between them in log space, clamped."""
    x = min(max(x, axis[0]), axis[-1])
    hi = bisect.bisect_left(axis, x)
    if axis[hi] == x:
        return x, x, 0.0
    lo = hi - 1
    return axis[lo], axis[hi], math.log(x / axis[lo]) / math.log(axis[hi] / axis[lo])


def _loglog_interpolate(points: list[tuple[float, float]], x: float) -> float:
    """y at x from sorted (x, y) points: log-log linear inside, y[0] below, constant y/x above."""
    xs = [p[0] for p in points]
    if x <= xs[0]:
        return points[0][1]
    if x >= xs[-1]:
        return points[-1][1] * x / xs[-1]
    hi = bisect.bisect_left(xs, x)
    (x0, y0), (x1, y1) = points[hi - 1], points[hi]
    if x == x1:
        return y1
    frac = math.log(x / x0) / math.log(x1 / x0)
    # Clamped to the segment: exp(log(...)) rounding must not step outside it (or below a flat one's level).
    return min(max(math.exp(math.log(y0) + frac * math.log(y1 / y0)), min(y0, y1)), max(y0, y1))


def _problem(data: object) -> str | None:
    """What is wrong with parsed profile JSON, or None: fields, types, a full positive matmul grid."""
    if not isinstance(data, dict):
        return "not a JSON object"
    names = [f.name for f in fields(MachineProfile)]
    optional = {"pointwise_elements_per_s", "autograd_op_s", "fsdp_unit", "gemm_peak"}
    if not set(names) - optional <= set(data) <= set(names):
        missing, extra = sorted(set(names) - optional - set(data)), sorted(set(data) - set(names))
        return f"missing {missing}" if missing else f"unknown keys {extra}"
    for key in ("name", "device", "dtype"):
        if not isinstance(data[key], str):
            return f"{key} is not a string"
    if not isinstance(data["threads"], int) or data["threads"] < 1:
        return "threads is not a positive integer"
    for key in ("memory_bytes_per_s", "op_overhead_s"):
        if not _positive(data[key]):
            return f"{key} is not a positive number"
    for key, width in (("matmul", 4), ("allreduce", 3)):
        rows = data[key]
        if not isinstance(rows, list) or not all(
                isinstance(row, list) and len(row) == width and all(_positive(v) for v in row) for row in rows):
            return f"{key} is not a list of [{width} positive numbers] rows"
    shapes = {tuple(row[:3]) for row in data["matmul"]}
    axes = [{shape[i] for shape in shapes} for i in range(3)]
    if not shapes or len(shapes) != len(data["matmul"]) or len(shapes) != math.prod(len(a) for a in axes):
        return "matmul rows are not one full grid of m x n x k"
    return None


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
