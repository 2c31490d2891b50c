"""Shared fixtures: a small real text corpus and a model small enough to train in seconds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from colossus.config import RunConfig, config_from_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one intra-op thread avoids OpenMP spin-waits that make each small
    matmul milliseconds slower on a busy 2-core machine. The previous setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 1 MB of real Python source copied from the standard library (a fixed list of modules)."""
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "csv.py", "dataclasses.py",
             "difflib.py", "enum.py", "fractions.py", "functools.py", "heapq.py", "inspect.py", "json/decoder.py",
             "json/encoder.py", "locale.py", "pathlib.py", "pprint.py", "random.py", "shutil.py", "statistics.py",
             "string.py", "textwrap.py", "typing.py", "uuid.py", "warnings.py", "zipfile.py"]
    for name in names:
        source = stdlib / name
        if not source.exists():  # a module that became a package (zipfile in Python 3.12)
            source = stdlib / name.removesuffix(".py") / "__init__.py"
        shutil.copy(source, folder / name.replace("/", "_"))
    return folder


def small_tables(corpus_dir: Path, cache_dir: Path, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """TOML-shaped tables for a ~100K-parameter MoE (4 experts, top-2) on the small corpus."""
    tables: dict[str, dict[str, Any]] = {
        "model": dict(name="micro", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                      n_experts=4, top_k=2, vocab_size=256, seq_len=64, embedding_multiplier=8.0),
        "data": dict(source=str(corpus_dir), cache_dir=str(cache_dir), val_fraction=0.1),
        "train": dict(steps=12, global_batch=8, micro_batch=4, lr=3e-3, warmup_steps=2, threads=1),
        "checkpoint": dict(interval=4, keep=2),
        "eval": dict(interval=6, batches=2, sample_tokens=8),
        "log": dict(interval=2, tensorboard=True),
    }
    for name, values in sections.items():
        tables.setdefault(name, {}).update(values)
    return tables


def small_config(corpus_dir: Path, cache_dir: Path, **sections: dict[str, Any]) -> RunConfig:
    return config_from_dict(small_tables(corpus_dir, cache_dir, **sections))


def metrics_by_step(run: Path) -> dict[int, dict]:
    """The last record of each training step in a run's metrics.jsonl (a resumed run logs some twice)."""
    records = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            records[record["step"]] = record
    return records


def write_toml(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(tables))
    return path


def run_colossus(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m colossus ARGS` in a fresh process with this checkout on the path (a real CLI run)."""
    return subprocess.run([sys.executable, "-m", "colossus", *args], capture_output=True, text=True, timeout=timeout,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"})
