"""Data pipeline: docstring corpus, tokenizer, Arrow shards + manifest, packed dataset."""

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
    PackedTokenDataset,
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


def _stream(path: Path, split: str) -> np.ndarray:
    """All tokens of a split, read independently of the dataset class (plain pyarrow, copies)."""
    manifest = read_manifest(path)
    tokens: list[int] = []
    for shard in manifest["splits"][split]["shards"]:
        table = pa.ipc.open_file(str(path / shard["file"])).read_all()
        for doc in table.column("tokens").to_pylist():
            tokens.extend(doc)
    return np.asarray(tokens, dtype=np.int64)


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
        PackedTokenDataset(out, "train", SEQ_LEN, 0)
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


# --- dataset --------------------------------------------------------------------------------------------


def test_batches_are_deterministic(prepared: Path) -> None:
    a = PackedTokenDataset(prepared, "train", SEQ_LEN, seed=7)
    b = PackedTokenDataset(prepared, "train", SEQ_LEN, seed=7)
    assert a.vocab_size == VOCAB and a.eos_id == 0
    batch = a.global_batch(5, 16)
    assert batch.shape == (16, SEQ_LEN + 1) and batch.dtype == torch.int64
    assert torch.equal(batch, b.global_batch(5, 16))
    assert not torch.equal(batch, PackedTokenDataset(prepared, "train", SEQ_LEN, seed=8).global_batch(5, 16))


@pytest.mark.parametrize("dp_size", [1, 2, 4, 8])
def test_dp_slices_concatenate_to_global_batch(prepared: Path, dp_size: int) -> None:
    reference = PackedTokenDataset(prepared, "train", SEQ_LEN, seed=1).global_batch(3, 16)
    rank_views = [dp_slice(PackedTokenDataset(prepared, "train", SEQ_LEN, seed=1).global_batch(3, 16), r, dp_size)
                  for r in range(dp_size)]
    assert all(v.shape[0] == 16 // dp_size for v in rank_views)
    assert torch.equal(torch.cat(rank_views), reference)


def test_batch_tokens_are_the_prepared_tokens(prepared: Path) -> None:
    ds = PackedTokenDataset(prepared, "train", SEQ_LEN, seed=3)
    stream = _stream(prepared, "train")
    assert ds.total_tokens == len(stream) and ds.num_sequences == (len(stream) - 1) // SEQ_LEN
    batch = ds.global_batch(2, 8)
    perm = np.random.default_rng([3, 0]).permutation(ds.num_sequences)
    for row, g in zip(batch.numpy(), range(16, 24)):
        start = int(perm[g]) * SEQ_LEN
        inputs, labels = row[:-1], row[1:]
        assert np.array_equal(inputs, stream[start:start + SEQ_LEN])
        assert np.array_equal(labels, stream[start + 1:start + SEQ_LEN + 1])


def test_windows_cross_shard_boundaries(prepared: Path) -> None:
    ds = PackedTokenDataset(prepared, "train", SEQ_LEN, seed=0)
    stream = _stream(prepared, "train")
    boundary = read_manifest(prepared)["splits"]["train"]["shards"][0]["tokens"]
    index = boundary // SEQ_LEN
    assert index * SEQ_LEN < boundary < index * SEQ_LEN + SEQ_LEN + 1
    assert np.array_equal(ds.window(index), stream[index * SEQ_LEN:index * SEQ_LEN + SEQ_LEN + 1])


def test_epoch_covers_each_window_once(prepared: Path) -> None:
    ds = PackedTokenDataset(prepared, "validation", SEQ_LEN, seed=5)
    n = ds.num_sequences
    stream = _stream(prepared, "validation")
    windows = np.stack([stream[i * SEQ_LEN:i * SEQ_LEN + SEQ_LEN + 1] for i in range(n)])
    epoch0 = ds.sequences(0, n).numpy()
    perm = ds.permutation(0)
    assert sorted(perm.tolist()) == list(range(n))
    assert np.array_equal(epoch0, windows[perm])
    across = ds.sequences(n - 2, 4).numpy()  # last two of epoch 0, first two of epoch 1
    assert np.array_equal(across[:2], windows[perm[-2:]])
    assert np.array_equal(across[2:], windows[ds.permutation(1)[:2]])
    assert not np.array_equal(ds.permutation(1), perm)


def test_state_dict_round_trip(prepared: Path) -> None:
    ds = PackedTokenDataset(prepared, "train", SEQ_LEN, seed=11)
    for step in range(3):
        ds.global_batch(step, 8)
    state = ds.state_dict()
    assert state["consumed_sequences"] == 24
    resumed = PackedTokenDataset(prepared, "train", SEQ_LEN, seed=11)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert torch.equal(resumed.next_global_batch(8), ds.global_batch(3, 8))
    assert resumed.state_dict() == ds.state_dict()
    for key, value in [("seed", 12), ("seq_len", 32), ("split", "validation")]:
        with pytest.raises(DataError, match=f"{key}={value!r}"):
            resumed.load_state_dict({**state, key: value})


def test_dataset_rejects_bad_inputs(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'nope'"):
        PackedTokenDataset(prepared, "nope", SEQ_LEN, 0)
    tokens = read_manifest(prepared)["splits"]["validation"]["tokens"]
    with pytest.raises(DataError, match=f"{tokens} tokens"):
        PackedTokenDataset(prepared, "validation", tokens, 0)
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
        PackedTokenDataset(small_vocab, "train", SEQ_LEN, 0)
