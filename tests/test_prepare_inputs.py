"""`prepare_files` on every input format, bad documents counted per reason, unreadable files, batch layout."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tokenizers import Tokenizer, models, pre_tokenizers

from triarch.data_pipeline import DataError, read_manifest, split_train_validation, verify_files
from triarch.data_pipeline.prepare import prepare_files
from triarch.data_pipeline.prepare.readers import BAD_REASONS
from triarch.data_pipeline.prepare.shards import map_shard, map_shard_batches

WORDS = [f"w{i}" for i in range(50)]
DOCS = [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(3 + i % 23)) for i in range(120)]
SHARD_TOKENS = 300
BATCH_TOKENS = 64
FRACTION = 0.2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer over WORDS with EOS id 0: fast, and token ids are easy to predict."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def _prepare(inputs: list[str], out: Path, tokenizer: Path, **options) -> dict:
    options = {"shard_tokens": SHARD_TOKENS, "batch_tokens": BATCH_TOKENS, "workers": 0, "progress": False,
               "validation_fraction": FRACTION, **options}
    prepare_files(inputs, out, tokenizer=tokenizer, **options)
    return read_manifest(out)


def _shard_documents(out: Path) -> dict[str, list[list[int]]]:
    """Every split's documents as token lists, read with plain pyarrow."""
    manifest = read_manifest(out)
    return {name: [doc for shard in split["shards"]
                   for doc in pa.ipc.open_file(str(out / shard["file"])).read_all().column("tokens").to_pylist()]
            for name, split in manifest["splits"].items()}


def _expected_documents(tokenizer: Path, docs: list[str]) -> dict[str, list[list[int]]]:
    tok = Tokenizer.from_file(str(tokenizer))
    return {name: [tok.encode(d, add_special_tokens=False).ids + [0] for d in texts]
            for name, texts in split_train_validation(docs, FRACTION).items()}


def _shard_hashes(manifest: dict) -> dict[str, list[str]]:
    return {name: [s["sha256"] for s in split["shards"]] for name, split in manifest["splits"].items()}


def _jsonl_bytes(docs: list[str]) -> bytes:
    return "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)).encode()


# --- every input format gives the same shards --------------------------------------------------------------


def _txt_dir(root: Path) -> list[str]:
    (root / "txt").mkdir()
    for i, doc in enumerate(DOCS):
        (root / "txt" / f"doc{i:03d}.txt").write_text(doc)
    (root / "txt" / "README.md").write_text("not an input")  # unsupported names inside a folder are skipped
    return [str(root / "txt")]


def _jsonl(root: Path) -> list[str]:
    (root / "c.jsonl").write_bytes(_jsonl_bytes(DOCS))
    return [str(root / "c.jsonl")]


def _jsonl_gz(root: Path) -> list[str]:  # two gzip members
    half = len(DOCS) // 2
    members = gzip.compress(_jsonl_bytes(DOCS[:half])) + gzip.compress(_jsonl_bytes(DOCS[half:]))
    (root / "c.jsonl.gz").write_bytes(members)
    return [str(root / "c.jsonl.gz")]


def _jsonl_zst(root: Path) -> list[str]:  # two zstd frames
    half = len(DOCS) // 2
    compress = zstandard.ZstdCompressor().compress
    (root / "c.jsonl.zst").write_bytes(compress(_jsonl_bytes(DOCS[:half])) + compress(_jsonl_bytes(DOCS[half:])))
    return [str(root / "c.jsonl.zst")]


def _parquet(root: Path) -> list[str]:
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), root / "c.parquet", row_group_size=25)
    return [str(root / "c.parquet")]


def _arrow_file(root: Path) -> list[str]:  # Arrow IPC file format, several record batches
    table = pa.table({"text": DOCS})
    with pa.ipc.new_file(str(root / "c.arrow"), table.schema) as writer:
        writer.write_table(table, max_chunksize=33)
    return [str(root / "c.arrow")]


