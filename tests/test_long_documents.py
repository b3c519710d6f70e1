"""Long documents in `triarch prepare` (issue 15 item 3): tokenized in pieces with the ids of the whole
document, spread over shards of the given size, resumable in the middle, and in bounded memory (a real
address-space limit that the former whole-document tokenizing exceeds many times over)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from triarch.data_pipeline import read_manifest
from triarch.data_pipeline.prepare import shard_writer
from triarch.data_pipeline.prepare import prepare_files
from triarch.data_pipeline.prepare.journal import JOURNAL_NAME
from triarch.data_pipeline.prepare.long_documents import DocumentPieces
from triarch.data_pipeline.prepare.pydocs import stdlib_docstrings
from triarch.data_pipeline.prepare.shard_writer import ShardCutter
from triarch.data_pipeline.prepare.tokenizer import EOS_TOKEN, train_byte_level_bpe

PIECE = 4096  # characters per piece in the piece tests: dozens of cuts in a few hundred kB of text
TEXT_CHARS = 300_000
MEMORY_TEST_BYTES = 30_000_000
ADDRESS_SPACE_LIMIT = 2 << 30  # the former code needed ~4 GB resident for this document (and aborted under 2 GiB)
PEAK_RSS_BOUND = 700 << 20


@pytest.fixture(scope="module")
def text() -> str:
    """Real English text: the standard library's docstrings, one after another."""
    return "\n\n".join(stdlib_docstrings(None, workers=1))[:TEXT_CHARS]


