"""Checkpoints with torch.distributed.checkpoint (DCP), committed atomically.

Layout: RUN/checkpoints/step-N/ holds DCP's files, a manifest.json (every file's size and checksum,
the step, the config hash) and a COMMITTED marker. A checkpoint is written into a hidden
`.step-N.partial` folder, checked, and only then renamed to `step-N` (a rename is atomic on one
file system), so a crash mid-write never leaves a folder that looks complete. Loading verifies the
manifest first; a damaged checkpoint is named and skipped for the previous complete one.

A save that fails (disk full, file too large, permissions) fails on every rank at once: the ranks
agree on the outcome, the partial folder is removed, the previous checkpoints are untouched, and
`CheckpointWriteError` says why, so the trainer can go on or stop (checkpoint.on_error).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from colossus.errors import UserError
from colossus.files import write_atomic

COMMITTED = "COMMITTED"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# A checkpoint holds the trainer's state under this key and the model's weights under KEY.model: the
# trainer saves it; init_from, generate, export and import read or write the model part alone.
MODEL_KEY = "train"

# DCP warns on every single-process save, also from the background writer thread where no_dist is
# not passed on; one process is a supported case here, so the warning only adds noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointWriteError(Exception):
    """A checkpoint could not be written; raised on every rank alike. Earlier checkpoints are intact."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint of step {step} was not written: {reason}")
        self.step = step
        self.reason = reason


def describe_failure(exc: BaseException) -> str:
    """One line for a failed write: the OS error and file when there is one, not DCP's tracebacks."""
    failures = getattr(exc, "failures", None)  # DCP's CheckpointException: {rank: (exception, traceback)}
    if failures:
        rank, wrapped = sorted(failures.items())[0]
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        return f"rank {rank}: {describe_failure(inner)}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def file_checksum(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, step: int, extra: dict[str, Any]) -> None:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in (MANIFEST, COMMITTED):
            files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "blake2b": file_checksum(path)}
    manifest = {"step": step, "files": files, **extra}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))