def _hf_dataset(root: Path) -> list[str]:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))}).save_to_disk(str(root / "hf"), num_shards=3)
    return [str(root / "hf")]


def _hf_dataset_dict(root: Path) -> list[str]:
    datasets = pytest.importorskip("datasets")
    parts = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:80]}),
                                  "test": datasets.Dataset.from_dict({"text": DOCS[80:]})})
    parts.save_to_disk(str(root / "hfdict"))
    return [str(root / "hfdict")]


def _glob(root: Path) -> list[str]:
    (root / "parts").mkdir()
    for k, start in enumerate(range(0, len(DOCS), 50)):
        (root / "parts" / f"part-{k}.jsonl").write_bytes(_jsonl_bytes(DOCS[start:start + 50]))
    (root / "parts" / "other.jsonl").write_bytes(_jsonl_bytes(["w1 w2 not matched"]))
    return [str(root / "parts" / "part-*.jsonl")]


def _file_url(root: Path) -> list[str]:
    (root / "c.jsonl").write_bytes(_jsonl_bytes(DOCS))
    return [f"file://{root / 'c.jsonl'}"]


def _memory_fs(root: Path) -> list[str]:  # a non-local fsspec filesystem, listed and read like s3://
    fs = fsspec.filesystem("memory")
    base = f"/triarch-test-{os.getpid()}-{root.name}"
    fs.pipe(f"{base}/a.jsonl", _jsonl_bytes(DOCS[:70]))
    fs.pipe(f"{base}/b.jsonl.gz", gzip.compress(_jsonl_bytes(DOCS[70:])))
    return [f"memory://{base}"]


FORMATS: dict[str, Callable[[Path], list[str]]] = {
    "txt": _txt_dir, "jsonl": _jsonl, "jsonl.gz": _jsonl_gz, "jsonl.zst": _jsonl_zst, "parquet": _parquet,
    "arrow": _arrow_file, "hf_save_to_disk": _hf_dataset, "hf_dataset_dict": _hf_dataset_dict, "glob": _glob,
    "file_url": _file_url, "memory_fs": _memory_fs,
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tokenizer: Path) -> dict:
    root = tmp_path_factory.mktemp("reference")
    return _prepare(_jsonl(root), root / "out", tokenizer)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_gives_the_same_shards(fmt: str, tmp_path: Path, tokenizer: Path, reference: dict) -> None:
    inputs = FORMATS[fmt](tmp_path)
    out = tmp_path / "out"
    manifest = _prepare(inputs, out, tokenizer)
    assert _shard_documents(out) == _expected_documents(tokenizer, DOCS)
    assert _shard_hashes(manifest) == _shard_hashes(reference)
    assert manifest["totals"] == {"documents": len(DOCS), "tokens": reference["totals"]["tokens"], "bad_documents": 0}
    assert sum(s["documents"] for s in manifest["sources"]) == len(DOCS)
    for source in manifest["sources"]:
        with fsspec.open(source["path"] if "://" in source["path"] else f"file://{source['path']}", "rb") as f:
            data = f.read()
        assert source["bytes"] == len(data) and source["sha256"] == hashlib.sha256(data).hexdigest()
    verify_files(out)


def test_worker_count_does_not_change_shards(tmp_path: Path, tokenizer: Path, reference: dict) -> None:
    inputs = _jsonl(tmp_path)
    for workers in (1, 2):
        manifest = _prepare(inputs, tmp_path / f"out{workers}", tokenizer, workers=workers)
        assert _shard_hashes(manifest) == _shard_hashes(reference)