@pytest.fixture(scope="module")
def bpe(text: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The byte-level BPE `triarch prepare` trains."""
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_byte_level_bpe([text], 2048, path)
    return path


def _trained(text: str, model: models.Model, trainer: trainers.Trainer, normalizer: normalizers.Normalizer | None,
             pre_tokenizer: pre_tokenizers.PreTokenizer | None) -> Tokenizer:
    tokenizer = Tokenizer(model)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    if pre_tokenizer is not None:
        tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.train_from_iterator([text[i:i + 10_000] for i in range(0, 100_000, 10_000)], trainer=trainer)
    return tokenizer


def _given(kind: str, text: str) -> Tokenizer:
    """tokenizer.json layouts users bring, trained here on the same text (nothing is downloaded)."""
    bpe_trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=[EOS_TOKEN], show_progress=False)
    if kind == "gpt2_prefix_space":  # RoBERTa / GPT-2 style with add_prefix_space
        trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=[EOS_TOKEN], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        return _trained(text, models.BPE(), trainer, None, pre_tokenizers.ByteLevel(add_prefix_space=True))
    if kind == "bert_wordpiece":  # lower-casing normalizer, whitespace + punctuation pre-tokenizer
        trainer = trainers.WordPieceTrainer(vocab_size=1500, special_tokens=["[UNK]", EOS_TOKEN],
                                            show_progress=False)
        return _trained(text, models.WordPiece(unk_token="[UNK]"), trainer, normalizers.BertNormalizer(),
                        pre_tokenizers.BertPreTokenizer())
    if kind == "metaspace_unigram":  # SentencePiece-style, prefix only on the first word
        trainer = trainers.UnigramTrainer(vocab_size=1500, special_tokens=[EOS_TOKEN, "<unk>"], unk_token="<unk>",
                                          show_progress=False)
        return _trained(text, models.Unigram(), trainer, None, pre_tokenizers.Metaspace(prepend_scheme="first"))
    if kind == "llama2_prepend":  # Llama 2's conversion: Prepend + Replace normalizer, no pre-tokenizer
        tokenizer = _trained(text, models.BPE(byte_fallback=True), bpe_trainer,
                             normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]), None)
        tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback()])
        return tokenizer
    raise ValueError(kind)


def _piecewise(tokenizer: Tokenizer, text: str, cutter: DocumentPieces) -> list[int]:
    return [i for piece in cutter.pieces(text) for i in tokenizer.encode(piece, add_special_tokens=False).ids]


@pytest.mark.parametrize("variant", ["text", "no_spaces"])
def test_pieces_give_the_whole_document_ids_with_the_trained_bpe(bpe: Path, text: str, variant: str) -> None:
    """The BPE prepare trains: exact at every cut, also in text without whitespace (cuts at punctuation)."""
    tokenizer = Tokenizer.from_file(str(bpe))
    sample = text if variant == "text" else "".join(text.split())[:100_000]
    checked, unchecked = DocumentPieces(tokenizer, PIECE), DocumentPieces(None, PIECE)
    whole = tokenizer.encode(sample, add_special_tokens=False).ids
    assert _piecewise(tokenizer, sample, checked) == whole
    assert _piecewise(tokenizer, sample, unchecked) == whole  # the cuts need no check for this tokenizer
    assert checked.cuts_made >= len(sample) // PIECE and checked.inexact == 0
    assert max(map(len, checked.pieces(sample))) <= PIECE


@pytest.mark.parametrize("kind", ["gpt2_prefix_space", "bert_wordpiece", "metaspace_unigram"])
def test_pieces_give_the_whole_document_ids_with_given_tokenizers(text: str, kind: str) -> None:
    tokenizer = _given(kind, text)
    cutter = DocumentPieces(tokenizer, PIECE)
    assert _piecewise(tokenizer, text, cutter) == tokenizer.encode(text, add_special_tokens=False).ids
    assert cutter.inexact == 0 and cutter.cuts_made >= len(text) // PIECE


def test_a_tokenizer_that_prefixes_every_input_is_counted_inexact(text: str) -> None:
    """Where equality cannot hold: a Prepend normalizer adds '▁' to each piece, one token more per cut."""
    tokenizer = _given("llama2_prepend", text)
    cutter = DocumentPieces(tokenizer, PIECE)
    pieces = _piecewise(tokenizer, text, cutter)
    whole = tokenizer.encode(text, add_special_tokens=False).ids
    assert cutter.inexact == cutter.cuts_made > 0
    assert pieces != whole and tokenizer.decode(pieces).replace(" ", "") == tokenizer.decode(whole).replace(" ", "")


def test_bpe_trained_on_pieces_is_the_bpe_of_whole_texts(text: str, tmp_path: Path) -> None:
    sample = text[:200_000]
    whole = train_byte_level_bpe([sample], 1024, tmp_path / "whole.json")
    pieces = train_byte_level_bpe(DocumentPieces(None, PIECE).pieces(sample), 1024, tmp_path / "pieces.json")
    assert pieces.to_str() == whole.to_str()


# --- shards ---------------------------------------------------------------------------------------------


def _cut(values: np.ndarray, lengths: np.ndarray, arrivals: list[tuple[int, int]], budget: int) -> list:
    """Shards of documents arriving as token ranges ``(lo, hi)`` of the flat stream (a range may end inside
    a document: then it is a piece)."""
    ends = np.cumsum(lengths)
    cutter, shards = ShardCutter(budget), []
    for lo, hi in arrivals:
        inner = ends[(ends > lo) & (ends <= hi)]
        bounds = np.concatenate([[lo], inner, [hi] if not len(inner) or inner[-1] != hi else []]).astype(np.int64)
        shards += cutter.add(values[lo:hi], np.diff(bounds), closes=hi in set(ends.tolist()))
    shards.append(cutter.flush())
    return [s for s in shards if s is not None]


def test_long_documents_span_shards_whatever_the_arrival() -> None:
    rng = np.random.default_rng(3)
    budget = 1000
    lengths = np.where(rng.random(300) < 0.05, rng.integers(1500, 6000, 300), rng.integers(1, 400, 300))
    values = rng.integers(0, 1000, int(lengths.sum())).astype(np.uint32)
    ends = np.cumsum(lengths)
    whole = [(int(a), int(b)) for a, b in zip(np.concatenate([[0], ends[:-1]]), ends)]
    random_cuts = np.unique(np.concatenate([[0, ends[-1]], rng.integers(1, ends[-1], 400)]))
    pieces = [(int(a), int(b)) for a, b in zip(random_cuts, random_cuts[1:])]
    by_document, by_piece = _cut(values, lengths, whole, budget), _cut(values, lengths, pieces, budget)
    assert [(s.values.tobytes(), s.offsets.tobytes(), s.ends_open) for s in by_document] == \
           [(s.values.tobytes(), s.offsets.tobytes(), s.ends_open) for s in by_piece]
    assert np.array_equal(np.concatenate([s.values for s in by_document]), values)
    assert sum(s.documents for s in by_document) == len(lengths)
    long_ones = set(np.flatnonzero(lengths > budget).tolist())
    for shard in by_document:
        rows = np.diff(shard.offsets)
        assert len(shard.values) <= budget + 400, "at most the budget plus one short document"
        if shard.ends_open or len(shard.values) == budget:
            continue
        assert len(shard.values) < budget + rows[-1]  # closed at the first document end at or past the budget
    assert long_ones and len(by_document) > len(long_ones)


def _shard_rows(out: Path, split: str = "train") -> list[np.ndarray]:
    rows = []
    for entry in read_manifest(out)["splits"][split]["shards"]:
        table = pa.ipc.open_file(pa.memory_map(str(out / entry["file"]))).read_all()
        rows += [np.asarray(row, dtype=np.uint32) for row in table.column("tokens").to_pylist()]
    return rows


def test_long_document_is_prepared_like_the_whole_document(bpe: Path, text: str, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """One 700k-character document (3 pieces) with 20k-token shards: the whole document's ids, spread over
    shards of at most the budget, EOS only at its end; the empty validation split is one warning line."""
    document = (text * 3)[:700_000]
    (tmp_path / "book.txt").write_text(document)
    tokenizer = Tokenizer.from_file(str(bpe))
    expected = np.asarray(tokenizer.encode(document, add_special_tokens=False).ids + [0], dtype=np.uint32)
    with caplog.at_level(logging.WARNING):
        prepare_files([str(tmp_path / "book.txt")], tmp_path / "out", tokenizer=bpe, shard_tokens=20_000,
                      batch_tokens=4_000, workers=2, progress=False, validation_fraction=0.0)
    manifest = read_manifest(tmp_path / "out")
    shards = manifest["splits"]["train"]["shards"]
    rows = _shard_rows(tmp_path / "out")
    assert np.array_equal(np.concatenate(rows), expected)
    assert len(rows) == len(shards) > 2 and all(s["tokens"] <= 20_000 for s in shards)
    assert [s["documents"] for s in shards] == [0] * (len(shards) - 1) + [1]
    assert [int(row[-1] == 0) for row in rows] == [0] * (len(rows) - 1) + [1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"warning: split 'validation' of {tmp_path / 'out'} has no documents (1 in all); "
                        f"training or evaluation that reads it will stop with an error"]


def test_prepare_resumes_inside_a_long_document(bpe: Path, text: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after some shards of a long document: the rerun keeps them, drops the tokens they hold from
    the re-tokenized document, and ends with the manifest of an uninterrupted run."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a_short.txt").write_text(text[:3_000])
    (corpus / "b_long.txt").write_text((text * 2)[:600_000])  # 3 pieces, ~7 shards
    (corpus / "c_medium.txt").write_text(text[5_000:120_000])  # one piece, longer than a shard
    options = {"tokenizer": bpe, "shard_tokens": 20_000, "batch_tokens": 4_000, "workers": 0, "progress": False,
               "validation_fraction": 0.0}
    prepare_files([str(corpus)], tmp_path / "reference", **options)
    reference = read_manifest(tmp_path / "reference")
    real, calls = shard_writer.write_shard, {"n": 0}

    def crash_on_fifth(path: Path, data) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(shard_writer, "write_shard", crash_on_fifth)
    with pytest.raises(OSError, match="disk full"):
        prepare_files([str(corpus)], tmp_path / "out", **options)
    monkeypatch.setattr(shard_writer, "write_shard", real)
    journal = [json.loads(line) for line in (tmp_path / "out" / JOURNAL_NAME).read_text().splitlines()[1:]]
    assert len(journal) == 4 and journal[-1]["carry"] > 0  # stopped in the middle of the long document
    prepare_files([str(corpus)], tmp_path / "out", **options)
    assert read_manifest(tmp_path / "out") == reference


def test_one_huge_document_fits_a_memory_limit(bpe: Path, tmp_path: Path) -> None:
    """`triarch prepare` of a 30 MB single-document .txt under a 2 GiB address-space limit (RLIMIT_AS): it
    finishes and its peak RSS stays under 700 MB. (Tokenizing it whole needed ~4 GB resident and aborted
    under a 2 GiB limit with a Rust backtrace.)"""
    base = "\n\n".join(stdlib_docstrings(None, workers=1))
    document = tmp_path / "huge.txt"
    document.write_text((base * (MEMORY_TEST_BYTES // len(base) + 1))[:MEMORY_TEST_BYTES])
    out = tmp_path / "out"
    # one process between pytest and prepare, so its RUSAGE_CHILDREN is prepare's own peak
    wrapper = (
        "import resource, subprocess, sys\n"
        "def limit(): resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))\n"
        "r = subprocess.run(sys.argv[2:], preexec_fn=limit, capture_output=True, text=True)\n"
        "sys.stderr.write(r.stderr)\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    cmd = [sys.executable, "-c", wrapper, str(ADDRESS_SPACE_LIMIT), sys.executable, "-m", "triarch.cli", "prepare",
           str(document), "--tokenizer", str(bpe), "--out", str(out), "--workers", "2", "--no-progress"]
    # address space, unlike memory in use, grows with malloc arenas and Rust threads: pin both to the test's
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "RAYON_NUM_THREADS": "2"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    code, peak_kib = map(int, result.stdout.split())
    assert code == 0, result.stderr[-3000:]
    assert peak_kib * 1024 < PEAK_RSS_BOUND, f"peak RSS {peak_kib / 1024:.0f} MiB"
    manifest = read_manifest(out)
    assert manifest["totals"]["documents"] == 1
    assert max(s["tokens"] for split in manifest["splits"].values() for s in split["shards"]) <= 1 << 20
    print(f"peak RSS {peak_kib / 1024:.0f} MiB under RLIMIT_AS {ADDRESS_SPACE_LIMIT >> 20} MiB")
