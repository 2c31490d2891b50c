"""colossus.data: corpus sources, tokenizers, the token cache and the deterministic loader."""

from __future__ import annotations

import json
import logging
import re
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import torch

from colossus.config import DataConfig
from colossus.data import (
    PrefetchingLoader,
    TokenData,
    TokenLoader,
    Tokenizer,
    build_tokenizer,
    iter_documents,
    prepare_tokens,
    validation_batches,
)
from colossus.data.cache import cache_root
from colossus.data.corpus import corpus_fingerprint, is_validation
from colossus.errors import UserError

SAMPLE = "def f(x):\n    return x * 2  # héllo wörld ✓ 日本語\n"


def write_corpus(folder: Path, n_docs: int = 12, lines: int = 30) -> Path:
    """A small deterministic text corpus, varied enough for BPE merges and a validation split."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["alpha", "beta", "gamma", "delta", "token", "model", "expert", "router", "über", "naïve"]
    for doc in range(n_docs):
        body = "\n".join(
            f"{words[(doc + i) % 10]} {words[(doc * 3 + i) % 10]} = {doc * i} # line {i}" for i in range(lines)
        )
        (folder / f"doc{doc:02d}.txt").write_text(body + "\n", encoding="utf-8")
    return folder


def data_cfg(tmp_path: Path, **overrides: object) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **overrides)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = build_tokenizer(data_cfg(tmp_path), 256)
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eos_id) == (256, 0)
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8"))
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(torch.tensor(ids)) == SAMPLE
    assert tok.decode([0xFF]) == "\ufffd"  # invalid UTF-8 is replaced, not an error
    assert [a.tolist() for a in tok.encode_batch(["ab", ""])] == [[97, 98], []]


def test_byte_tokenizer_needs_256_embeddings(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"256 tokens.*model.vocab_size is 100"):
        build_tokenizer(data_cfg(tmp_path), 100)


def test_bpe_trains_once_and_round_trips(tmp_path: Path) -> None:
    cfg = data_cfg(tmp_path, source=str(write_corpus(tmp_path / "corpus")), tokenizer="bpe")
    tok = build_tokenizer(cfg, 400)
    assert 257 < tok.vocab_size <= 400
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"
    for text in (SAMPLE, "alpha beta = 12 # line 3\n", "<|endoftext|> is plain text here"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eos_id not in ids  # a literal separator string never becomes the separator
    assert len(tok.encode("alpha beta gamma delta")) < len("alpha beta gamma delta")  # merges learnt
    cached = list((cache_root(cfg) / "tokenizers").glob("bpe-400-*.json"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = build_tokenizer(cfg, 400)  # loaded from the cache, not retrained
    assert cached[0].stat().st_mtime_ns == stamp
    assert again.fingerprint == tok.fingerprint and again.encode(SAMPLE) == tok.encode(SAMPLE)


def test_bpe_vocab_too_small(tmp_path: Path) -> None:
    cfg = data_cfg(tmp_path, source=str(write_corpus(tmp_path / "corpus")), tokenizer="bpe")
    with pytest.raises(UserError, match="model.vocab_size=256 is too small"):
        build_tokenizer(cfg, 256)


def save_user_tokenizer(path: Path, eos: str | None = "</s>") -> Path:
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[eos] if eos else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello world, hello tokenizer"] * 20, trainer=trainer)
    tok.save(str(path))
    return path


def test_user_tokenizer_file(tmp_path: Path) -> None:
    path = save_user_tokenizer(tmp_path / "tokenizer.json")
    tok = build_tokenizer(data_cfg(tmp_path, tokenizer=str(path)), 1000)
    assert tok.eos_id == tokenizers.Tokenizer.from_file(str(path)).token_to_id("</s>")
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    with pytest.raises(UserError, match=r"model.vocab_size is 100; set model.vocab_size"):
        build_tokenizer(data_cfg(tmp_path, tokenizer=str(path)), 100)


def test_user_tokenizer_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(UserError, match=re.escape(f"data.tokenizer '{missing}'")):
        build_tokenizer(data_cfg(tmp_path, tokenizer=str(missing)), 1000)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(UserError, match=re.escape(f"data.tokenizer file {corrupt} is not a valid tokenizer.json")):
        build_tokenizer(data_cfg(tmp_path, tokenizer=str(corrupt)), 1000)
    no_eos = save_user_tokenizer(tmp_path / "no_eos.json", eos=None)
    with pytest.raises(UserError, match="no end-of-text token"):
        build_tokenizer(data_cfg(tmp_path, tokenizer=str(no_eos)), 1000)


# ------------------------------------------------------------------------------------ corpora


def test_stdlib_corpus() -> None:
    cfg = DataConfig()
    ids = [doc_id for doc_id, _ in iter_documents(cfg)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(ids) > 500 and len(set(ids)) == len(ids)
    assert "os.py" in ids and "json/decoder.py" in ids
    assert not any("site-packages" in i or "__pycache__" in i for i in ids)
    assert all(i.endswith(".py") and (stdlib / i).is_file() for i in ids)
    first = list(islice(iter_documents(cfg), 50))
    assert [doc_id for doc_id, _ in first] == ids[:50]  # same order every time
    assert dict(first)[ids[0]] == (stdlib / ids[0]).read_text(encoding="utf-8", errors="replace")
    held_out = [i for i in ids if is_validation(i, cfg.val_fraction)]
    assert 0 < len(held_out) < 0.05 * len(ids)


def test_validation_split_is_a_stable_hash() -> None:
    ids = [f"doc{i}.txt" for i in range(4000)]
    held = [i for i in ids if is_validation(i, 0.1)]
    assert 300 < len(held) < 500
    assert held == [i for i in reversed(ids) if is_validation(i, 0.1)][::-1]  # order-free
    assert set(held) <= {i for i in ids if is_validation(i, 0.2)}  # nested as the fraction grows
    assert not any(is_validation(i, 0.0) for i in ids) and all(is_validation(i, 1.0) for i in ids)


def test_folder_and_glob_sources(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bee")
    (root / "a.md").write_text("ay")
    (root / "sub" / "c.txt").write_text("sea")
    (root / "empty.txt").write_text("")
    (root / ".hidden.txt").write_text("secret")
    (root / "image.png").write_bytes(b"\x89PNG\x00\x00binary")
    docs = list(iter_documents(DataConfig(source=str(root))))
    assert docs == [("a.md", "ay"), ("b.txt", "bee"), ("sub/c.txt", "sea")]
    assert list(iter_documents(DataConfig(source=str(root / "**" / "*.txt")))) == [("b.txt", "bee"), ("sub/c.txt", "sea")]
    assert list(iter_documents(DataConfig(source=str(root / "sub" / "c.txt")))) == [("c.txt", "sea")]
    pattern = str(root / "*.rst")
    with pytest.raises(UserError, match=re.escape(f"data.source '{pattern}' matches no files; point it at a folder")):
        list(iter_documents(DataConfig(source=pattern)))
    with pytest.raises(UserError, match="matches no files"):
        list(iter_documents(DataConfig(source=str(tmp_path / "missing"))))


def test_fingerprint_tracks_changes(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "corpus", n_docs=3)
    cfg = DataConfig(source=str(root))
    before = corpus_fingerprint(cfg)
    assert corpus_fingerprint(cfg) == before
    (root / "doc01.txt").write_text("changed")
    assert corpus_fingerprint(cfg) != before
    assert corpus_fingerprint(DataConfig()) == corpus_fingerprint(DataConfig())


def test_jsonl_source(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "n": 2}\n{"body": "x", "text": ""}\n')
    assert list(iter_documents(DataConfig(source=str(path)))) == [("data.jsonl:1", "one"), ("data.jsonl:3", "two")]
    with pytest.raises(UserError, match=re.escape(f"data.source file {path} line 1 has no string field 'body'; set data.text_field")):
        list(iter_documents(DataConfig(source=str(path), text_field="body")))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match=re.escape(f"data.source file {broken} line 2 is not valid JSON")):
        list(iter_documents(DataConfig(source=str(broken))))


def test_parquet_source(tmp_path: Path) -> None:
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"content": ["first", None, "third"], "id": [1, 2, 3]}), folder / "part0.parquet")
    pq.write_table(pa.table({"content": ["fourth"], "id": [4]}), folder / "part1.parquet")
    cfg = DataConfig(source=str(folder), text_field="content")
    assert list(iter_documents(cfg)) == [("part0.parquet:0", "first"), ("part0.parquet:2", "third"), ("part1.parquet:0", "fourth")]
    with pytest.raises(UserError, match=r"part0.parquet has no column 'text' \(columns: content, id\)"):
        list(iter_documents(DataConfig(source=str(folder))))
    with pytest.raises(UserError, match="column 'id' holds int64, not text"):
        list(iter_documents(DataConfig(source=str(folder), text_field="id")))


# ------------------------------------------------------------------------------ token shards


def test_prepare_tokens_builds_once(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "corpus", n_docs=40, lines=10)
    cfg = data_cfg(tmp_path, source=str(root), val_fraction=0.2)
    data = prepare_tokens(cfg, 256, 32)
    assert isinstance(data, TokenData) and data.train.dtype == np.uint16 and not data.train.flags.writeable
    # the streams are exactly each split's documents + eos, in iteration order
    expected = {False: [], True: []}
    for doc_id, text in iter_documents(cfg):
        expected[is_validation(doc_id, 0.2)] += list(text.encode("utf-8")) + [0]
    assert data.train.tolist() == expected[False] and data.val.tolist() == expected[True]
    assert len(data.val) > 0 and len(data.train) > 3 * len(data.val)
    meta = json.loads((data.path / "meta.json").read_text())
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(data.train), len(data.val))

    def stamps() -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in data.path.iterdir()}

    before = stamps()
    again = prepare_tokens(cfg, 256, 32)
    assert again.path == data.path
    assert stamps() == before  # nothing re-tokenized or rewritten
    assert np.array_equal(again.train, data.train) and np.array_equal(again.val, data.val)
    assert not [p for p in data.path.iterdir() if p.name.endswith(".tmp")]

    (data.path / "meta.json").unlink()  # as if a build had been interrupted before its last step
    rebuilt = prepare_tokens(cfg, 256, 32)
    assert (rebuilt.path / "meta.json").is_file()
    assert (rebuilt.path / "train.bin").stat().st_ino != before["train.bin"][0]  # a new file replaced it
    assert np.array_equal(rebuilt.train, data.train)


def test_prepare_tokens_concurrent_callers_build_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # flock locks per open file, so threads contend exactly like ranks in separate processes
    cfg = data_cfg(tmp_path, source=str(write_corpus(tmp_path / "corpus", n_docs=40, lines=10)), val_fraction=0.2)
    caplog.set_level(logging.INFO, logger="colossus.data.shards")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: prepare_tokens(cfg, 256, 32), range(4)))
    assert len([r for r in caplog.records if r.getMessage().startswith("tokenizing")]) == 1
    assert all(np.array_equal(r.train, results[0].train) and r.path == results[0].path for r in results)
    assert sorted(p.name for p in results[0].path.iterdir()) == [".lock", "meta.json", "train.bin", "val.bin"]


def test_prepare_tokens_truncated_file_is_rebuilt(tmp_path: Path) -> None:
    cfg = data_cfg(tmp_path, source=str(write_corpus(tmp_path / "corpus", n_docs=40, lines=10)), val_fraction=0.2)
    data = prepare_tokens(cfg, 256, 32)
    good = np.array(data.train)
    (data.path / "train.bin").write_bytes(good[:10].tobytes())
    assert np.array_equal(prepare_tokens(cfg, 256, 32).train, good)


def test_prepare_tokens_cache_keys(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "corpus", n_docs=40, lines=10)
    byte = prepare_tokens(data_cfg(tmp_path, source=str(root), val_fraction=0.2), 256, 32)
    other_split = prepare_tokens(data_cfg(tmp_path, source=str(root), val_fraction=0.3), 256, 32)
    assert other_split.path != byte.path and len(other_split.val) > len(byte.val)
    bpe = prepare_tokens(data_cfg(tmp_path, source=str(root), val_fraction=0.2, tokenizer="bpe"), 400, 32)
    assert bpe.path != byte.path and len(bpe.train) < len(byte.train) // 2
    assert bpe.train.max() < bpe.tokenizer.vocab_size
    assert (bpe.train == bpe.tokenizer.eos_id).sum() == (byte.train == 0).sum()  # one eos per document
    first_doc = bpe.train[: int(np.argmax(bpe.train == bpe.tokenizer.eos_id))]
    assert bpe.tokenizer.decode(first_doc) == byte.tokenizer.decode(byte.train[: int(np.argmax(byte.train == 0))])


def test_prepare_tokens_too_little_data(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "corpus", n_docs=3, lines=2)
    cfg = data_cfg(tmp_path, source=str(root), val_fraction=0.01)
    with pytest.raises(UserError, match=r"validation split .* has 0 tokens in 0 documents.*raise data.val_fraction"):
        prepare_tokens(cfg, 256, 16)
    big = data_cfg(tmp_path, source=str(write_corpus(tmp_path / "big", n_docs=40, lines=10)), val_fraction=0.2)
    with pytest.raises(UserError, match=r"fewer than model.seq_len \+ 1 = 100001"):
        prepare_tokens(big, 256, 100_000)


def test_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_root(DataConfig(cache_dir=str(tmp_path))) == tmp_path
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(DataConfig()) == tmp_path / "xdg" / "colossus"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root(DataConfig()) == Path.home() / ".cache" / "colossus"


# ------------------------------------------------------------------------------------ loaders


def stream(n: int = 10_000) -> np.ndarray:
    return (np.arange(n) % 65_521).astype(np.uint16)  # position-revealing tokens


def collect(loader: TokenLoader, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(steps)]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


def test_loader_windows_and_epochs() -> None:
    tokens, seq = stream(1001), 10  # 100 windows
    loader = TokenLoader(tokens, seq_len=seq, global_batch=8, seed=3)
    assert loader.n_windows == 100
    x, y = loader.next_batch()
    assert x.shape == y.shape == (8, seq) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 1)  # targets are the next tokens
    assert (x[:, 0] % seq == 0).all()  # windows start at multiples of seq_len
    loader = TokenLoader(tokens, seq_len=seq, global_batch=20, seed=3)
    starts = [int(s) // seq for b in collect(loader, 10) for s in b[0][:, 0]]
    assert sorted(starts[:100]) == list(range(100)) and sorted(starts[100:]) == list(range(100))  # 2 epochs
    assert starts[:100] != starts[100:]  # each epoch has its own order
    assert loader.state_dict()["epoch"] == 2
    tiny = TokenLoader(stream(5 * seq + 1), seq_len=seq, global_batch=12)  # a step spans epochs
    starts = tiny.next_batch()[0][:, 0] // seq
    assert sorted(starts[:5].tolist()) == sorted(starts[5:10].tolist()) == list(range(5))
    assert tiny.state_dict()["epoch"] == 2 and tiny.state_dict()["cursor"] == 2


def test_loader_determinism() -> None:
    tokens = stream()
    a = collect(TokenLoader(tokens, 16, 8, seed=1), 5)
    assert same(a, collect(TokenLoader(tokens, 16, 8, seed=1), 5))
    assert not same(a, collect(TokenLoader(tokens, 16, 8, seed=2), 5))


@pytest.mark.parametrize("k", [3, 10, 12])  # 64 windows / 6 per step: 10 and 12 straddle epochs
def test_loader_resume(k: int) -> None:
    tokens = stream(16 * 64 + 1)
    original = TokenLoader(tokens, 16, 6, seed=5)
    collect(original, k)
    state = original.state_dict()
    assert all(type(v) is int for v in state.values())
    resumed = TokenLoader(tokens, 16, 6, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a round trip through JSON
    assert same(collect(resumed, 15), collect(original, 15))


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetching_loader_is_the_same_loader(depth: int) -> None:
    """Built ahead in a thread, the batches and the checkpointed position are the plain loader's:
    the position counts batches handed out, not the ones waiting in the queue."""
    tokens = stream(16 * 64 + 1)  # 64 windows, 6 per step: epochs end mid-step
    plain, ahead = TokenLoader(tokens, 16, 6, seed=5), PrefetchingLoader(TokenLoader(tokens, 16, 6, seed=5), depth)
    try:
        for _ in range(12):
            assert ahead.state_dict() == plain.state_dict()
            assert same([ahead.next_batch()], [plain.next_batch()])
        assert ahead.loader.state_dict() != plain.state_dict()  # the inner loader really ran ahead
        resumed = PrefetchingLoader(TokenLoader(tokens, 16, 6, seed=5), depth)
        resumed.load_state_dict(json.loads(json.dumps(ahead.state_dict())))
        assert same(collect(resumed, 14), collect(plain, 14))
        resumed.close()
        rewound = plain.state_dict()  # a rollback: load an earlier position into a loader that ran ahead
        later = collect(plain, 4)
        collect(ahead, 20)
        ahead.load_state_dict(rewound)
        assert ahead.state_dict() == rewound and same(collect(ahead, 4), later)
    finally:
        ahead.close()
    assert ahead.state_dict() == ahead.loader.state_dict()  # closing drops the batches built ahead


def test_prefetching_loader_keeps_its_position_on_bad_state() -> None:
    ahead = PrefetchingLoader(TokenLoader(stream(), 16, 8, seed=1), 2)
    collect(ahead, 3)
    before = ahead.state_dict()
    with pytest.raises(UserError, match="data changed since the checkpoint"):
        ahead.load_state_dict(TokenLoader(stream(), 16, 8, seed=2).state_dict())
    assert ahead.state_dict() == before and same([ahead.next_batch()], [collect(TokenLoader(stream(), 16, 8, seed=1), 4)[3]])
    ahead.close()


def test_loader_resume_rejects_other_data() -> None:
    state = TokenLoader(stream(), 16, 8, seed=1).state_dict()
    with pytest.raises(UserError, match="data changed since the checkpoint"):
        TokenLoader(stream(), 16, 8, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="data changed since the checkpoint"):
        TokenLoader(stream(5000), 16, 8, seed=1).load_state_dict(state)


@pytest.mark.parametrize("dp_size", [2, 4])
def test_loader_dp_slicing(dp_size: int) -> None:
    tokens = stream(16 * 50 + 1)  # 50 windows, 8 per step: steps cross epoch boundaries
    single = collect(TokenLoader(tokens, 16, 8, seed=7), 9)
    ranks = [collect(TokenLoader(tokens, 16, 8, dp_rank=r, dp_size=dp_size, seed=7), 9) for r in range(dp_size)]
    for step, (x, y) in enumerate(single):
        parts = [ranks[r][step] for r in range(dp_size)]
        assert all(p[0].shape == (8 // dp_size, 16) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(UserError, match="train.global_batch=8 must be a positive multiple of the 3"):
        TokenLoader(tokens, 16, 8, dp_rank=0, dp_size=3)


def test_validation_batches() -> None:
    tokens, seq = stream(16 * 20 + 1), 16  # 20 windows
    batches = validation_batches(tokens, seq, batch_size=4, n_batches=3)
    assert len(batches) == 3 and same(batches, validation_batches(tokens, seq, 4, 3))
    firsts = [int(s) for x, _ in batches for s in x[:, 0]]
    assert firsts == [i * seq for i in range(12)]  # sequential, unshuffled
    assert all(torch.equal(y, x + 1) for x, y in batches)
    halves = [validation_batches(tokens, seq, 4, 3, dp_rank=r, dp_size=2) for r in range(2)]
    for (x, y), h0, h1 in zip(batches, *halves):
        assert torch.equal(torch.cat([h0[0], h1[0]]), x) and torch.equal(torch.cat([h0[1], h1[1]]), y)
    assert len(validation_batches(tokens, seq, 4, 100)) == 5  # only 20 windows exist
    short = validation_batches(stream(16 * 3 + 1), seq, 8, 4, dp_rank=1, dp_size=2)  # 3 windows, 2 ranks
    assert len(short) == 1 and short[0][0].shape == (1, seq) and int(short[0][0][0, 0]) == seq
    with pytest.raises(UserError, match="add data or raise data.val_fraction"):
        validation_batches(stream(10), seq, 4, 2)


def test_a_missing_replica_groups_share_becomes_the_next_windows() -> None:
    """Replica groups share one stream: with 3 groups of 2 sequences a full step reads 6 windows; with a
    group missing it reads 4, and the stream goes on after them. Over a change of membership no window
    is skipped or read twice: the groups' reads, in step and group order, are the plain loader's stream."""
    tokens = np.arange(64 * 33 + 1) % 251
    plain = TokenLoader(tokens, 32, 2, seed=3)
    stream = np.concatenate([plain.next_window_ids() for _ in range(40)])
    groups = [TokenLoader(tokens, 32, 2, seed=3) for _ in range(3)]
    membership = [3, 3, 2, 2, 2, 3, 1, 3, 3, 2]  # groups in each step's quorum
    read = []
    for participants in membership:
        for participant in range(participants):
            inputs, targets = groups[participant].next_shared_batch(participant, participants)
            read.append(inputs[:, 0].numpy())  # a window's first token identifies it (w x 32 mod 251)
        states = {json.dumps(g.state_dict()) for g in groups[:participants]}
        assert len(states) == 1  # every group in the step stands at the same position after it
        for group in groups[participants:]:  # the missing ones take the position with the state they receive
            group.load_state_dict(groups[0].state_dict())
    first_tokens = np.concatenate(read)
    expected = tokens[stream[:sum(membership) * 2] * 32]
    assert np.array_equal(first_tokens, expected)
    assert len(set(stream[:sum(membership) * 2].tolist())) == sum(membership) * 2  # within one epoch: no repeats
