"""Where derived data (trained tokenizers, token shards) lives, and how it is written safely.

Everything in the cache can be rebuilt from the corpus, so files are only ever replaced whole
(colossus.files): readers see either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from colossus.config import DataConfig
from colossus.errors import UserError

try:  # POSIX only; elsewhere concurrent builders merely duplicate work
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def cache_root(cfg: DataConfig) -> Path:
    """data.cache_dir if set, else $XDG_CACHE_HOME/colossus, else ~/.cache/colossus."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):  # the XDG spec says relative values are to be ignored
        return Path(xdg) / "colossus"
    return Path.home() / ".cache" / "colossus"


def make_dir(path: Path) -> Path:
    """Create a cache folder, turning permission problems into a UserError about data.cache_dir."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create cache folder {path} ({exc.strerror}); set data.cache_dir to a writable folder"
        ) from None
    return path


def short_hash(*parts: object) -> str:
    """A 16-hex-digit digest of the parts' reprs: stable across runs, machines and Python versions."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(repr(part).encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if needed) so that ranks sharing a machine
    build a cache entry once; the others wait here and then find it finished."""
    with open(path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
