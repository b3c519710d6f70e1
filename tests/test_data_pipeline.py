"""Data pipeline: docstring corpus, tokenizer, Arrow shards + manifest, and the trainer's TokenStream over them."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from tokenizers import Tokenizer, models

from triarch.data_pipeline import (
    DataError,
    TokenStream,
    dp_slice,
    eos_id,
    load_tokenizer,
    prepare_corpus,
    prepare_pydocs,
    read_manifest,
    split_train_validation,
    stdlib_docstrings,
    train_byte_level_bpe,
    verify_files,
)
from triarch.data_pipeline.prepare import shard_writer
from triarch.data_pipeline.prepare.pydocs import MIN_DOCSTRING_CHARS, docstrings_under, stdlib_root

N_DOCS = 2000
VOCAB = 512
SHARD_TOKENS = 20_000
SEQ_LEN = 64


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return stdlib_docstrings()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pydocs")
    return prepare_pydocs(out, VOCAB, max_documents=N_DOCS, shard_tokens=SHARD_TOKENS)


def _stream(path: Path, split: str, order: np.ndarray | None = None) -> np.ndarray:
    """All tokens of a split, its shards in manifest order (or ``order``), read independently of the stream
    (plain pyarrow, copies)."""
    shards = read_manifest(path)["splits"][split]["shards"]
    tokens: list[int] = []
    for index in range(len(shards)) if order is None else order:
        table = pa.ipc.open_file(str(path / shards[index]["file"])).read_all()
        for doc in table.column("tokens").to_pylist():
            tokens.extend(doc)
    return np.asarray(tokens, dtype=np.int64)


def _token_stream(path: Path, split: str, seed: int, *, global_batch: int = 16, **options) -> TokenStream:
    return TokenStream(path, split, SEQ_LEN, global_batch_size=global_batch, seed=seed, **options)


def _rows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A batch's rows of ``SEQ_LEN + 1`` tokens: the inputs plus the last label."""
    return torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)


def _mtimes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*")) if p.is_file()}


def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


# --- corpus ---------------------------------------------------------------------------------------------


def test_corpus_nonempty_deduped_deterministic(corpus: list[str]) -> None:
    assert len(corpus) > N_DOCS
    keys = [" ".join(d.split()) for d in corpus]
    assert len(set(keys)) == len(keys)
    assert min(len(k) for k in keys) >= MIN_DOCSTRING_CHARS
    assert stdlib_docstrings() == corpus
    sub = docstrings_under(stdlib_root() / "json")
    assert sub and sub == docstrings_under(stdlib_root() / "json")


def test_corpus_does_not_import_modules(corpus: list[str]) -> None:
    assert "antigravity" not in sys.modules and "this" not in sys.modules


def test_split_disjoint_and_stable(corpus: list[str]) -> None:
    splits = split_train_validation(corpus)
    train, validation = splits["train"], splits["validation"]
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(corpus)
    assert 0.02 < len(validation) / len(corpus) < 0.10
    assert split_train_validation(list(reversed(corpus)))["validation"] == list(reversed(validation))
    with pytest.raises(ValueError, match="1.5"):
        split_train_validation(corpus, 1.5)


# --- tokenizer ------------------------------------------------------------------------------------------


