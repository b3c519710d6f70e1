"""A killed or crashed prepare resumes: only missing shards are tokenized, and the manifest matches an
uninterrupted run's exactly."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from triarch.data_pipeline import DataError, read_manifest
from triarch.data_pipeline.prepare import shard_writer, tokenize_pool
from triarch.data_pipeline.prepare import prepare_files
from triarch.data_pipeline.prepare.journal import JOURNAL_NAME

WORDS = [f"w{i}" for i in range(200)]
SHARD_TOKENS = 2_000
BATCH_TOKENS = 500
KILL_AFTER_SHARDS = 5
KILL_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus.jsonl of ~450k tokens, word-level tokenizer.json)."""
    root = tmp_path_factory.mktemp("resume")
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    words = np.asarray(WORDS)[np.random.default_rng(0).integers(0, len(WORDS), 8_000 * 100)].reshape(8_000, 100)
    with open(root / "corpus.jsonl", "w") as f:
        for i, row in enumerate(words):
            f.write(json.dumps({"text": " ".join(row[:10 + i % 90])}) + "\n")
    return root / "corpus.jsonl", root / "tokenizer.json"


def _prepare(setup: tuple[Path, Path], out: Path, **options) -> dict:
    corpus, tokenizer = setup
    options = {"shard_tokens": SHARD_TOKENS, "batch_tokens": BATCH_TOKENS, "workers": 0, "progress": False, **options}
    prepare_files([str(corpus)], out, tokenizer=tokenizer, **options)
    return read_manifest(out)


