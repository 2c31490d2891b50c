"""Files that appear whole or not at all: written to a temporary name in the same folder, flushed to
disk, then renamed over the target with os.replace (atomic on POSIX). A reader sees the old file or the
new one, never half of one, and a crash mid-write leaves the old file as it was. Every file Colossus
writes for a user (run folders, reports, caches, checkpoint manifests) goes through here; whole
folders (an export, an import) appear the same way, by staged_folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """Yield a binary file that appears at `path` only once the block finished without error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)  # only ever our own temporary file
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace `path` with `data` (text is written as UTF-8) in one atomic step."""
    with atomic_file(path) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a hidden folder beside `out` to write a whole folder into; it becomes `out` (one rename)
    once the block finished without error and is removed otherwise. `out` must not exist."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private; `out` gets a new folder's mode
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
