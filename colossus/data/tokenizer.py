"""Tokenizers: raw UTF-8 bytes, a byte-level BPE trained here on the corpus, or the user's
tokenizer.json. All work offline and expose the same small interface, including the id of the
end-of-text token that separates documents in the token stream.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import tokenizers

from colossus.config import DataConfig
from colossus.data.cache import cache_root, file_lock, make_dir, short_hash
from colossus.files import write_atomic
from colossus.data.corpus import corpus_fingerprint, is_validation, iter_documents
from colossus.errors import UserError

log = logging.getLogger(__name__)

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
BPE_EOS = "<|endoftext|>"
_BYTE_ALPHABET = 256


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the trainer need from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int  # appended after every document
    fingerprint: str  # changes whenever the text -> ids mapping could change

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids. NUL (id 0) is the document separator: text files do not contain it."""

    name: str = "byte"
    vocab_size: int = _BYTE_ALPHABET
    eos_id: int = 0
    fingerprint: str = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        array_like = hasattr(ids, "__array__")  # numpy arrays and CPU tensors convert without a copy
        values = np.asarray(ids if array_like else list(ids), dtype=np.int64).ravel()
        values = values[(values >= 0) & (values < _BYTE_ALPHABET)]  # a larger model vocab may sample others
        return values.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer; text is always encoded as plain text (no BOS added,
    special-token strings inside documents are not turned into special tokens)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, name: str, eos_token: str) -> None:
        tokenizer.encode_special_tokens = True  # only our own separators become eos
        self._tok = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        eos_id = tokenizer.token_to_id(eos_token)
        assert eos_id is not None, eos_token
        self.eos_id = eos_id
        self.fingerprint = hashlib.blake2b(tokenizer.to_str().encode("utf-8"), digest_size=8).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # parallel in Rust; the _fast variant (tokenizers >= 0.21) skips offsets we never use
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return [np.asarray(enc.ids, dtype=np.int64) for enc in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _find_eos(tokenizer: tokenizers.Tokenizer) -> str | None:
    for token in EOS_CANDIDATES:
        if tokenizer.token_to_id(token) is not None:
            return token
    return None


def load_tokenizer_file(path: str) -> HFTokenizer:
    """A user's tokenizer.json (data.tokenizer = path)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"data.tokenizer {path!r} is not 'byte', 'bpe' or an existing tokenizer.json file; fix the path")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises plain Exception for malformed files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"data.tokenizer file {path} is not a valid tokenizer.json ({first}); save one with tokenizers.Tokenizer.save") from None
    eos = _find_eos(tokenizer)
    if eos is None:
        raise UserError(
            f"data.tokenizer file {path} has no end-of-text token (one of {', '.join(EOS_CANDIDATES)}); "
            "use a tokenizer that has one or add it as a special token"
        )
    return HFTokenizer(tokenizer, name=str(path), eos_token=eos)


def _train_bpe(cfg: DataConfig, vocab_size: int) -> tokenizers.Tokenizer:
    """Byte-level BPE (GPT-2 style: every byte is a base token, so nothing is ever unknown)
    trained on the training documents only, so validation text stays unseen."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (text for doc_id, text in iter_documents(cfg) if not is_validation(doc_id, cfg.val_fraction))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def bpe_tokenizer(cfg: DataConfig, vocab_size: int) -> HFTokenizer:
    """The BPE for this corpus and vocabulary size: loaded from the cache, or trained and cached."""
    if vocab_size < _BYTE_ALPHABET + 1:
        raise UserError(
            f"model.vocab_size={vocab_size} is too small for data.tokenizer='bpe' (it needs at least "
            f"{_BYTE_ALPHABET + 1}: 256 bytes + end-of-text); raise model.vocab_size or use data.tokenizer='byte'"
        )
    key = short_hash(corpus_fingerprint(cfg), vocab_size, cfg.val_fraction)
    folder = make_dir(cache_root(cfg) / "tokenizers")
    path = folder / f"bpe-{vocab_size}-{key}.json"
    with file_lock(folder / f".bpe-{vocab_size}-{key}.lock"):  # one rank trains, the others wait
        if not path.is_file():
            log.info("training a %d-token BPE on %s (cached at %s)", vocab_size, cfg.source, path)
            trained = _train_bpe(cfg, vocab_size)
            write_atomic(path, trained.to_str())
    return HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), name=f"bpe-{vocab_size}", eos_token=BPE_EOS)


def build_tokenizer(cfg: DataConfig, vocab_size: int) -> Tokenizer:
    """The tokenizer named by data.tokenizer, checked to fit a model with `vocab_size` embeddings."""
    if cfg.tokenizer == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
    elif cfg.tokenizer == "bpe":
        tokenizer = bpe_tokenizer(cfg, vocab_size)
    else:
        tokenizer = load_tokenizer_file(cfg.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise UserError(
            f"data.tokenizer {cfg.tokenizer!r} has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{vocab_size}; set model.vocab_size to at least {tokenizer.vocab_size}"
        )
    return tokenizer