@pytest.fixture(scope="module")
def reference(setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _prepare(setup, tmp_path_factory.mktemp("reference") / "out", workers=2)


def _shard_hashes(manifest: dict) -> dict[str, list[str]]:
    return {name: [s["sha256"] for s in split["shards"]] for name, split in manifest["splits"].items()}


def _mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*.arrow")}


def _journaled(out: Path) -> set[str]:
    lines = (out / JOURNAL_NAME).read_text().splitlines()[1:]
    return {json.loads(line)["shard"]["file"] for line in lines if line.endswith("}")}


class _CountingEncoder:
    """Wraps ``tokenize_pool.encode_texts`` (the workers=0 path) to count documents tokenized."""

    def __init__(self) -> None:
        self.documents = 0
        self._real = tokenize_pool.encode_texts

    def __call__(self, tokenizer, eos, texts, closes=True):
        self.documents += len(texts)
        return self._real(tokenizer, eos, texts, closes)


def _children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")
def test_killed_prepare_resumes_to_the_same_manifest(setup: tuple[Path, Path], reference: dict, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    corpus, tokenizer = setup
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "triarch.cli", "prepare", str(corpus), "--out", str(out), "--tokenizer",
           str(tokenizer), "--shard-tokens", str(SHARD_TOKENS), "--batch-tokens", str(BATCH_TOKENS),
           "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / JOURNAL_NAME).exists() and len(_journaled(out)) >= KILL_AFTER_SHARDS:
            break
        time.sleep(0.005)
    children = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "manifest.json").exists(), "prepare finished before it could be killed"
    assert not children, "tokenizing should run on threads, leaving no process to outlive a killed prepare"
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(out)

    kept = {f: t for f, t in _mtimes(out).items() if f in _journaled(out)}
    assert len(kept) >= KILL_AFTER_SHARDS
    counter = _CountingEncoder()
    monkeypatch.setattr(tokenize_pool, "encode_texts", counter)
    manifest = _prepare(setup, out)
    assert manifest == reference
    assert 0 < counter.documents < reference["totals"]["documents"]
    assert {f: t for f, t in _mtimes(out).items() if f in kept} == kept  # finished shards were not rewritten
    assert not (out / JOURNAL_NAME).exists()


def test_crashed_prepare_resumes_and_skips_finished_shards(setup: tuple[Path, Path], reference: dict,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real, calls = shard_writer.write_shard, {"n": 0}

    def crash_on_tenth(path: Path, data) -> None:
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(shard_writer, "write_shard", crash_on_tenth)
    with pytest.raises(OSError, match="disk full"):
        _prepare(setup, out)
    monkeypatch.setattr(shard_writer, "write_shard", real)
    assert not (out / "manifest.json").exists() and len(_journaled(out)) == 9
    before = _mtimes(out)
    counter = _CountingEncoder()
    monkeypatch.setattr(tokenize_pool, "encode_texts", counter)
    assert _prepare(setup, out) == reference
    after = _mtimes(out)
    assert all(after[f] == t for f, t in before.items() if f in after)
    resumed = sum(s["documents"] for split in reference["splits"].values()
                  for s in split["shards"] if s["file"] in before)
    assert counter.documents == reference["totals"]["documents"] - resumed


def test_journal_of_other_settings_is_discarded(setup: tuple[Path, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real, calls = shard_writer.write_shard, {"n": 0}

    def crash_on_fifth(path: Path, data) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(shard_writer, "write_shard", crash_on_fifth)
    with pytest.raises(OSError):
        _prepare(setup, out, batch_tokens=BATCH_TOKENS * 2)
    monkeypatch.setattr(shard_writer, "write_shard", real)
    fresh = _prepare(setup, tmp_path / "fresh", shard_tokens=SHARD_TOKENS * 4)
    assert _shard_hashes(_prepare(setup, out, shard_tokens=SHARD_TOKENS * 4)) == _shard_hashes(fresh)


def test_shards_do_not_depend_on_how_documents_arrive() -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 400, 500)
    values = rng.integers(0, 1000, int(lengths.sum())).astype(np.uint32)
    ends = np.cumsum(lengths)

    def cut(pieces: list[int]) -> list[tuple[bytes, bytes]]:
        cutter, shards, start_doc = shard_writer.ShardCutter(SHARD_TOKENS), [], 0
        for stop_doc in [*pieces, len(lengths)]:
            lo, hi = (ends[start_doc - 1] if start_doc else 0), ends[stop_doc - 1]
            shards += list(cutter.add(values[lo:hi], lengths[start_doc:stop_doc]))
            start_doc = stop_doc
        shards.append(cutter.flush())
        return [(s.values.tobytes(), s.offsets.tobytes()) for s in shards if s is not None]

    one_by_one, in_three = cut(list(range(1, len(lengths)))), cut([7, 300])
    assert one_by_one == in_three and len(one_by_one) > 10
    assert b"".join(v for v, _ in one_by_one) == values.tobytes()


def test_journal_survives_a_line_cut_short(tmp_path: Path) -> None:
    from triarch.data_pipeline.prepare.journal import Journal, JournalEntry
    from triarch.data_pipeline.prepare.shards import ShardInfo

    (tmp_path / "train").mkdir()
    infos = []
    for i in range(2):
        (tmp_path / "train" / f"shard_0000{i}.arrow").write_bytes(b"x" * 10)
        infos.append(ShardInfo(f"train/shard_0000{i}.arrow", 3, 30, 9, 10, hashlib.sha256(b"x" * 10).hexdigest(),
                               (30,)))
    journal = Journal(tmp_path, {"k": 1})
    journal.record(JournalEntry("train", 0, 3, infos[0]))
    with open(journal.path, "a") as f:
        f.write('{"split": "train", "index": 1, "end_doc')  # a kill in the middle of a line
    reopened = Journal(tmp_path, {"k": 1})
    assert [e.shard for e in reopened.resumable("train")] == infos[:1]
    reopened.record(JournalEntry("train", 1, 6, infos[1]))
    assert [e.shard for e in Journal(tmp_path, {"k": 1}).resumable("train")] == infos
    (tmp_path / "train" / "shard_00001.arrow").write_bytes(b"y" * 10)  # a damaged file ends the prefix
    assert [e.shard for e in Journal(tmp_path, {"k": 1}).resumable("train")] == infos[:1]
    assert Journal(tmp_path, {"k": 2}).resumable("train") == []  # another header starts afresh