def verify(folder: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it (one line)."""
    if not (folder / COMMITTED).is_file():
        return f"{folder} has no {COMMITTED} marker (the write did not finish)"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"{folder / MANIFEST} is unreadable ({exc})"
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated?)"
        if file_checksum(path) != entry["blake2b"]:
            return f"{path} does not match its checksum (corrupt)"
    return None


def _is_coordinator() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@dataclass
class PendingSave:
    step: int
    partial: Path
    final: Path
    extra: dict[str, Any]
    future: Any  # concurrent.futures.Future of dcp.async_save
    committed: threading.Event = field(default_factory=threading.Event)
    error: str | None = None  # why the coordinator could not commit


@dataclass
class Checkpointer:
    folder: Path  # RUN/checkpoints
    keep: int
    asynchronous: bool = False  # write in a background thread; the loop blocks only while staging
    pending: PendingSave | None = None
    kill_before_commit_at: int = 0  # testing (faults.inject_kill_in_save_at_step): SIGKILL the coordinator there
    _group: Any = None  # a separate gloo group for background saves, so they never interleave with training collectives

    def step_folders(self) -> list[tuple[int, Path]]:
        """Committed-looking step folders, newest first (not yet verified)."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        return sorted(found, reverse=True)

    def save(self, step: int, state: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
        """Write `state` (a DCP state dict; Stateful values are asked for their state) as step-N.
        Every rank writes its shards; rank 0 then commits (manifest, marker, rename) alone. Asynchronous
        saves return once the state is staged in memory; the commit happens in the background once
        every rank's files are written, and `finish()` (called by the next save) reports the outcome.
        A failed save raises CheckpointWriteError on every rank (for an asynchronous one: at `finish()`)."""
        self.finish()  # a new save waits for the previous one
        final = self.folder / f"step-{step}"
        partial = self.folder / f".step-{step}.partial"
        problem = None
        if _is_coordinator():
            try:
                if partial.exists():
                    shutil.rmtree(partial)  # our own leftover from a crashed save of this step
                partial.mkdir(parents=True)
            except OSError as exc:
                problem = self._describe(exc)
        self._raise_if_any(step, partial, problem)
        save = PendingSave(step, partial, final, extra or {}, None)
        if self.asynchronous:
            save.future = dcp.async_save(state, checkpoint_id=str(partial), process_group=self.group(),
                                         no_dist=not dist.is_initialized())
            self.pending = save
            if _is_coordinator():
                # The coordinator's save completes only after every rank's files are written, so
                # it can commit at once, from the writer thread, while training goes on.
                save.future.add_done_callback(lambda done: self._commit_when_written(save))
            return final
        try:  # returns once every rank's files are written; a failure on any rank raises on all
            dcp.save(state, checkpoint_id=str(partial), no_dist=not dist.is_initialized())
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            if isinstance(exc, KeyboardInterrupt):
                raise
            problem = self._describe(exc)
        if problem is None and _is_coordinator():
            problem = self._commit_files(save)
        self._raise_if_any(step, partial, problem)
        return final

    def finish(self) -> None:
        """Wait until a background save is written and committed (a no-op when none is pending);
        raises CheckpointWriteError on every rank if it failed on any."""
        if self.pending is None:
            return
        save, self.pending = self.pending, None
        problem = None
        try:
            save.future.result()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            problem = self._describe(exc)
        if _is_coordinator():
            save.committed.wait()
            problem = problem or save.error
        self._raise_if_any(save.step, save.partial, problem)

    def group(self) -> Any:
        """A gloo group of its own: background saves never interleave with the training collectives,
        and on GPUs the agreement below needs no device."""
        if dist.is_initialized() and self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _describe(self, exc: BaseException) -> str:
        """The failure, plus the free space where it happened: a full disk is the usual cause, and
        serialisers often report it as an unrelated-looking error."""
        text = describe_failure(exc)
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError:
            return text
        return f"{text} [{free / 2**30:.1f} GiB free in {self.folder}]"

    def _raise_if_any(self, step: int, partial: Path, problem: str | None) -> None:
        """Every rank learns whether any rank failed (this is also the barrier that ends a save);
        after a failure the coordinator removes the partial folder and all ranks raise."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            problems: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(problems, problem, group=self.group())
            problem = next((p for p in problems if p is not None), None)
        if problem is None:
            return
        if _is_coordinator():
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointWriteError(step, problem)

    def _commit_when_written(self, save: PendingSave) -> None:
        try:
            if save.future.exception() is None:
                save.error = self._commit_files(save)
        finally:
            save.committed.set()

    def _commit_files(self, save: PendingSave) -> str | None:
        """Manifest, then the COMMITTED marker, then one atomic rename: only now is it visible.
        Returns why it failed, or None."""
        if save.step == self.kill_before_commit_at:
            # Every rank's shards and DCP's metadata are on disk: to DCP this folder looks loadable.
            # Only the commit protocol keeps a restart from using it.
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            write_manifest(save.partial, save.step, save.extra)
            write_atomic(save.partial / COMMITTED, f"{save.step}\n")
            if save.final.exists():  # a checkpoint of this step from an earlier attempt: replace it whole
                shutil.rmtree(save.final)
            os.replace(save.partial, save.final)
        except OSError as exc:
            return self._describe(exc)
        self._prune()
        return None

    def _prune(self) -> None:
        """Keep the newest `keep` complete checkpoints; the newest is never deleted."""
        complete = [(step, path) for step, path in self.step_folders() if (path / COMMITTED).is_file()]
        for _, path in complete[max(self.keep, 1):]:
            shutil.rmtree(path, ignore_errors=True)

    def load_latest(self, state: dict[str, Any], warn: Callable[[str], None] | None = None) -> int | None:
        """Load the newest intact checkpoint into `state` in place; returns its step, or None when
        there is no checkpoint. Damaged ones are named and skipped; if every one is damaged this is
        a UserError (nothing is deleted)."""
        candidates = self.step_folders()
        problems = []
        for step, path in candidates:
            problem = verify(path)
            if problem is None:
                try:
                    keys = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
                    for value in state.values():  # a component may read an older format of its state
                        if hasattr(value, "match_checkpoint"):
                            value.match_checkpoint(keys)
                    dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
                except Exception as exc:  # DCP raises many types for unreadable files
                    problem = f"{path} could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                else:
                    for earlier in problems:
                        (warn or warnings.warn)(f"skipped damaged checkpoint: {earlier}")
                    return step
            problems.append(problem)
        if problems:
            raise UserError(
                f"no usable checkpoint in {self.folder}: {problems[0]}"
                + (f" (and {len(problems) - 1} more damaged)" if len(problems) > 1 else "")
                + "; restore the files or train into a new --out folder"
            )
        return None


def refuse_imported(run: Path) -> None:
    """A run folder written by `colossus import` holds model weights only (no optimizer, schedule or data
    position): it is a fine-tune's starting point, not a run to resume or train into."""
    for _, path in Checkpointer(run / "checkpoints", keep=1).step_folders():
        try:
            imported = json.loads((path / MANIFEST).read_text()).get("imported_from")
        except (OSError, json.JSONDecodeError):
            continue
        if imported:
            raise UserError(f"{run} holds only the weights imported from {imported} (colossus import), not a "
                            f"training state to resume; fine-tune from it: colossus train {run / 'config.toml'} "
                            f"--set train.init_from={run} --out NEW_RUN")


def newest_intact(folder: Path, what: str) -> tuple[int, Path]:
    """The step and folder of the newest intact checkpoint in `folder` (a run's RUN/checkpoints); none is a
    UserError that starts with `what` (the setting or command that named the folder)."""
    candidates = Checkpointer(folder, keep=1).step_folders()
    if not candidates:
        raise UserError(f"{what}: no checkpoint in {folder}; point it at a run folder that has checkpoints/step-N")
    problems = []
    for step, path in candidates:
        problem = verify(path)
        if problem is None:
            return step, path
        problems.append(problem)
    raise UserError(f"{what}: no intact checkpoint in {folder}: {problems[0]}")


def load_model_weights(folder: Path, model: Any, what: str = "train.init_from") -> int:
    """Load only the model weights of the newest intact checkpoint in `folder` (another run's
    RUN/checkpoints) into `model`, for fine-tuning or generation; returns its step. The optimizer,
    schedule and data position start afresh. A missing, damaged or mismatched checkpoint is a UserError
    that starts with `what` (the setting or command that named the folder)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from colossus.parallel.pipeline import load_saved, to_saved

    step, path = newest_intact(folder, what)
    weights = {MODEL_KEY: {"model": to_saved(model, get_model_state_dict(model))}}
    try:
        dcp.load(weights, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except Exception as exc:  # shapes or names that do not match this model
        raise UserError(f"{what}: {path} does not fit this model "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); use the same [model]") from None
    set_model_state_dict(model, load_saved(model, weights[MODEL_KEY]["model"]))
    return step


def read_weight(checkpoint: Path, name: str, shape: tuple[int, ...]) -> Any:
    """One weight of the whole model (fp32, `name` as in the unsharded model) from a checkpoint folder,
    whatever layout wrote it: DCP reads only that tensor's chunks."""
    import torch

    tensor = torch.empty(shape)
    dcp.load({MODEL_KEY: {"model": {name: tensor}}}, checkpoint_id=str(checkpoint), no_dist=True)
    return tensor


class CheckpointPolicy:
    """When to save (every `interval` steps and at the last), and what a failed save means: it is
    recorded (events.jsonl, console) and the run goes on with its previous checkpoint intact
    (on_error = "continue"), or stops with a one-line error naming the folder ("stop")."""

    def __init__(self, checkpointer: Checkpointer, state: dict[str, Any], logger: Any, interval: int,
                 total_steps: int, on_error: str = "continue", extra: dict[str, Any] | None = None,
                 saved_step: int | None = None):
        self.checkpointer, self.state, self.logger = checkpointer, state, logger
        self.interval, self.total_steps, self.on_error = interval, total_steps, on_error
        self.extra = extra or {}  # written into each manifest (the config's hash)
        self.saved_step = saved_step  # the step whose checkpoint holds the current state (set it after a rollback)
        self.failures = 0

    def should_save(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.total_steps

    def save(self, step: int) -> bool:
        """Start the checkpoint of `step` (after the previous one is done); False if either failed. A step
        already saved is not written again (replacing a checkpoint with itself only opens a window
        in which, with checkpoint.keep = 1, none is committed)."""
        previous_ok = self.finish()
        if step == self.saved_step:
            return previous_ok
        try:
            path = self.checkpointer.save(step, self.state, extra=self.extra)
        except CheckpointWriteError as exc:
            self._failed(exc)
            return False
        self.saved_step = step
        self.logger.event("checkpoint", step=step, path=str(path))
        return previous_ok

    def finish(self) -> bool:
        """Wait for a background save; False if it failed."""
        try:
            self.checkpointer.finish()
        except CheckpointWriteError as exc:
            self._failed(exc)
            return False
        return True

    def restore(self) -> int | None:
        """Load the newest intact checkpoint into the state (after any save in flight is done)."""
        self.finish()
        self.saved_step = self.checkpointer.load_latest(self.state)
        return self.saved_step

    def _failed(self, exc: CheckpointWriteError) -> None:
        self.failures += 1
        intact = next((step for step, _ in self.checkpointer.step_folders()), None)
        self.logger.event("checkpoint_failed", step=exc.step, reason=exc.reason, newest_intact=intact)
        where = f"the newest intact checkpoint is step {intact}" if intact is not None else "there is no earlier checkpoint"
        if self.on_error == "stop":
            raise UserError(f"{exc}; {where}; free space or fix {self.checkpointer.folder}, then run the same "
                            "command again (or set checkpoint.on_error=continue to train on)") from None
        self.logger.print(f"warning: {exc}; {where}; training goes on (checkpoint.on_error=continue)")
