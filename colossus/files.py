"""Files that appear whole or not at all: written to a temporary name in the same folder, flushed to
disk, then renamed over the target with os.replace (atomic on POSIX). A reader sees the old file or the
new one, never half of one, and a crash mid-write leaves the old file as it was. Every file Colossus
writes for a user (run folders, reports, caches, checkpoint manifests) goes through here."""

from __future__ import annotations

import os
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
