"""Checkpoints with torch.distributed.checkpoint (DCP), committed atomically.

Layout: RUN/checkpoints/step-N/ holds DCP's files, a manifest.json (every file's size and checksum,
the step, the config hash) and a COMMITTED marker. A checkpoint is written into a hidden
`.step-N.partial` folder, checked, and only then renamed to `step-N` (a rename is atomic on one
file system), so a crash mid-write never leaves a folder that looks complete. Loading verifies the
manifest first; a damaged checkpoint is named and skipped for the previous complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from colossus.errors import UserError

COMMITTED = "COMMITTED"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# DCP warns on every single-process save, also from the background writer thread where no_dist is
# not passed on; one process is a supported case here, so the warning only adds noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


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
    _write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))


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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class PendingSave:
    step: int
    partial: Path
    final: Path
    extra: dict[str, Any]
    future: Any  # concurrent.futures.Future of dcp.async_save
    committed: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclass
class Checkpointer:
    folder: Path  # RUN/checkpoints
    keep: int
    asynchronous: bool = False  # write in a background thread; the loop blocks only while staging
    pending: PendingSave | None = None
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
        saves return once the state is staged in memory; the commit happens when the next save starts
        (which first waits for this one) or at `finish()`."""
        self.finish()  # a new save waits for the previous one
        final = self.folder / f"step-{step}"
        partial = self.folder / f".step-{step}.partial"
        if _is_coordinator():
            if partial.exists():
                shutil.rmtree(partial)  # our own leftover from a crashed save of this step
            partial.mkdir(parents=True)
        _barrier()
        if self.asynchronous:
            if dist.is_initialized() and self._group is None:
                self._group = dist.new_group(backend="gloo")
            future = dcp.async_save(state, checkpoint_id=str(partial), process_group=self._group,
                                    no_dist=not dist.is_initialized())
            self.pending = PendingSave(step, partial, final, extra or {}, future)
            if _is_coordinator():
                # The coordinator's save completes only after every rank's files are written, so
                # it can commit at once, from the writer thread, while training goes on.
                future.add_done_callback(lambda done, save=self.pending: self._commit_when_written(save))
            return final
        dcp.save(state, checkpoint_id=str(partial), no_dist=not dist.is_initialized())  # returns once every rank's files are written
        self._commit(PendingSave(step, partial, final, extra or {}, None))
        return final

    def finish(self) -> None:
        """Wait until a background save is written and committed (a no-op when none is pending)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.future.result()  # raises if the write failed: the partial folder is never committed
            if _is_coordinator():
                pending.committed.wait()
                if pending.error is not None:
                    raise pending.error
            _barrier()

    def _commit_when_written(self, save: PendingSave) -> None:
        try:
            if save.future.exception() is None:
                self._commit_files(save)
        except BaseException as exc:  # reported by finish() on the main thread
            save.error = exc
        finally:
            save.committed.set()

    def _commit(self, save: PendingSave) -> None:
        if _is_coordinator():
            self._commit_files(save)
        _barrier()

    def _commit_files(self, save: PendingSave) -> None:
        """Manifest, then the COMMITTED marker, then one atomic rename: only now is it visible."""
        write_manifest(save.partial, save.step, save.extra)
        _write_atomic(save.partial / COMMITTED, f"{save.step}\n")
        if save.final.exists():  # a checkpoint of this step from an earlier attempt: replace it whole
            shutil.rmtree(save.final)
        os.replace(save.partial, save.final)
        self._prune()

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
