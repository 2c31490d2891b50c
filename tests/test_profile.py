"""`colossus bench` and the machine profile: real measurements on this machine, no mocks.

One `colossus bench --quick` in a subprocess (10-20 s on 2 cores, most of it two all-reduce workers
importing torch) provides the profile that most tests read; one in-process measure() without
all-reduce checks the thread setting."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colossus.cli import EXIT_USER_ERROR, main
from colossus.errors import UserError
from colossus.plan.profile import (CPU_QUICK_ALLREDUCE_BYTES, CPU_QUICK_SIZES, MachineProfile, default_profile_path,
                                   measure)
from conftest import REPO



@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench") / "profile.json"
    # The CPU even where a GPU is visible: the grid sizes and bounds below are the CPU ones.
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "colossus", "bench", "--quick", "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    return result, out


@pytest.fixture(scope="module")
def profile(bench: tuple[subprocess.CompletedProcess, Path]) -> MachineProfile:
    result, out = bench
    assert result.returncode == 0, result.stderr
    return MachineProfile.load(out)


def test_bench_command_writes_the_profile(bench: tuple[subprocess.CompletedProcess, Path]) -> None:
    result, out = bench
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert out.is_file() and not [p for p in out.parent.iterdir() if p != out]  # no temporary file left
    for text in ("GFLOP/s", "GB/s", "µs", "all-reduce", f"wrote {out}"):
        assert text in result.stdout, result.stdout
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["dtype"] == "float32"


def test_figures_are_measured_positive_and_finite(profile: MachineProfile) -> None:
    assert profile.name == f"cpu-{profile.threads}-threads"
    sizes = sorted(set(CPU_QUICK_SIZES))
    assert sorted(tuple(row[:3]) for row in profile.matmul) == [(m, n, k) for m in sizes for n in sizes for k in sizes]
    assert [row[:2] for row in profile.allreduce] == [[2, size] for size in CPU_QUICK_ALLREDUCE_BYTES]
    figures = [row[3] for row in profile.matmul] + [row[2] for row in profile.allreduce]
    figures += [profile.memory_bytes_per_s, profile.op_overhead_s]
    assert all(math.isfinite(x) and x > 0 for x in figures), figures
    # Loose physical bounds: a CPU core does more than 0.1 GFLOP/s and less than 10 TFLOP/s; memory
    # moves between 0.1 GB/s and 10 TB/s; dispatching one op takes between 10 ns and 10 ms.
    assert all(1e8 < row[3] < 1e13 for row in profile.matmul if row[0] == row[1] == row[2] == 512)
    assert 1e8 < profile.memory_bytes_per_s < 1e13
    assert 1e-8 < profile.op_overhead_s < 1e-2


def test_big_square_matmuls_are_faster_per_flop_than_tiny_ones(profile: MachineProfile) -> None:
    """A 16^3 matmul is all dispatch; 512^3 keeps the vector units busy. Measured the other way round,
    the timing (or the machine) is broken."""
    tiny, big = profile.matmul_flops(16, 16, 16), profile.matmul_flops(512, 512, 512)
    assert big > 2 * tiny, (tiny, big)


def test_matmul_interpolation(profile: MachineProfile) -> None:
    for m, n, k, flops in profile.matmul:  # exactly the measurement on every grid point
        assert profile.matmul_flops(m, n, k) == flops
        assert profile.matmul_time(m, n, k) == 2.0 * m * n * k / flops
    low, high = profile.matmul_flops(128, 512, 512), profile.matmul_flops(512, 512, 512)
    between = profile.matmul_flops(256, 512, 512)  # the log-space midpoint: the geometric mean
    assert min(low, high) <= between <= max(low, high)
    assert math.isclose(between, math.sqrt(low * high), rel_tol=1e-9)
    for m, n, k in [(20, 100, 300), (300, 17, 64), (200, 400, 30)]:  # off-grid on every axis
        corners = [profile.matmul_flops(a, b, c) for a in _around(m) for b in _around(n) for c in _around(k)]
        assert min(corners) <= profile.matmul_flops(m, n, k) <= max(corners)
    assert profile.peak_flops() == max(row[3] for row in profile.matmul)
    # Outside the grid: the nearest edge.
    assert profile.matmul_flops(4, 16, 16) == profile.matmul_flops(16, 16, 16)
    assert profile.matmul_flops(4096, 4096, 4096) == profile.matmul_flops(512, 512, 512)


def _around(x: int) -> tuple[int, int]:
    """The quick grid's sizes on either side of x."""
    sizes = sorted(CPU_QUICK_SIZES)
    return max(s for s in sizes if s <= x), min(s for s in sizes if s >= x)


