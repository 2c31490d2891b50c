"""Data pipeline: documents -> tokenizer -> cached token streams -> deterministic batches."""

from colossus.data.corpus import iter_documents
from colossus.data.loader import PrefetchingLoader, TokenLoader, make_loader, validation_batches
from colossus.data.shards import TokenData, prepare_tokens
from colossus.data.tokenizer import Tokenizer, build_tokenizer

__all__ = [
    "Tokenizer",
    "build_tokenizer",
    "TokenData",
    "prepare_tokens",
    "TokenLoader",
    "PrefetchingLoader",
    "make_loader",
    "validation_batches",
    "iter_documents",
]
