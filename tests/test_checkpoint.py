"""Checkpoints: DCP round trip, atomic commit, damage detection and fallback, keep-last-k."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch
from torch import nn

from colossus.errors import UserError
from colossus.train.checkpoint import COMMITTED, MANIFEST, Checkpointer, CheckpointWriteError, verify


class Counter:
    """A Stateful non-tensor component, like the data loader."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = int(state["value"])


def make_state(seed: int) -> tuple[dict, nn.Linear, Counter]:
    torch.manual_seed(seed)
    layer = nn.Linear(8, 4)
    counter = Counter(seed)
    return {"model": layer.state_dict(), "counter": counter}, layer, counter


def save_steps(checkpointer: Checkpointer, steps: list[int]) -> dict[int, torch.Tensor]:
    weights = {}
    for step in steps:
        state, layer, _ = make_state(step)
        checkpointer.save(step, state)
        weights[step] = layer.weight.detach().clone()
    return weights


def test_round_trip_restores_tensors_and_stateful(tmp_path: Path) -> None:
    """What is saved is loaded back exactly, tensors in place and Stateful objects through load_state_dict."""
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=3)
    weights = save_steps(checkpointer, [5])
    state, layer, counter = make_state(99)
    assert not torch.equal(layer.weight, weights[5])
    assert checkpointer.load_latest(state) == 5
    layer.load_state_dict(state["model"])
    assert torch.equal(layer.weight, weights[5])
    assert counter.value == 5
    folder = tmp_path / "ckpt" / "step-5"
    assert (folder / COMMITTED).is_file() and (folder / MANIFEST).is_file()
    assert verify(folder) is None


def test_no_checkpoint_returns_none(tmp_path: Path) -> None:
    state, _, _ = make_state(0)
    assert Checkpointer(tmp_path / "missing", keep=2).load_latest(state) is None


def test_partial_and_uncommitted_folders_are_ignored(tmp_path: Path) -> None:
    """A save that died mid-write (hidden .partial folder, or a step folder without COMMITTED) is never loaded."""
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=5)
    weights = save_steps(checkpointer, [4, 8])
    # A crashed save of step 12: the partial folder holds real-looking files but no marker.
    partial = tmp_path / "ckpt" / ".step-12.partial"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"garbage")
    # And a step-16 folder whose COMMITTED marker never got written.
    (tmp_path / "ckpt" / "step-8").rename(tmp_path / "ckpt" / "step-16")
    (tmp_path / "ckpt" / "step-16" / COMMITTED).unlink()
    warnings_seen: list[str] = []
    state, layer, _ = make_state(0)
    assert checkpointer.load_latest(state, warn=warnings_seen.append) == 4
    layer.load_state_dict(state["model"])
    assert torch.equal(layer.weight, weights[4])
    assert any("step-16" in text and COMMITTED in text for text in warnings_seen)


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_damaged_newest_falls_back_and_is_named(tmp_path: Path, damage: str) -> None:
    """A truncated, deleted or corrupted shard in the newest checkpoint is detected and named; the
    previous checkpoint is loaded instead."""
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=5)
    weights = save_steps(checkpointer, [3, 6])
    shard = sorted((tmp_path / "ckpt" / "step-6").glob("*.distcp"))[0]
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        shard.unlink()
    else:
        shard.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    warnings_seen: list[str] = []
    state, layer, _ = make_state(0)
    assert checkpointer.load_latest(state, warn=warnings_seen.append) == 3
    layer.load_state_dict(state["model"])
    assert torch.equal(layer.weight, weights[3])
    assert len(warnings_seen) == 1 and shard.name in warnings_seen[0]


def test_every_checkpoint_damaged_is_a_user_error(tmp_path: Path) -> None:
    """With nothing usable left the load stops with one line naming the file, and deletes nothing."""
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=5)
    save_steps(checkpointer, [2])
    shard = sorted((tmp_path / "ckpt" / "step-2").glob("*.distcp"))[0]
    shard.write_bytes(b"")
    files_before = sorted(p.name for p in (tmp_path / "ckpt" / "step-2").iterdir())
    state, _, _ = make_state(0)
    with pytest.raises(UserError) as error:
        checkpointer.load_latest(state)
    message = str(error.value)
    assert "\n" not in message and shard.name in message and "--out" in message
    assert sorted(p.name for p in (tmp_path / "ckpt" / "step-2").iterdir()) == files_before


def test_keep_last_k(tmp_path: Path) -> None:
    """Only the newest `keep` complete checkpoints remain, the newest always among them."""
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2)
    save_steps(checkpointer, [1, 2, 3, 4])
    assert [step for step, _ in checkpointer.step_folders()] == [4, 3]
    checkpointer_one = Checkpointer(tmp_path / "one", keep=1)
    save_steps(checkpointer_one, [7, 9])
    assert [step for step, _ in checkpointer_one.step_folders()] == [9]