def test_manifest_layout(reference: dict) -> None:
    assert reference["format_version"] == 2
    assert set(reference) == {"format", "format_version", "dtype", "shard_tokens", "record_batch_tokens", "tokenizer",
                              "source", "sources", "split", "splits", "bad_documents", "totals"}
    assert set(reference["tokenizer"]) == {"file", "sha256", "vocab_size", "eos_id", "model"}
    assert reference["tokenizer"]["model"] == "WordLevel" and reference["tokenizer"]["eos_id"] == 0
    assert reference["split"] == {"method": "content_sha256", "validation_fraction": FRACTION}
    assert set(reference["sources"][0]) == {"path", "format", "bytes", "sha256", "documents", "bad_documents"}
    assert set(reference["bad_documents"]) == set(BAD_REASONS)
    shard = reference["splits"]["train"]["shards"][0]
    assert set(shard) == {"file", "documents", "tokens", "max_token_id", "bytes", "sha256", "batch_tokens"}


# --- record batches --------------------------------------------------------------------------------------


def test_batch_tokens_match_the_files(tmp_path: Path, tokenizer: Path) -> None:
    out = tmp_path / "out"
    manifest = _prepare(_jsonl(tmp_path), out, tokenizer)
    assert manifest["record_batch_tokens"] == BATCH_TOKENS
    for split in manifest["splits"].values():
        shards = split["shards"]
        assert all(s["tokens"] >= SHARD_TOKENS for s in shards[:-1])
        for shard in shards:
            file = out / shard["file"]
            reader = pa.ipc.open_file(str(file))
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            lengths = [[len(doc) for doc in b.column(0).to_pylist()] for b in batches]
            assert [sum(docs) for docs in lengths] == shard["batch_tokens"]
            assert len(shard["batch_tokens"]) > 1 or shard["tokens"] < 2 * BATCH_TOKENS
            for docs in lengths[:-1]:  # a batch closes at the first document end at or past the budget
                assert sum(docs) >= BATCH_TOKENS > sum(docs[:-1])
            views = map_shard_batches(file)
            assert [len(v.values) for v in views] == shard["batch_tokens"]
            whole = map_shard(file)
            assert np.array_equal(whole.values, np.concatenate([v.values for v in views]))
            assert whole.documents == shard["documents"] and whole.offsets[-1] == shard["tokens"]


# --- bad documents ---------------------------------------------------------------------------------------


