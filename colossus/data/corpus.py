"""Documents to train on: the Python standard library (always present, no download) or the user's
text, JSONL or Parquet files, each yielded as (doc_id, text) in a fixed order.

doc_ids are paths relative to the source (plus ":line" / ":row" for records), so they are the
same on every machine, and the train/validation split is a hash of the doc_id alone: it never
depends on iteration order, worker count or where the files live.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from colossus.config import DataConfig
from colossus.data.cache import short_hash
from colossus.errors import UserError

STDLIB = "stdlib"
RECORD_SUFFIXES = (".jsonl", ".parquet")  # every other file is read as plain text
_STDLIB_SKIP = {"site-packages", "__pycache__"}
_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a binary file (the rule git uses)
_FORMAT = 1  # bump when the way documents are read changes, to invalidate caches


def _no_files(source: str) -> UserError:
    return UserError(
        f"data.source {source!r} matches no files; point it at a folder, a glob, "
        ".txt/.jsonl/.parquet files, or 'stdlib'"
    )


def _walk(root: Path, keep: Callable[[str], bool], skip_dir: Callable[[str], bool]) -> list[Path]:
    """All files under root accepted by `keep`, sorted by their path relative to root."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not skip_dir(d)]
        found.extend(Path(folder) / name for name in files if keep(name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _glob_base(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard, used to make doc_ids relative."""
    parts: list[str] = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _resolve(cfg: DataConfig) -> tuple[Path, list[Path]]:
    """(base folder, files) for the configured source; doc_ids are file paths relative to base."""
    source = cfg.source
    if source == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _walk(root, lambda name: name.endswith(".py"), lambda d: d in _STDLIB_SKIP)
        return root, files
    expanded = os.path.expanduser(source)
    if glob.has_magic(expanded):
        base = _glob_base(expanded)
        files = sorted((Path(p) for p in glob.glob(expanded, recursive=True)), key=lambda p: p.as_posix())
        files = [p for p in files if p.is_file()]
    elif os.path.isdir(expanded):
        base = Path(expanded)
        hidden = lambda name: name.startswith(".")  # noqa: E731 - .git, .DS_Store and the like
        files = _walk(base, lambda name: not hidden(name), hidden)
    elif os.path.isfile(expanded):
        base, files = Path(expanded).parent, [Path(expanded)]
    else:
        files = []
    if not files:
        raise _no_files(source)
    return base, files


def _read_text(path: Path) -> str | None:
    """A text file's contents, or None for a binary file (a folder may hold images and the like)."""
    data = path.read_bytes()
    if b"\x00" in data[:_SNIFF_BYTES]:
        return None
    return data.decode("utf-8", errors="replace")


def _jsonl_records(path: Path, doc_id: str, field: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"data.source file {path} line {number} is not valid JSON ({exc.msg}); fix or remove that line") from None
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(
                    f"data.source file {path} line {number} has no string field {field!r}; "
                    "set data.text_field to the field that holds the text"
                )
            if text:
                yield f"{doc_id}:{number}", text


def _parquet_records(path: Path, doc_id: str, field: str) -> Iterator[tuple[str, str]]:
    import pyarrow as pa  # imported lazily: only Parquet sources need it
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"data.source file {path} is not a readable Parquet file ({exc}); check or remove it") from None
    schema = table_file.schema_arrow
    if field not in schema.names:
        raise UserError(
            f"data.source file {path} has no column {field!r} (columns: {', '.join(schema.names)}); "
            "set data.text_field to the column that holds the text"
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"data.source file {path} column {field!r} holds {kind}, not text; set data.text_field to a string column")
    row = 0
    for batch in table_file.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text:  # nulls and empty strings carry no tokens
                yield f"{doc_id}:{row}", text
            row += 1


def iter_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """Yield (doc_id, text) for every non-empty document of data.source, in a deterministic order."""
    base, files = _resolve(cfg)
    for path in files:
        doc_id = os.path.relpath(path, base).replace(os.sep, "/")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_records(path, doc_id, cfg.text_field)
        elif suffix == ".parquet":
            yield from _parquet_records(path, doc_id, cfg.text_field)
        else:
            text = _read_text(path)
            if text:
                yield doc_id, text


def corpus_fingerprint(cfg: DataConfig) -> str:
    """A short hash of the corpus identity (paths, sizes, mtimes, text field; for stdlib the Python
    version too), so every cache built from it is rebuilt when any file changes."""
    base, files = _resolve(cfg)
    listing = []
    for path in files:
        info = path.stat()
        listing.append((os.path.abspath(path), info.st_size, info.st_mtime_ns))
    version = sys.version if cfg.source == STDLIB else ""
    return short_hash(_FORMAT, cfg.source, version, cfg.text_field, listing)


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Whether a document is held out, from a hash of its id alone (stable across machines/order)."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64