def test_tokenizer_deterministic_with_eos(corpus: list[str], tmp_path: Path) -> None:
    docs = corpus[:300]
    a = train_byte_level_bpe(docs, 300, tmp_path / "a.json")
    train_byte_level_bpe(docs, 300, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert eos_id(a) == 0 and a.id_to_token(0) == "<|endoftext|>"
    loaded = load_tokenizer(tmp_path / "a.json")
    text = "Return the value of x.  Unicode: é中"
    assert loaded.decode(loaded.encode(text).ids) == text


def test_tokenizer_errors_name_the_file(tmp_path: Path) -> None:
    plain = tmp_path / "no_eos.json"
    Tokenizer(models.BPE()).save(str(plain))
    with pytest.raises(DataError, match="no_eos.json"):
        eos_id(load_tokenizer(plain), plain)
    with pytest.raises(DataError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(DataError, match="vocab_size \\(10\\)"):
        train_byte_level_bpe(["some text"], 10, tmp_path / "tiny.json")


# --- prepare --------------------------------------------------------------------------------------------


def test_manifest_matches_files(prepared: Path) -> None:
    manifest = verify_files(prepared)
    assert manifest["tokenizer"]["eos_id"] == 0 and manifest["tokenizer"]["vocab_size"] == VOCAB
    assert manifest["totals"]["documents"] == N_DOCS
    assert len(manifest["splits"]["train"]["shards"]) > 2
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            file = prepared / shard["file"]
            assert hashlib.sha256(file.read_bytes()).hexdigest() == shard["sha256"]
            assert pa.ipc.open_file(str(file)).read_all().num_rows == shard["documents"]
    times = _mtimes(prepared)
    assert max(times.values()) == times["manifest.json"]
    assert not [name for name in times if ".tmp-" in name]


def test_every_document_ends_with_eos(prepared: Path) -> None:
    shard = read_manifest(prepared)["splits"]["train"]["shards"][0]
    docs = pa.ipc.open_file(str(prepared / shard["file"])).read_all().column("tokens").to_pylist()
    assert all(doc[-1] == 0 and 0 not in doc[:-1] for doc in docs)


def test_prepare_is_idempotent(prepared: Path) -> None:
    before = _mtimes(prepared)
    assert prepare_pydocs(prepared, VOCAB, max_documents=N_DOCS, shard_tokens=SHARD_TOKENS) == prepared
    assert _mtimes(prepared) == before
    with pytest.raises(DataError, match="manifest.json"):
        prepare_pydocs(prepared, VOCAB * 2, max_documents=N_DOCS, shard_tokens=SHARD_TOKENS)


def test_prepare_rejects_other_documents(prepared: Path, corpus: list[str]) -> None:
    splits = split_train_validation(corpus[:N_DOCS])
    splits["train"] = splits["train"][1:]
    with pytest.raises(DataError, match="'train'"):
        prepare_corpus(splits, prepared / "tokenizer.json", prepared, SHARD_TOKENS)


def test_folder_without_manifest_is_completed(prepared: Path, corpus: list[str], tmp_path: Path) -> None:
    original = read_manifest(prepared)
    out = _copy_dir(prepared, tmp_path / "partial")
    (out / "manifest.json").unlink()
    shards = [s["file"] for s in original["splits"]["train"]["shards"]]
    (out / shards[1]).write_bytes(b"truncated garbage")
    (out / "train" / "shard_99999.arrow").write_bytes(b"stale")
    (out / "train" / "shard_00002.arrow.tmp-123").write_bytes(b"interrupted")
    before = _mtimes(out)
    splits = split_train_validation(corpus[:N_DOCS])
    prepare_corpus(splits, out / "tokenizer.json", out, SHARD_TOKENS, source=original["source"],
                   split=original["split"])
    assert read_manifest(out) == original
    verify_files(out)
    after = _mtimes(out)
    assert after[shards[0]] == before[shards[0]]  # right content: reused
    assert after[shards[1]] != before[shards[1]]  # wrong content: rewritten
    assert "train/shard_99999.arrow" not in after and "train/shard_00002.arrow.tmp-123" not in after


def test_interrupted_prepare_leaves_no_manifest(prepared: Path, corpus: list[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "crash"
    calls = {"n": 0}
    real = shard_writer.write_shard

    def crash_on_second(path: Path, data) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(shard_writer, "write_shard", crash_on_second)
    splits = split_train_validation(corpus[:N_DOCS])
    with pytest.raises(OSError):
        prepare_corpus(splits, prepared / "tokenizer.json", out, SHARD_TOKENS)
    assert (out / "train" / "shard_00000.arrow").exists() and not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="no manifest"):
        _token_stream(out, "train", 0)
    monkeypatch.setattr(shard_writer, "write_shard", real)
    prepare_corpus(splits, prepared / "tokenizer.json", out, SHARD_TOKENS)
    assert read_manifest(out)["splits"] == read_manifest(prepared)["splits"]


def test_older_format_folder_is_prepared_again(prepared: Path, tmp_path: Path) -> None:
    original = read_manifest(prepared)
    out = _copy_dir(prepared, tmp_path / "v1")
    old = {**json.loads(json.dumps(original)), "format_version": 1}
    for split in old["splits"].values():
        for shard in split["shards"]:
            del shard["batch_tokens"]
    (out / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(DataError, match="version 1, expected 'triarch.tokens' version 2"):
        read_manifest(out)
    prepare_pydocs(out, VOCAB, max_documents=N_DOCS, shard_tokens=SHARD_TOKENS)
    assert read_manifest(out) == original


def test_read_manifest_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path)) as missing:
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json") as broken:
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "triarch.tokens", "format_version": 99,
                                                        "tokenizer": {}, "splits": {}}))
    with pytest.raises(DataError, match="version 99") as version:
        read_manifest(tmp_path)
    assert all("\n" not in str(e.value) for e in (missing, broken, version))


# --- the stream over a prepared folder (the trainer's reader) ------------------------------------------


def test_batches_are_deterministic(prepared: Path) -> None:
    a = _token_stream(prepared, "train", 7)
    b = _token_stream(prepared, "train", 7)
    assert a.vocab_size == VOCAB and a.eos_id == 0
    batch = a.batch_for_step(5)
    assert batch["input_ids"].shape == (16, SEQ_LEN) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert torch.equal(_rows(batch), _rows(b.batch_for_step(5)))
    assert not torch.equal(_rows(batch), _rows(_token_stream(prepared, "train", 8).batch_for_step(5)))