def _bad_inputs(root: Path) -> tuple[list[str], dict[str, int], int]:
    """Files holding every kind of bad document; returns (inputs, expected counts, good documents known)."""
    lines = [b'{"text": "w1 w2 good"}', b'{"text": "caf\xe9 latin-1"}', b'{"text": "   "}', b'{"text": ""}',
             b'{"title": "no text"}', b'{"text": null}', b"[1, 2]", b'{"text": 5}', b'{"text": ["w1"]}',
             b"{not json", b'{"text": "\\ud800 lone surrogate"}', b"", b'{"text": "w3 good again"}']
    (root / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rng = np.random.default_rng(0)  # varied text, so the compressed files span several blocks
    many = _jsonl_bytes([" ".join(rng.choice(WORDS, 30)) for _ in range(4000)])
    gz, zst = gzip.compress(many), zstandard.ZstdCompressor().compress(many)
    (root / "cut.jsonl.gz").write_bytes(gz[:len(gz) * 4 // 5])
    (root / "cut.jsonl.zst").write_bytes(zst[:len(zst) * 4 // 5])
    # a good member followed by bytes that are not gzip: the error is detected at once (damage inside a
    # deflate stream may first decode to junk lines, counted as whatever they look like)
    (root / "corrupt.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(DOCS)) + b"\x1f\x8b\x08garbage" * 9)
    (root / "blank.txt").write_text(" \n\t ")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    pq.write_table(pa.table({"text": ["w1 w2", None, "w3", None]}), root / "nulls.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), root / "ints.parquet")
    pq.write_table(pa.table({"body": ["a", "b", "c", "d"]}), root / "nocolumn.parquet")
    expected = {"invalid_utf8": 3, "empty_text": 3, "missing_field": 3 + 2 + 4, "non_string_field": 2 + 3,
                "invalid_json": 1, "truncated_compression": 2, "corrupt_compression": 1}
    return [str(root)], expected, 2 + 2


def test_every_bad_document_reason_is_counted(tmp_path: Path, tokenizer: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "in").mkdir()
    inputs, expected, known_good = _bad_inputs(tmp_path / "in")
    with caplog.at_level("WARNING"):
        manifest = _prepare(inputs, tmp_path / "out", tokenizer, shard_tokens=20_000)
    assert manifest["bad_documents"] == expected
    assert manifest["totals"]["bad_documents"] == sum(expected.values())
    per_file = {Path(s["path"]).name: s for s in manifest["sources"]}
    assert per_file["bad.jsonl"]["documents"] == 2 and per_file["bad.jsonl"]["bad_documents"] == 10
    assert per_file["nulls.parquet"]["documents"] == 2 and per_file["ints.parquet"]["bad_documents"] == 3
    for name in ("cut.jsonl.gz", "cut.jsonl.zst", "corrupt.jsonl.gz"):  # documents before the damage are kept
        assert per_file[name]["documents"] > 0 and per_file[name]["bad_documents"] >= 1
    assert manifest["totals"]["documents"] == sum(s["documents"] for s in manifest["sources"]) >= known_good
    assert "skipped" in caplog.text and "invalid_json=1" in caplog.text


# --- unreadable inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "content"), [
    ("x.parquet", b"this is not parquet"),
    ("x.arrow", b"this is not arrow either"),
    ("x.jsonl.gz", b'{"text": "plain, not gzip"}\n'),
    ("x.jsonl.zst", b'{"text": "plain, not zstd"}\n'),
])
def test_unreadable_file_is_a_one_line_error(name: str, content: bytes, tmp_path: Path, tokenizer: Path) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=f"cannot read '.*{name}'") as err:
        _prepare([str(tmp_path / name)], tmp_path / "out", tokenizer)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_input_names_are_one_line_errors(tmp_path: Path, tokenizer: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    for inputs, message in [([str(tmp_path / "missing")], "does not exist"),
                            ([str(tmp_path / "*.jsonl")], "matches no files"),
                            ([str(tmp_path / "data.csv")], "not a supported format")]:
        with pytest.raises(DataError, match=message) as err:
            _prepare(inputs, tmp_path / "out", tokenizer)
        assert "\n" not in str(err.value)


def test_no_good_documents_is_an_error(tmp_path: Path, tokenizer: Path) -> None:
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"nope": 1}\n')
    with pytest.raises(DataError, match="no documents.*empty_text=1, missing_field=1"):
        _prepare([str(tmp_path / "empty.jsonl")], tmp_path / "out", tokenizer)
    assert not (tmp_path / "out" / "manifest.json").exists()


# --- idempotence -----------------------------------------------------------------------------------------


def _mtimes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*")) if p.is_file()}


def test_rerun_does_nothing_and_other_options_are_refused(tmp_path: Path, tokenizer: Path) -> None:
    inputs, out = _jsonl(tmp_path), tmp_path / "out"
    manifest = _prepare(inputs, out, tokenizer)
    before = _mtimes(out)
    assert _prepare(inputs, out, tokenizer) == manifest
    assert _mtimes(out) == before and "prepare.journal.jsonl" not in before
    (tmp_path / "src").mkdir()
    nested = _jsonl(tmp_path / "src")  # an output folder inside an input folder is not read as input
    first = _prepare([str(tmp_path / "src")], tmp_path / "src" / "out", tokenizer)
    assert _prepare([str(tmp_path / "src")], tmp_path / "src" / "out", tokenizer) == first
    assert [s["path"] for s in first["sources"]] == nested
    for options, message in [({"text_field": "body"}, "options"), ({"shard_tokens": 999}, "shard_tokens=300"),
                             ({"batch_tokens": 7}, "record_batch_tokens=64")]:
        with pytest.raises(DataError, match=message):
            _prepare(inputs, out, tokenizer, **options)
    (tmp_path / "c.jsonl").write_bytes(_jsonl_bytes(DOCS[:-1]))
    with pytest.raises(DataError, match="other input files"):
        _prepare(inputs, out, tokenizer)
    assert _mtimes(out) == before
