"""TokenStream: exact coverage over DP ranks × loader workers, layout independence, windows, position ids.

Also home of ``write_token_folder``, which the other ``test_stream_*`` files import: it writes a prepared
folder (Arrow shards of several record batches + manifest) directly through pyarrow, so the reader is
tested on the multi-batch layout and on shards whose manifest entry lacks ``batch_tokens``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.manifest import FORMAT_NAME, FORMAT_VERSION
from triarch.data_pipeline.stream import TokenStream

EOS = 0
VOCAB = 1000
SEQ_LEN = 16
GLOBAL_BATCH = 8
SHUFFLE_BLOCK = 64
SCHEMA = pa.schema([pa.field("tokens", pa.list_(pa.uint32()), nullable=False)])

# shard -> record batches -> documents per batch
SHARD_LAYOUT = [[40, 37, 41], [120], [33, 35, 30], [60, 59], [23]]


def random_documents(rng: np.random.Generator, count: int, low: int = 1, high: int = VOCAB,
                     max_len: int = 40) -> list[np.ndarray]:
    """``count`` documents of random tokens in [low, high), each ending with EOS."""
    return [np.append(rng.integers(low, high, rng.integers(1, max_len)), EOS).astype(np.uint32)
            for _ in range(count)]


def write_shard(path: Path, batches: list[list[np.ndarray]]) -> list[int]:
    """An Arrow IPC file with one record batch per list of documents; returns tokens per batch."""
    counts = []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        for docs in batches:
            lengths = np.array([len(d) for d in docs], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            values = np.concatenate(docs) if docs else np.empty(0, np.uint32)
            array = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.uint32()))
            writer.write_batch(pa.record_batch([array], schema=SCHEMA))
            counts.append(int(lengths.sum()))
    return counts


def shard_entry(root: Path, path: Path, batch_tokens: list[int], documents: int, max_token_id: int,
                format_version: int = FORMAT_VERSION) -> dict:
    """The manifest entry of a shard file already written at ``path``."""
    entry = {"file": path.relative_to(root).as_posix(), "documents": documents, "tokens": sum(batch_tokens),
             "max_token_id": max_token_id, "bytes": path.stat().st_size,
             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if format_version >= 2:
        entry["batch_tokens"] = batch_tokens
    return entry


def write_manifest_for(root: Path, entries_by_split: dict[str, list[dict]], *, vocab_size: int = VOCAB,
                       format_version: int = FORMAT_VERSION) -> Path:
    """A manifest of ``format_version`` (plus a stand-in tokenizer file) over already-written shards."""
    tokenizer = root / "tokenizer.json"
    tokenizer.write_text('{"synthetic": true}\n')
    splits = {split: {"documents": sum(e["documents"] for e in entries), "tokens": sum(e["tokens"] for e in entries),
                      "source_sha256": "synthetic", "shards": entries}
              for split, entries in entries_by_split.items()}
    totals = {k: sum(s[k] for s in splits.values()) for k in ("documents", "tokens")}
    entries = [e for s in splits.values() for e in s["shards"]]
    manifest = {"format": FORMAT_NAME, "format_version": format_version, "dtype": "uint32",
                "shard_tokens": max(e["tokens"] for e in entries),
                "tokenizer": {"file": tokenizer.name, "sha256": hashlib.sha256(tokenizer.read_bytes()).hexdigest(),
                              "vocab_size": vocab_size, "eos_id": EOS},
                "source": {"name": "synthetic"}, "splits": splits, "totals": totals}
    if format_version >= 2:
        manifest.update({"record_batch_tokens": max(max(e["batch_tokens"]) for e in entries),
                         "sources": [], "split": {"method": "given", "validation_fraction": None},
                         "bad_documents": {}, "totals": {**totals, "bad_documents": 0}})
        manifest["tokenizer"]["model"] = "synthetic"
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def write_token_folder(root: Path, shards_by_split: dict[str, list[list[list[np.ndarray]]]], *,
                       vocab_size: int = VOCAB, format_version: int = FORMAT_VERSION) -> Path:
    """A prepared folder: shards (lists of record batches, each a list of documents) and a manifest of
    ``format_version`` (the current one lists ``batch_tokens``; version 1 does not, so the reader counts
    tokens per record batch from the files)."""
    entries_by_split = {}
    for split, shards in shards_by_split.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        entries = []
        for i, batches in enumerate(shards):
            path = root / split / f"shard_{i:05d}.arrow"
            counts = write_shard(path, batches)
            docs = [d for batch in batches for d in batch]
            entries.append(shard_entry(root, path, counts, len(docs), int(max(d.max() for d in docs)),
                                       format_version))
        entries_by_split[split] = entries
    return write_manifest_for(root, entries_by_split, vocab_size=vocab_size, format_version=format_version)


def synthetic_shards(seed: int, layout: list[list[int]], low: int = 1, high: int = VOCAB) -> list:
    rng = np.random.default_rng(seed)
    return [[random_documents(rng, n, low, high) for n in batches] for batches in layout]


def shard_tokens(root: Path, split: str) -> list[np.ndarray]:
    """Each shard's tokens read independently of the reader (plain pyarrow, whole file)."""
    manifest = json.loads((root / "manifest.json").read_text())
    out = []
    for entry in manifest["splits"][split]["shards"]:
        docs = pa.ipc.open_file(str(root / entry["file"])).read_all().column("tokens").to_pylist()
        out.append(np.array([t for doc in docs for t in doc], dtype=np.int64))
    return out