@pytest.mark.parametrize("dp_size", [1, 2, 4, 8])
def test_dp_slices_concatenate_to_global_batch(prepared: Path, dp_size: int) -> None:
    reference = _rows(_token_stream(prepared, "train", 1).batch_for_step(3))
    rank_views = [_rows(_token_stream(prepared, "train", 1, dp_rank=r, dp_size=dp_size).batch_for_step(3))
                  for r in range(dp_size)]
    assert all(v.shape[0] == 16 // dp_size for v in rank_views)
    assert torch.equal(torch.cat(rank_views), reference)
    assert all(torch.equal(dp_slice(reference, r, dp_size), view) for r, view in enumerate(rank_views))


def test_batch_tokens_are_the_prepared_tokens(prepared: Path) -> None:
    ts = _token_stream(prepared, "train", 3, global_batch=8)
    tokens = _stream(prepared, "train")
    assert ts.sources[0].total_tokens == len(tokens) and ts.windows_per_epoch == ((len(tokens) - 1) // SEQ_LEN,)
    epoch = _stream(prepared, "train", ts.shard_order(0))
    batch = ts.batch_for_step(2)
    for row, g in enumerate(range(16, 24)):
        _, e, window = ts.origin(g)
        start = window * SEQ_LEN
        assert e == 0
        assert np.array_equal(batch["input_ids"][row].numpy(), epoch[start:start + SEQ_LEN])
        assert np.array_equal(batch["labels"][row].numpy(), epoch[start + 1:start + SEQ_LEN + 1])


def test_windows_cross_shard_boundaries(prepared: Path) -> None:
    ts = _token_stream(prepared, "train", 0, shuffle=False)  # manifest shard order, windows in order
    tokens = _stream(prepared, "train")
    boundary = read_manifest(prepared)["splits"]["train"]["shards"][0]["tokens"]
    index = boundary // SEQ_LEN
    assert index * SEQ_LEN < boundary < index * SEQ_LEN + SEQ_LEN + 1
    assert np.array_equal(ts.sequences(index, 1)[0], tokens[index * SEQ_LEN:index * SEQ_LEN + SEQ_LEN + 1])


def test_epoch_covers_each_window_once(prepared: Path) -> None:
    ts = _token_stream(prepared, "validation", 5)
    n = ts.windows_per_epoch[0]

    def windows(epoch: int) -> np.ndarray:
        tokens = _stream(prepared, "validation", ts.shard_order(epoch))
        return np.stack([tokens[i * SEQ_LEN:i * SEQ_LEN + SEQ_LEN + 1] for i in range(n)])

    order = [ts.origin(g)[2] for g in range(2 * n)]
    assert sorted(order[:n]) == list(range(n)) and sorted(order[n:]) == list(range(n))
    assert np.array_equal(ts.sequences(0, n), windows(0)[order[:n]])
    across = ts.sequences(n - 2, 4)  # last two of epoch 0, first two of epoch 1
    assert np.array_equal(across[:2], windows(0)[order[n - 2:n]])
    assert np.array_equal(across[2:], windows(1)[order[n:n + 2]])
    assert order[n:] != order[:n]


def test_state_dict_round_trip(prepared: Path) -> None:
    ts = _token_stream(prepared, "train", 11, global_batch=8)
    assert len(list(ts.batches(3))) == 3
    state = ts.state_dict()
    assert state["consumed_sequences"] == 24
    resumed = _token_stream(prepared, "train", 11, global_batch=8)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert torch.equal(_rows(next(resumed.batches(1))), _rows(next(ts.batches(1))))
    assert resumed.state_dict() == ts.state_dict()
    for key, value in [("seed", 12), ("seq_len", 32), ("split", "validation")]:
        with pytest.raises(DataError, match=f"{key}={value!r}"):
            resumed.load_state_dict({**state, key: value})


def test_stream_rejects_bad_inputs(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'nope'"):
        _token_stream(prepared, "nope", 0)
    tokens = read_manifest(prepared)["splits"]["validation"]["tokens"]
    with pytest.raises(DataError, match=f"{tokens} tokens"):
        TokenStream(prepared, "validation", tokens, global_batch_size=1)
    batch = torch.zeros(6, 3, dtype=torch.long)
    with pytest.raises(DataError, match="dp_size \\(4\\)"):
        dp_slice(batch, 0, 4)
    with pytest.raises(DataError, match="dp_rank \\(3\\)"):
        dp_slice(batch, 3, 3)
    small_vocab = _copy_dir(prepared, tmp_path / "small_vocab")
    manifest = json.loads((small_vocab / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 100
    (small_vocab / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="vocab_size 100"):
        _token_stream(small_vocab, "train", 0)
