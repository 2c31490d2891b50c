"""The command line as a user meets it: help, `models`, and one-line errors that leave the run alone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from colossus import modelmath
from colossus.cli import EXIT_USER_ERROR, main
from colossus.models.presets import PRESETS
from conftest import REPO, small_tables, write_toml


def colossus(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "colossus", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under a folder with a hash of its bytes: to prove an error changed nothing."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_help_reads_well() -> None:
    top = colossus("--help")
    assert top.returncode == 0
    for word in ("train", "models", "Grok", "resume"):
        assert word in top.stdout
    sub = colossus("train", "--help")
    assert sub.returncode == 0
    for flag in ("--out", "--steps", "--set", "CONFIG.toml", "examples:"):
        assert flag in sub.stdout


def test_models_json_matches_model_math(capsys: pytest.CaptureFixture) -> None:
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == list(PRESETS)
    for row in rows:
        assert set(row) >= {"name", "params_total", "params_active", "flops_per_token"}
        cfg = PRESETS[row["name"]]
        assert row["params_total"] == modelmath.params_total(cfg)
        assert row["flops_per_token"] == modelmath.flops_per_token(cfg)
    grok = next(row for row in rows if row["name"] == "grok-1")
    assert abs(grok["params_total"] / 314e9 - 1) < 0.01


def test_models_table(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "grok-1" in out and "315.68B" in out and "tiny" in out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> tuple[Path, Path]:
    """A short finished run and the config file that made it (shared: the errors must leave it as it is)."""
    tmp_path = tmp_path_factory.mktemp("finished")
    tables = small_tables(corpus_dir, tmp_path / "cache", train={"steps": 4}, eval={"sample_tokens": 0},
                          log={"tensorboard": False})
    config_file = write_toml(tmp_path / "run.toml", tables)
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(run)]) == 0
    return config_file, run


BAD_SETTINGS = [
    (["--set", "model.n_layer=2"], "model.n_layer", "n_layers"),
    (["--set", "train.steps=abc"], "train.steps", "integer"),
    (["--set", "train.lr=true"], "train.lr", "number"),
    (["--set", "model.n_heads=3"], "model.n_heads=3", "d_model"),
    (["--set", "model.n_kv_heads=3"], "model.n_kv_heads=3", "n_heads"),
    (["--set", "model.top_k=5"], "model.top_k=5", "n_experts"),
    (["--set", "model.d_model=128"], "model.d_model", "new --out"),  # differs from the run in the folder
    (["--set", "nosuch.key=1"], "[nosuch]", "known"),
    (["--set", "train.steps"], "section.key=value", "--set"),
]


@pytest.mark.parametrize("flags, names, hint", BAD_SETTINGS, ids=[b[1] for b in BAD_SETTINGS])
def test_bad_input_is_one_line_and_touches_nothing(finished_run: tuple[Path, Path], flags: list[str], names: str,
                                                   hint: str, capsys: pytest.CaptureFixture) -> None:
    config_file, run = finished_run
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", str(config_file), "--out", str(run), *flags]) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and hint in lines[0], captured.err
    assert snapshot(run) == before


def test_missing_data_path_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "fresh"
    assert main(["train", "--out", str(run), "--set", "data.source=/no/such/corpus/*.txt"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "/no/such/corpus" in err and "data.source" in err
    assert not run.exists()


def test_corrupt_checkpoint_is_named_and_nothing_is_deleted(finished_run: tuple[Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    config_file, shared_run = finished_run
    run = tmp_path / "run"
    shutil.copytree(shared_run, run)
    for shard in (run / "checkpoints").rglob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncate every checkpoint
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", str(config_file), "--out", str(run), "--steps", "8"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ".distcp" in err and "truncated" in err
    assert snapshot(run) == before


def test_errors_in_a_real_process_have_no_traceback(tmp_path: Path) -> None:
    """Through the real entry points: exit status 2, one line on stderr, no traceback."""
    for args in (["train", "missing.toml"], ["train", "--set", "model.top_k=9"]):
        result = colossus(*args, cwd=tmp_path)
        assert result.returncode == EXIT_USER_ERROR
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[model\nn_layers = 2\n")
    result = colossus("train", str(bad_toml), cwd=tmp_path)
    assert result.returncode == EXIT_USER_ERROR and "bad.toml" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_python_m_colossus_train_runs(tmp_path: Path, corpus_dir: Path) -> None:
    """`python -m colossus.train` is the same command as `colossus train`."""
    config_file = write_toml(tmp_path / "run.toml", small_tables(corpus_dir, tmp_path / "cache", train={"steps": 2},
                                                                   eval={"sample_tokens": 0}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "colossus.train", str(config_file), "--out", "r", "--steps", "3"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["step"] == 3


def test_readme_config_table_and_plan_layout_help_name_the_same_keys() -> None:
    """One vocabulary: every layout key is a run-config key in the README's table and a --layout key in
    `colossus plan --help` (mbs, gbs and precision are train.micro_batch, global_batch and precision)."""
    import re

    from colossus.cli import PLAN_EPILOG
    from colossus.layout import LAYOUT_FIELDS

    readme = (REPO / "README.md").read_text()
    rows = {name: set(re.findall(r"[a-z_0-9]+", " ".join(re.findall(r"`([^`]*)`", row)))) for name, row in
            re.findall(r"^\| `\[(parallel|train)\]` \| (.*) \|$", readme, flags=re.M)}
    in_config = {"mbs": "micro_batch", "gbs": "global_batch", "precision": "precision"}
    for key in LAYOUT_FIELDS:
        table = "train" if key in in_config else "parallel"
        assert in_config.get(key, key) in rows[table], f"README's [{table}] row lacks {in_config.get(key, key)}"
        assert re.search(rf"(^|[ ,]){key}([ ,]|$)", PLAN_EPILOG, flags=re.M), f"plan --help lacks {key}"
    assert rows["parallel"] == {k for k in LAYOUT_FIELDS if k not in in_config}