def epoch_windows(root: Path, split: str, order: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """All windows of the epoch stream that reads shards in ``order``, and that stream's unused tail."""
    shards = shard_tokens(root, split)
    stream = np.concatenate([shards[i] for i in order])
    count = (len(stream) - 1) // seq_len
    windows = np.stack([stream[w * seq_len:w * seq_len + seq_len + 1] for w in range(count)])
    return windows, stream[count * seq_len:]


def full_rows(batch: dict[str, torch.Tensor]) -> np.ndarray:
    """The (rows, T + 1) windows behind a batch: inputs plus the last label."""
    return torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy()


def global_rows(folder: Path, dp_size: int, workers: int, steps: int, **kwargs) -> np.ndarray:
    """Steps [0, steps) of the global stream assembled from every DP rank's iterator, in global order."""
    per_rank = []
    for rank in range(dp_size):
        stream = TokenStream(folder, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=3, dp_rank=rank,
                             dp_size=dp_size, num_workers=workers, shuffle_block=SHUFFLE_BLOCK, **kwargs)
        per_rank.append([full_rows(b) for b in stream.batches(steps)])
        assert stream.consumed_sequences == steps * GLOBAL_BATCH
    return np.concatenate([np.concatenate([per_rank[r][s] for r in range(dp_size)]) for s in range(steps)])


def sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_folder(tmp_path_factory.mktemp("synthetic"), {"train": synthetic_shards(0, SHARD_LAYOUT)})


@pytest.fixture(scope="module")
def reference(folder: Path) -> np.ndarray:
    """Two epochs and a bit of the global stream, read by one rank without workers."""
    windows = TokenStream(folder, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH).windows_per_epoch[0]
    return global_rows(folder, 1, 0, 2 * windows // GLOBAL_BATCH + 2)


def test_fixture_exercises_the_edges(folder: Path) -> None:
    stream = TokenStream(folder, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=3)
    windows = stream.windows_per_epoch[0]
    assert windows % GLOBAL_BATCH, "an epoch should end inside a step"
    assert (stream.sources[0].total_tokens - 1) % SEQ_LEN, "an epoch should leave a tail"
    assert [len(stream.sources[0].batch_starts(i)) - 1 for i in range(len(SHARD_LAYOUT))] == \
        [len(b) for b in SHARD_LAYOUT]
    assert not np.array_equal(stream.shard_order(0), stream.shard_order(1))


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_one_epoch_covers_the_prepared_tokens_exactly(folder: Path, reference: np.ndarray, dp_size: int,
                                                     workers: int) -> None:
    """Over epoch 0 (its W windows, read across all ranks), the delivered windows are exactly the windows
    of the epoch stream (each once), so the input tokens plus the epoch's tail are exactly the prepared
    tokens. The global stream is also the same, row for row, as one rank without workers reads it."""
    probe = TokenStream(folder, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=3)
    windows = probe.windows_per_epoch[0]
    steps = -(-windows // GLOBAL_BATCH)
    rows = global_rows(folder, dp_size, workers, steps)
    assert np.array_equal(rows, reference[:len(rows)])
    epoch0 = rows[:windows]
    expected, tail = epoch_windows(folder, "train", probe.shard_order(0), SEQ_LEN)
    assert np.array_equal(sorted_rows(epoch0), sorted_rows(expected))
    prepared = Counter(np.concatenate(shard_tokens(folder, "train")).tolist())
    assert Counter(epoch0[:, :-1].ravel().tolist()) + Counter(tail.tolist()) == prepared
    assert not np.array_equal(epoch0, expected), "the epoch should be shuffled"


def test_epochs_wrap_with_a_new_order(folder: Path, reference: np.ndarray) -> None:
    stream = TokenStream(folder, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=3,
                         shuffle_block=SHUFFLE_BLOCK)
    windows = stream.windows_per_epoch[0]
    epoch1 = reference[windows:2 * windows]
    expected, _ = epoch_windows(folder, "train", stream.shard_order(1), SEQ_LEN)
    assert np.array_equal(sorted_rows(epoch1), sorted_rows(expected))
    assert stream.origin(windows - 1)[1] == 0 and stream.origin(windows)[1] == 1


def test_bounded_shuffle_keeps_blocks(folder: Path) -> None:
    stream = TokenStream(folder, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=5, shuffle_block=32)
    windows = [stream.origin(g)[2] for g in range(stream.windows_per_epoch[0])]
    assert sorted(windows) == list(range(len(windows)))
    for start in range(0, len(windows), 32):
        assert sorted(windows[start:start + 32]) == list(range(start, min(start + 32, len(windows))))
    unshuffled = TokenStream(folder, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, shuffle=False)
    assert [unshuffled.origin(g)[2] for g in range(50)] == list(range(50))
    assert list(unshuffled.shard_order(3)) == list(range(len(SHARD_LAYOUT)))


@pytest.mark.parametrize("seq_len, shuffle_block", [(1000, 4), (7, 1)])
def test_windows_longer_than_record_batches_and_tiny_blocks(folder: Path, seq_len: int, shuffle_block: int) -> None:
    stream = TokenStream(folder, "train", seq_len, global_batch_size=2, seed=1, shuffle_block=shuffle_block)
    windows = stream.windows_per_epoch[0]
    expected, _ = epoch_windows(folder, "train", stream.shard_order(0), seq_len)
    rows = stream.sequences(0, windows)
    assert np.array_equal(rows, expected[[stream.origin(g)[2] for g in range(windows)]])


def test_batches_are_a_function_of_the_seed(folder: Path) -> None:
    def step(seed: int) -> torch.Tensor:
        return TokenStream(folder, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=seed).batch_for_step(4)[
            "input_ids"]

    assert torch.equal(step(1), step(1)) and not torch.equal(step(1), step(2))
    batch = TokenStream(folder, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH).batch_for_step(0)
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (GLOBAL_BATCH, SEQ_LEN)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])


def test_pickled_stream_reads_the_same(folder: Path) -> None:
    """What a spawned (not forked) loader worker receives: no open files or filled spans, same batches."""
    stream = TokenStream(folder, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=4, position_ids=True)
    expected = stream.batch_for_step(3)
    copy = pickle.loads(pickle.dumps(stream))
    assert not copy._spans and all(torch.equal(v, copy.batch_for_step(3)[k]) for k, v in expected.items())


def test_random_access_on_one_stream_reads_the_right_windows(folder: Path) -> None:
    """Steps read out of order on one stream (back and forth across blocks and epochs, so the block read
    last is left and re-entered) are the windows ``origin`` names, cut from the epoch streams directly."""
    stream = TokenStream(folder, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=3,
                         shuffle_block=SHUFFLE_BLOCK)
    epochs = [epoch_windows(folder, "train", stream.shard_order(e), SEQ_LEN)[0] for e in range(3)]

    def expected(start: int, count: int) -> np.ndarray:
        return np.stack([epochs[e][w] for _, e, w in (stream.origin(g) for g in range(start, start + count))])

    steps = 2 * stream.windows_per_epoch[0] // GLOBAL_BATCH
    for step in [0, steps - 1, 1, steps // 2, 2, steps // 2 + 1, steps // 2, 0, steps - 2, 3]:
        rows = full_rows(stream.batch_for_step(step))
        assert np.array_equal(rows, expected(step * GLOBAL_BATCH, GLOBAL_BATCH)), step
    # a range over several blocks, then ranges inside its last block and inside its first
    assert np.array_equal(stream.sequences(5, 3 * SHUFFLE_BLOCK), expected(5, 3 * SHUFFLE_BLOCK))
    assert np.array_equal(stream.sequences(5 + 2 * SHUFFLE_BLOCK, 4), expected(5 + 2 * SHUFFLE_BLOCK, 4))
    assert np.array_equal(stream.sequences(6, 4), expected(6, 4))


def test_local_shards_are_memory_mapped_not_cached(folder: Path) -> None:
    """A whole epoch from local shards leaves no cached record batches and at most two mapped shards."""
    from triarch.data_pipeline.stream.source import MAX_MAPPED_SHARDS

    stream = TokenStream(folder, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=3,
                         shuffle_block=SHUFFLE_BLOCK)
    for _ in stream.batches(stream.windows_per_epoch[0] // GLOBAL_BATCH):
        pass
    info = stream.sources[0].cache_info()
    assert info["batches"] == info["bytes"] == 0 and 1 <= info["open_shards"] <= MAX_MAPPED_SHARDS, info
    assert all(isinstance(handle, pa.MemoryMappedFile) for handle, _ in stream.sources[0]._files.values())


def test_position_ids_restart_after_each_eos(folder: Path) -> None:
    stream = TokenStream(folder, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, position_ids=True)
    for step in range(5):
        batch = stream.batch_for_step(step)
        for tokens, positions in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist()):
            expected, position = [], 0
            for i, token in enumerate(tokens):
                expected.append(position)
                position = 0 if token == EOS else position + 1
            assert positions == expected
    assert (stream.batch_for_step(0)["position_ids"] == 0).sum() > GLOBAL_BATCH  # some rows hold several docs


def test_reads_format_1_folders_counting_batches_from_the_files(tmp_path: Path) -> None:
    """A folder prepared before ``batch_tokens`` existed (and with an empty record batch) reads the same."""
    layout = [[30, 0, 25], [50], [12, 20, 18, 9]]
    old = write_token_folder(tmp_path / "v1", {"train": synthetic_shards(4, layout)}, format_version=1)
    new = write_token_folder(tmp_path / "v2", {"train": synthetic_shards(4, [[n for n in b if n] for b in layout])})
    streams = [TokenStream(f, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=2, shuffle_block=8)
               for f in (old, new)]
    assert streams[0].sources[0].data_sha256 != streams[1].sources[0].data_sha256  # other files
    windows = streams[0].windows_per_epoch[0]
    assert streams[1].windows_per_epoch[0] == windows
    assert np.array_equal(streams[0].sequences(0, 2 * windows), streams[1].sequences(0, 2 * windows))
    assert [len(streams[0].sources[0].batch_starts(i)) - 1 for i in range(3)] == [3, 1, 4]


def test_reads_prepare_corpus_output(tmp_path: Path) -> None:
    """The reader over what prepare writes: windows equal the epoch stream read with plain pyarrow."""
    from triarch.data_pipeline import prepare_corpus, split_train_validation, train_byte_level_bpe
    from triarch.data_pipeline.prepare.pydocs import docstrings_under, stdlib_root

    splits = split_train_validation(docstrings_under(stdlib_root() / "email"))
    train_byte_level_bpe(splits["train"], 300, tmp_path / "tok.json")
    out = prepare_corpus(splits, tmp_path / "tok.json", tmp_path / "prepared", shard_tokens=4000,
                         batch_tokens=1000, workers=0, progress=False)
    stream = TokenStream(out, "train", 32, global_batch_size=4, seed=9, shuffle_block=16)
    assert max(len(stream.sources[0].batch_starts(i)) for i in range(len(stream.shard_order(0)))) > 2
    expected, _ = epoch_windows(out, "train", stream.shard_order(0), 32)
    windows = stream.windows_per_epoch[0]
    assert len(expected) == windows and len(stream.shard_order(0)) > 3
    rows = stream.sequences(0, windows)
    assert np.array_equal(rows, expected[[stream.origin(g)[2] for g in range(windows)]])


def test_rejects_bad_arguments(folder: Path) -> None:
    def build(**kwargs) -> TokenStream:
        return TokenStream(folder, kwargs.pop("split", "train"), kwargs.pop("seq_len", SEQ_LEN),
                           **{"global_batch_size": GLOBAL_BATCH, **kwargs})

    with pytest.raises(DataError, match="dp_size \\(3\\)"):
        build(dp_size=3)
    with pytest.raises(DataError, match="dp_rank \\(2\\)"):
        build(dp_size=2, dp_rank=2)
    with pytest.raises(DataError, match="'nope'"):
        build(split="nope")
    with pytest.raises(DataError, match="fewer than seq_len"):
        build(seq_len=10**6)
    with pytest.raises(DataError, match="no manifest"):
        TokenStream(folder / "train", "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH)
