"""Tokenize the corpus once into two flat token files (train.bin, val.bin) and memory-map them.

Layout: cache_root/tokens/<key>/{train.bin, val.bin, meta.json}, key = hash of the corpus,
tokenizer, validation fraction and dtype. Each document is followed by the tokenizer's eos id.
meta.json is written last, so a folder without it (or whose files disagree with it) is an
interrupted build and is rebuilt; every file is replaced atomically, never edited in place.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from colossus.config import DataConfig
from colossus.data.cache import cache_root, file_lock, make_dir, short_hash
from colossus.files import atomic_file, write_atomic
from colossus.data.corpus import corpus_fingerprint, is_validation, iter_documents
from colossus.data.tokenizer import Tokenizer, build_tokenizer
from colossus.errors import UserError

log = logging.getLogger(__name__)

_FORMAT = 1
_BATCH_CHARS = 4_000_000  # documents are encoded in batches of about this much text
SPLITS = ("train", "val")


@dataclass(frozen=True)
class TokenData:
    """Read-only memory-mapped token streams plus the tokenizer that produced them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    path: Path  # the cache folder holding train.bin, val.bin and meta.json


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _read_meta(folder: Path, dtype: np.dtype) -> dict[str, Any] | None:
    """The build's meta.json if the build is complete and its files match it, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        for split in SPLITS:
            if (folder / f"{split}.bin").stat().st_size != meta[f"{split}_tokens"] * dtype.itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


class _SplitWriter:
    """Accumulates one split's tokens and appends them to its file in large writes."""

    def __init__(self, handle: IO[bytes], dtype: np.dtype, eos_id: int) -> None:
        self.handle, self.dtype = handle, dtype
        self.eos = np.array([eos_id], dtype=dtype)
        self.pending: list[np.ndarray] = []
        self.tokens = 0
        self.docs = 0

    def add(self, ids: np.ndarray) -> None:
        self.pending += [ids.astype(self.dtype, copy=False), self.eos]
        self.tokens += len(ids) + 1
        self.docs += 1

    def flush(self) -> None:
        if self.pending:
            self.handle.write(np.concatenate(self.pending).tobytes())
            self.pending = []


def _build(cfg: DataConfig, tokenizer: Tokenizer, dtype: np.dtype, folder: Path) -> dict[str, Any]:
    """Tokenize every document into train.bin / val.bin, then write meta.json."""
    started = time.perf_counter()
    log.info("tokenizing %s with %s into %s", cfg.source, tokenizer.name, folder)
    with atomic_file(folder / "train.bin") as train_file, atomic_file(folder / "val.bin") as val_file:
        writers = {False: _SplitWriter(train_file, dtype, tokenizer.eos_id), True: _SplitWriter(val_file, dtype, tokenizer.eos_id)}
        batch: list[tuple[str, str]] = []
        chars = 0

        def encode_pending() -> None:
            for (doc_id, _), ids in zip(batch, tokenizer.encode_batch([text for _, text in batch])):
                writers[is_validation(doc_id, cfg.val_fraction)].add(ids)
            for writer in writers.values():
                writer.flush()
            batch.clear()

        for doc in iter_documents(cfg):
            batch.append(doc)
            chars += len(doc[1])
            if chars >= _BATCH_CHARS:
                encode_pending()
                chars = 0
        encode_pending()
    train, val = writers[False], writers[True]
    meta = {
        "format": _FORMAT,
        "source": cfg.source,
        "text_field": cfg.text_field,
        "tokenizer": tokenizer.name,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "val_fraction": cfg.val_fraction,
        "dtype": dtype.name,
        "train_tokens": train.tokens,
        "val_tokens": val.tokens,
        "train_docs": train.docs,
        "val_docs": val.docs,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_atomic(folder / "meta.json", json.dumps(meta, indent=1) + "\n")
    log.info("tokenized %d train / %d val tokens in %.1f s", train.tokens, val.tokens, meta["seconds"])
    return meta


def _check_enough(cfg: DataConfig, meta: dict[str, Any], seq_len: int) -> None:
    need = seq_len + 1
    for split, fix in (("train", "lower"), ("val", "raise")):
        have = meta[f"{split}_tokens"]
        if have < need:
            raise UserError(
                f"the {'training' if split == 'train' else 'validation'} split of data.source {cfg.source!r} has "
                f"{have} tokens in {meta[f'{split}_docs']} documents, fewer than model.seq_len + 1 = {need}; "
                f"add data or {fix} data.val_fraction (now {cfg.val_fraction})"
            )


def prepare_tokens(cfg: DataConfig, vocab_size: int, seq_len: int) -> TokenData:
    """Tokenized train/val streams for this corpus and tokenizer, built on the first call and
    memory-mapped from the cache afterwards. Safe to call from several ranks at once."""
    tokenizer = build_tokenizer(cfg, vocab_size)
    dtype = token_dtype(tokenizer.vocab_size)
    key = short_hash(_FORMAT, corpus_fingerprint(cfg), tokenizer.fingerprint, cfg.val_fraction, dtype.name)
    folder = make_dir(cache_root(cfg) / "tokens" / key)
    meta = _read_meta(folder, dtype)
    if meta is None:
        with file_lock(folder / ".lock"):  # the first rank builds; the others then find meta.json
            meta = _read_meta(folder, dtype)
            if meta is None:
                meta = _build(cfg, tokenizer, dtype, folder)
    _check_enough(cfg, meta, seq_len)
    train, val = (np.memmap(folder / f"{split}.bin", dtype=dtype, mode="r") for split in SPLITS)
    return TokenData(train=train, val=val, tokenizer=tokenizer, path=folder)