def test_allreduce_time_grows_with_bytes(profile: MachineProfile) -> None:
    measured = sorted((row[1], row[2]) for row in profile.allreduce)
    assert measured[-1][1] > measured[0][1], measured  # 16 MiB takes longer than 4 KiB, as measured
    sweep = [profile.allreduce_time(2**e, 2) for e in range(8, 28)]  # 256 B .. 128 MiB
    assert all(a <= b for a, b in zip(sweep, sweep[1:])) and sweep[-1] > sweep[0]
    assert profile.allreduce_time(2**20, 1) == 0.0
    # 4 processes were not measured: the ring formula scales 2 processes' time by (2*3/4) / (2*1/2).
    assert math.isclose(profile.allreduce_time(2**20, 4), 1.5 * profile.allreduce_time(2**20, 2))


def test_save_load_round_trip(profile: MachineProfile, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "profile.json"
    profile.save(path)
    assert MachineProfile.load(path) == profile
    assert [p.name for p in path.parent.iterdir()] == ["profile.json"]  # the temporary file was renamed


def test_missing_or_garbled_profile_is_one_user_error(profile: MachineProfile, tmp_path: Path) -> None:
    path = tmp_path / "machine_profile.json"
    with pytest.raises(UserError, match="colossus bench") as missing:
        MachineProfile.load(path)
    assert str(path) in str(missing.value)
    profile.save(path)
    intact = json.loads(path.read_text())
    broken = {"truncated": path.read_text()[:200], "not json": "{machine",
              "a key missing": json.dumps({k: v for k, v in intact.items() if k != "op_overhead_s"}),
              "a hole in the grid": json.dumps({**intact, "matmul": intact["matmul"][1:]}),
              "a negative figure": json.dumps({**intact, "memory_bytes_per_s": -1.0})}
    for what, text in broken.items():
        path.write_text(text)
        with pytest.raises(UserError) as garbled:
            MachineProfile.load(path)
        message = str(garbled.value)
        assert str(path) in message and "colossus bench" in message and "\n" not in message, (what, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="measure() takes the GPU where one is visible")
def test_measure_in_process_uses_the_threads_it_is_given() -> None:
    before = torch.get_num_threads()
    one = measure(threads=1, quick=True, processes=[])  # no all-reduce: matmuls alone, a few seconds
    assert torch.get_num_threads() == before  # restored
    assert (one.threads, one.name, one.allreduce) == (1, "cpu-1-threads", [])
    assert one.matmul_flops(512, 512, 512) > 2 * one.matmul_flops(16, 16, 16)
    with pytest.raises(UserError, match="no all-reduce"):
        one.allreduce_time(2**20, 2)
    assert one.allreduce_time(2**20, 1) == 0.0


def test_default_path_is_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_profile_path() == tmp_path / "colossus" / "machine_profile.json"


def test_bad_bench_flags_stop_before_measuring(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--threads", "0", "--out", str(tmp_path / "p.json")]) == EXIT_USER_ERROR
    assert main(["bench", "--out", str(tmp_path)]) == EXIT_USER_ERROR  # a folder, not a file
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--threads" in err[0] and "folder" in err[1], err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--threads", "many"])
    assert exc.value.code == EXIT_USER_ERROR
    assert "Traceback" not in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