def test_resave_of_same_step_replaces_it_whole(tmp_path: Path) -> None:
    """Saving a step again (after a restart) replaces the old folder atomically."""
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=3)
    save_steps(checkpointer, [5])
    state, layer, _ = make_state(123)
    checkpointer.save(5, state)
    loaded, loaded_layer, counter = make_state(0)
    assert checkpointer.load_latest(loaded) == 5
    loaded_layer.load_state_dict(loaded["model"])
    assert torch.equal(loaded_layer.weight, layer.weight) and counter.value == 123
    assert not list((tmp_path / "ckpt").glob(".step-*"))


def test_async_save_snapshots_state_and_commits_on_finish(tmp_path: Path) -> None:
    """An asynchronous save keeps what the state was when save() returned, even if training then
    changes the weights; it becomes visible only once finished and committed."""
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=3, asynchronous=True)
    state, layer, counter = make_state(7)
    saved = layer.weight.detach().clone()
    checkpointer.save(7, state)
    with torch.no_grad():
        layer.weight.add_(1.0)  # the next training step
    counter.value = 99
    assert checkpointer.pending is not None
    checkpointer.finish()
    assert checkpointer.pending is None and verify(tmp_path / "ckpt" / "step-7") is None
    loaded, loaded_layer, loaded_counter = make_state(0)
    assert checkpointer.load_latest(loaded) == 7
    loaded_layer.load_state_dict(loaded["model"])
    assert torch.equal(loaded_layer.weight, saved) and loaded_counter.value == 7


def test_async_save_commits_in_the_background(tmp_path: Path) -> None:
    """Once written, an asynchronous checkpoint is committed without waiting for finish(): a run
    killed between two saves still finds it."""
    import time

    checkpointer = Checkpointer(tmp_path / "ckpt", keep=3, asynchronous=True)
    save_steps(checkpointer, [3])
    checkpointer.finish()
    state, _, _ = make_state(5)
    checkpointer.save(5, state)
    deadline = time.time() + 60
    while [step for step, _ in checkpointer.step_folders()] != [5, 3] and time.time() < deadline:
        time.sleep(0.05)
    assert [step for step, _ in checkpointer.step_folders()] == [5, 3]
    assert verify(tmp_path / "ckpt" / "step-5") is None
    checkpointer.finish()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_failed_write_raises_and_leaves_earlier_checkpoints(tmp_path: Path, asynchronous: bool) -> None:
    """A save the kernel refuses to write (file size limit, like a full disk) raises CheckpointWriteError
    with the cause and the free space; the partial folder is removed and the earlier checkpoint loads."""
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=3, asynchronous=asynchronous)
    big = {"weights": torch.randn(256, 1024)}  # 1 MiB
    checkpointer.save(1, big)
    checkpointer.finish()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(CheckpointWriteError) as failure:
            checkpointer.save(2, {"weights": torch.zeros(256, 1024)})
            checkpointer.finish()  # an asynchronous save reports here
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert failure.value.step == 2 and "GiB free in" in failure.value.reason
    assert not (tmp_path / "ckpt" / ".step-2.partial").exists() and not (tmp_path / "ckpt" / "step-2").exists()
    loaded = {"weights": torch.zeros(256, 1024)}
    assert checkpointer.load_latest(loaded) == 1 and torch.equal(loaded["weights"], big["weights"])
    checkpointer.save(3, big)  # storage is back: saving works again
    checkpointer.finish()
    assert verify(tmp_path / "ckpt" / "step-3") is None


def test_a_checkpoint_from_before_pipeline_parallelism_still_resumes(tmp_path: Path) -> None:
    """Checkpoints kept the optimizer's param groups as a list until pipeline stages needed them keyed by
    parameter name; a run resumes either, and saves the new format."""
    from colossus.models.grok import build_model
    from colossus.modelconfig import ModelConfig
    from colossus.train.trainer import LIST_OPTIONS, TrainingState

    def training_state(seed: int, **options) -> TrainingState:
        torch.manual_seed(seed)
        model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=32,
                                        n_experts=2, top_k=1, vocab_size=64, seq_len=16), seed=seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(torch.randint(0, 64, (2, 16))).logits.float().square().mean().backward()
        optimizer.step()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
        return TrainingState(model, optimizer, scheduler, Counter(seed), **options)

    old = training_state(1, options=LIST_OPTIONS)
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=3)
    checkpointer.save(1, {"train": old})
    resumed = training_state(2)
    assert checkpointer.load_latest({"train": resumed}) == 1
    for (name, saved), loaded in zip(old.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(saved, loaded), name
        assert torch.equal(old.optimizer.state[saved]["exp_avg"], resumed.optimizer.state[loaded]["exp_avg"]), name
    assert resumed.loader.value == 1
    checkpointer.save(2, {"train": resumed})  # and what it saves is the new, flattened format
    assert checkpointer.load_latest({"train": training_state(3)}) == 2
    from torch.distributed.checkpoint import FileSystemReader
    keys = FileSystemReader(str(tmp_path / "ckpt" / "step-2")).read_metadata().state_dict_metadata
    assert not any(key.endswith("param_groups.0.lr") for key in keys)
