"""Prepare a corpus: tokenize on worker threads, append EOS, write Arrow shards per split, manifest last.

The calling thread reads the documents in order, assigns each to a split, and hands batches of texts to
tokenizer threads (``tokenize_pool``); results come back in submission order, so every split's token
stream, and therefore every shard (see ``shard_writer``), is a deterministic function of the inputs,
whatever the worker count. A document longer than ``long_documents.PIECE_CHARS`` characters is
tokenized in pieces (bounded memory, the same ids) and may span shards (``shard_writer``).

A folder whose manifest exists is complete and never rewritten (a rerun with the same inputs returns at
once; other inputs are a DataError). Writing holds the folder's lock (``folder_lock``): a second prepare
into the same folder while one runs is a one-line DataError. A folder without one is completed: shards recorded in the journal
(``journal``) whose files still hash right are kept and their documents are not tokenized again; other
shard files are kept only if their bytes come out identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.fileio import file_sha256, replace_atomically, temp_path
from triarch.data_pipeline.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    load_manifest_json,
    manifest_path,
    open_folder,
    validate_manifest,
    write_manifest,
)
from triarch.data_pipeline.prepare.documents import DocumentStream, FileDocuments, TextDocuments
from triarch.data_pipeline.prepare.folder_lock import prepare_lock
from triarch.data_pipeline.prepare.journal import Journal
from triarch.data_pipeline.prepare.long_documents import PIECE_CHARS, DocumentPieces
from triarch.data_pipeline.prepare.out_folder import check_apart, check_own_folder, outside
from triarch.data_pipeline.prepare.progress import Counters, Progress
from triarch.data_pipeline.prepare.pydocs import TRAIN, split_train_validation, stdlib_docstrings
from triarch.data_pipeline.prepare.readers import BAD_REASONS, BadDocument, document_bytes
from triarch.data_pipeline.prepare.shard_writer import SplitWriter
from triarch.data_pipeline.prepare.shards import MAX_SHARD_TOKENS
from triarch.data_pipeline.prepare.sources import expand_inputs
from triarch.data_pipeline.prepare.tokenize_pool import TokenizerPool, default_workers
from triarch.data_pipeline.prepare.tokenizer import eos_id, load_tokenizer, train_byte_level_bpe

__all__ = ["prepare_corpus", "prepare_files", "prepare_pydocs"]

log = logging.getLogger(__name__)

TOKENIZER_NAME = "tokenizer.json"
DEFAULT_SHARD_TOKENS = 1 << 20
DEFAULT_BATCH_TOKENS = 1 << 16
TASK_DOCUMENTS = 256  # documents per tokenizer task ...
TASK_BYTES = 1 << 20  # ... or this much text, whichever comes first
PYDOCS_SOURCE_NAME = "python-stdlib-docstrings"
FILES_SOURCE_NAME = "files"
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _fingerprint_update(digest: Any, data: bytes) -> None:
    """Add one document to an ordered-documents fingerprint (length-prefixed, so boundaries count)."""
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def texts_sha256(texts: Sequence[str]) -> str:
    """The fingerprint of the accepted documents among ``texts``: the manifest's ``source_sha256``."""
    digest = hashlib.sha256()
    for text in texts:
        data = document_bytes(text)
        if not isinstance(data, BadDocument):
            _fingerprint_update(digest, data)
    return digest.hexdigest()


def _existing_manifest(out_dir: Path, *, upgrade: bool = False) -> dict[str, Any] | None:
    """The manifest of a completed folder; None if there is none, or if it is of an older format version.

    A folder of an older format is prepared again in place (with ``upgrade``, under the folder's lock, its
    manifest is removed first, so it reads as unfinished until the new one is written); one that is
    unreadable or newer is a DataError.
    """
    path = manifest_path(out_dir)
    try:
        if not path.exists():
            return None
    except OSError as exc:
        raise DataError(f"cannot read output folder {out_dir}: {exc.strerror}") from None
    recorded = load_manifest_json(*open_folder(out_dir), path)  # unreadable or not JSON: raises, naming it
    version = recorded.get("format_version") if isinstance(recorded, dict) else None
    if isinstance(version, int) and recorded.get("format") == FORMAT_NAME and version < FORMAT_VERSION:
        if upgrade:
            log.warning("%s is of format version %d; preparing %s again in version %d", path, version, out_dir,
                        FORMAT_VERSION)
            path.unlink()
        return None
    return validate_manifest(recorded, path)


def _prepared(out_dir: Path, check: Callable[[dict[str, Any]], None], *, upgrade: bool = False) -> bool:
    """Whether ``out_dir`` is already prepared; ``check`` raises if it was prepared from other inputs.

    Called once without the folder's lock (a finished folder may be read-only), then again under it: the
    run that held it may have just finished."""
    manifest = _existing_manifest(out_dir, upgrade=upgrade)
    if manifest is None:
        return False
    check(manifest)
    return True


def _check_budgets(shard_tokens: int, batch_tokens: int) -> None:
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise DataError(f"shard_tokens ({shard_tokens}) must be in [1, {MAX_SHARD_TOKENS}]")
    if not 1 <= batch_tokens <= MAX_SHARD_TOKENS:
        raise DataError(f"batch_tokens ({batch_tokens}) must be in [1, {MAX_SHARD_TOKENS}]")


def _install_tokenizer(tokenizer_path: Path, out_dir: Path) -> Path:
    """Copy the tokenizer into the prepared folder (atomically) so the folder is self-contained."""
    target = out_dir / TOKENIZER_NAME
    if target.exists() and target.resolve() == tokenizer_path.resolve():
        return target
    tmp = temp_path(target)
    shutil.copyfile(tokenizer_path, tmp)
    replace_atomically(tmp, target)
    return target


def _tokenizer_entry(tokenizer: Tokenizer, eos: int, sha256: str) -> dict[str, Any]:
    model = json.loads(tokenizer.to_str()).get("model", {}).get("type") or "unknown"
    return {"file": TOKENIZER_NAME, "sha256": sha256, "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
            "eos_id": eos, "model": model}


Task = tuple[tuple[str, int, bool], list[str], bool]  # ((split, text bytes, closes), texts, closes)


def _piece_tasks(split: str, text: str, size: int, pieces: DocumentPieces) -> Iterator[Task]:
    """One task per piece of a long document (sliced as it is submitted); EOS only after the last."""
    bounds = [0, *pieces.cuts(text), len(text)]
    for lo, hi in zip(bounds, bounds[1:]):
        closes = hi == len(text)
        yield (split, size * (hi - lo) // len(text), closes), [text[lo:hi]], closes


def _task_batches(documents: DocumentStream, writers: Mapping[str, SplitWriter], fingerprints: Mapping[str, Any],
                  seen: dict[str, int], counters: Counters, pieces: DocumentPieces) -> Iterator[Task]:
    """Per-split batches of texts to tokenize; resumed documents are skipped; a document longer than
    ``pieces.piece_chars`` goes in pieces, each a task of its own (``long_documents``).

    Every document still feeds its split's fingerprint and count, so the manifest is the same as for an
    uninterrupted run.
    """
    pending: dict[str, tuple[list[str], int]] = {split: ([], 0) for split in writers}
    for split, text, data in documents:
        _fingerprint_update(fingerprints[split], data)
        seen[split] += 1
        if seen[split] <= writers[split].resumed_documents:
            counters.resumed_documents += 1
            continue
        texts, size = pending[split]
        if len(text) > pieces.piece_chars:
            if texts:
                yield (split, size, True), texts, True
                pending[split] = ([], 0)
            yield from _piece_tasks(split, text, len(data), pieces)
            continue
        texts.append(text)
        size += len(data)
        if len(texts) >= TASK_DOCUMENTS or size >= TASK_BYTES:
            yield (split, size, True), texts, True
            texts, size = [], 0
        pending[split] = (texts, size)
    for split, (texts, size) in pending.items():
        if texts:
            yield (split, size, True), texts, True


def _bad_summary(bad: Mapping[str, int]) -> str:
    return ", ".join(f"{reason}={count}" for reason, count in sorted(bad.items()) if count) or "none"


@dataclass
class _Pass:
    """What one pass over the documents saw, per split (every document, tokenized this run or resumed)."""

    seen: dict[str, int]
    fingerprints: dict[str, Any]
    counters: Counters


def _tokenize(documents: DocumentStream, tokenizer: Tokenizer, eos: int, writers: Mapping[str, SplitWriter],
              workers: int, progress: bool | None) -> _Pass:
    """Feed every document not already in a resumed shard through the tokenizer pool into its split's writer."""
    done = _Pass(seen=dict.fromkeys(writers, 0), fingerprints={split: hashlib.sha256() for split in writers},
                 counters=Counters())
    counters = done.counters
    pieces = DocumentPieces(tokenizer)
    batches = _task_batches(documents, writers, done.fingerprints, done.seen, counters, pieces)
    with TokenizerPool(tokenizer, eos, workers) as pool, \
            Progress(counters, documents.progress_total, documents.progress_unit, progress) as display:
        for (split, size, closes), values, lengths in pool.map_ordered(batches):
            writers[split].add(values, lengths, closes)
            counters.documents += len(lengths) - (not closes)
            counters.tokens += len(values)
            counters.text_bytes += size
            counters.bad_documents = sum(documents.bad.values())
            display.update(documents.progress_done())
    counters.bad_documents = sum(documents.bad.values())
    if pieces.inexact:
        log.warning("warning: %d of %d cuts of long documents into pieces of %d characters may tokenize "
                    "differently from the whole document with this tokenizer (see long_documents)",
                    pieces.inexact, pieces.cuts_made, pieces.piece_chars)
    return done


def _finish_splits(out_dir: Path, writers: Mapping[str, SplitWriter], done: _Pass) -> dict[str, Any]:
    """Write the last shards and return the manifest's ``splits``; a resumed run must add up."""
    splits = {}
    for split, writer in writers.items():
        shards = writer.finish()
        if writer.end_document != done.seen[split]:
            raise DataError(f"{out_dir}: split {split!r} has {done.seen[split]} documents but its shards hold "
                            f"{writer.end_document}; the inputs changed since the interrupted run, "
                            f"delete {out_dir} and prepare again")
        splits[split] = {"documents": sum(s.documents for s in shards), "tokens": sum(s.tokens for s in shards),
                         "source_sha256": done.fingerprints[split].hexdigest(),
                         "shards": [s.to_json() for s in shards]}
    return splits


def _warn_empty_splits(out_dir: Path, splits: Mapping[str, Any]) -> None:
    """One warning line per split that ended with no documents."""
    total = sum(split["documents"] for split in splits.values())
    for name, split in splits.items():
        if not split["documents"]:
            log.warning("warning: split '%s' of %s has no documents (%d in all); training or evaluation that "
                        "reads it will stop with an error", name, out_dir, total)


def _write_corpus(documents: DocumentStream, tokenizer_path: Path, out_dir: Path, *, source: Mapping[str, Any],
                  identity: Mapping[str, Any], shard_tokens: int, batch_tokens: int, workers: int | None,
                  progress: bool | None) -> dict[str, Any]:
    """Tokenize ``documents`` into shards under ``out_dir``, resuming a half-done run; write the manifest."""
    tokenizer = load_tokenizer(tokenizer_path)
    eos = eos_id(tokenizer, tokenizer_path)
    tokenizer_sha = file_sha256(tokenizer_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    _install_tokenizer(tokenizer_path, out_dir)
    journal = Journal(out_dir, {"identity": identity, "tokenizer_sha256": tokenizer_sha,
                                "shard_tokens": shard_tokens, "record_batch_tokens": batch_tokens,
                                "long_documents": {"span_shards": True, "piece_chars": PIECE_CHARS}})
    writers = {split: SplitWriter(out_dir, split, shard_tokens, batch_tokens, journal) for split in documents.splits}
    done = _tokenize(documents, tokenizer, eos, writers, default_workers() if workers is None else workers, progress)
    if not any(done.seen.values()):
        raise DataError(f"no documents to prepare in {out_dir} (bad documents: {_bad_summary(documents.bad)})")
    splits = _finish_splits(out_dir, writers, done)
    _warn_empty_splits(out_dir, splits)
    bad = {reason: documents.bad.get(reason, 0) for reason in BAD_REASONS}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dtype": "uint32",
        "shard_tokens": shard_tokens,
        "record_batch_tokens": batch_tokens,
        "tokenizer": _tokenizer_entry(tokenizer, eos, tokenizer_sha),
        "source": dict(source),
        "sources": documents.sources_json(),
        "split": documents.split_json(),
        "splits": splits,
        "bad_documents": bad,
        "totals": {"documents": sum(s["documents"] for s in splits.values()),
                   "tokens": sum(s["tokens"] for s in splits.values()), "bad_documents": sum(bad.values())},
    }
    write_manifest(out_dir, manifest)
    journal.remove()
    log.info("prepared %s: %d documents, %d tokens, %d shards (%d written); this run: %s", out_dir,
             manifest["totals"]["documents"], manifest["totals"]["tokens"],
             sum(len(s["shards"]) for s in splits.values()), sum(w.written for w in writers.values()),
             done.counters.summary())
    if done.counters.bad_documents:
        log.warning("skipped %d bad documents: %s", done.counters.bad_documents, _bad_summary(documents.bad))
    return manifest


# --- in-memory texts --------------------------------------------------------------------------------------


def _check_same_inputs(manifest: dict[str, Any], out_dir: Path, tokenizer_sha: str | None,
                       fingerprints: Mapping[str, str] | None, shard_tokens: int, batch_tokens: int) -> None:
    """Raise if a completed folder was prepared from other inputs or settings than the ones now given."""
    where = manifest_path(out_dir)
    advice = "use a new folder or delete this one"
    if tokenizer_sha is not None and manifest["tokenizer"]["sha256"] != tokenizer_sha:
        raise DataError(f"{where} was prepared with another tokenizer (sha256 {manifest['tokenizer']['sha256']}, "
                        f"given {tokenizer_sha}); {advice}")
    for key, given in (("shard_tokens", shard_tokens), ("record_batch_tokens", batch_tokens)):
        if manifest[key] != given:
            raise DataError(f"{where} was prepared with {key}={manifest[key]}, given {given}; {advice}")
    if fingerprints is None:
        return
    if sorted(manifest["splits"]) != sorted(fingerprints):
        raise DataError(f"{where} holds splits {sorted(manifest['splits'])}, given {sorted(fingerprints)}")
    for name, fingerprint in fingerprints.items():
        if manifest["splits"][name]["source_sha256"] != fingerprint:
            raise DataError(f"{where} split {name!r} was prepared from other documents; {advice}")


def prepare_corpus(texts_by_split: Mapping[str, Sequence[str]], tokenizer_path: Path, out_dir: Path,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, *, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                   workers: int | None = None, progress: bool | None = None,
                   source: Mapping[str, Any] | None = None, split: Mapping[str, Any] | None = None) -> Path:
    """Tokenize ``texts_by_split`` into ``out_dir/<split>/shard_*.arrow`` and write the manifest last.

    Each document becomes one row of token ids ending with EOS; a shard closes at the first document end at
    or past ``shard_tokens`` tokens, a record batch inside it at the first past ``batch_tokens``. Blank texts
    (and texts with lone surrogates) are skipped and counted. ``workers`` tokenizer threads (default
    min(cores, 8); 0 tokenizes in this process); ``progress``: see ``progress.Progress``. ``source`` is a
    JSON-able description stored in the manifest, ``split`` the manifest's description of how the texts
    were split (default ``{"method": "given", ...}``). Returns ``out_dir``; if its manifest exists and
    matches these inputs, returns at once.
    """
    out_dir, tokenizer_path = Path(out_dir), Path(tokenizer_path)
    _check_budgets(shard_tokens, batch_tokens)
    for name in texts_by_split:
        if not _SPLIT_NAME.match(name):
            raise DataError(f"split name {name!r} must be letters, digits, '_', '.', '-'")
    load_tokenizer(tokenizer_path)  # a missing or malformed file is a DataError naming it
    tokenizer_sha = file_sha256(tokenizer_path)
    fingerprints = {name: texts_sha256(texts) for name, texts in texts_by_split.items()}
    def check(manifest: dict[str, Any]) -> None:
        _check_same_inputs(manifest, out_dir, tokenizer_sha, fingerprints, shard_tokens, batch_tokens)

    if _prepared(out_dir, check):
        return out_dir
    check_own_folder(out_dir)
    with prepare_lock(out_dir):
        if _prepared(out_dir, check, upgrade=True):
            return out_dir
        _write_corpus(TextDocuments(texts_by_split, split), tokenizer_path, out_dir, source=dict(source or {}),
                      identity={"source": dict(source or {}), "texts": fingerprints}, shard_tokens=shard_tokens,
                      batch_tokens=batch_tokens, workers=workers, progress=progress)
    return out_dir


# --- tokenizer training, shared by the file and docstring corpora -----------------------------------------


def _trained_tokenizer(out_dir: Path, identity: Mapping[str, Any], vocab_size: int,
                       train_texts: Callable[[], Iterable[str]]) -> Path:
    """``out_dir/tokenizer.json``: reused if an interrupted run with the same identity trained it, else trained.

    ``train_texts`` is called (no arguments) for the texts only when training is needed.
    """
    path = out_dir / TOKENIZER_NAME
    header = Journal.read_header(out_dir)
    if (header is not None and header.get("identity") == json.loads(json.dumps(identity)) and path.is_file()
            and file_sha256(path) == header.get("tokenizer_sha256")):
        log.info("reusing %s from the interrupted run", path)
        return path
    log.info("training a byte-level BPE of %d tokens on the train split", vocab_size)
    train_byte_level_bpe(train_texts(), vocab_size, path)
    return path


# --- files ------------------------------------------------------------------------------------------------


def _check_same_files(manifest: dict[str, Any], out_dir: Path, request: Mapping[str, Any],
                      sources: list[dict[str, Any]]) -> None:
    """Raise if a completed folder was prepared from other files or options."""
    where = manifest_path(out_dir)
    if manifest["source"] != dict(request):
        raise DataError(f"{where} was prepared with options {manifest['source']}, given {dict(request)}; "
                        f"use a new folder or delete this one")
    recorded = [{"path": s["path"], "bytes": s["bytes"]} for s in manifest["sources"]]
    if recorded != sources:
        raise DataError(f"{where} was prepared from other input files ({len(recorded)} recorded, "
                        f"{len(sources)} given, or changed sizes); use a new folder or delete this one")


def prepare_files(inputs: Sequence[str | Path], out_dir: Path, *, tokenizer: Path | None = None,
                  vocab_size: int = 4096, text_field: str = "text", validation_fraction: float = 0.05,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                  workers: int | None = None, progress: bool | None = None) -> Path:
    """Prepare text files (see ``sources``: .txt, .jsonl[.gz|.zst], .parquet, .arrow / HF folders, globs,
    fsspec URLs) into ``out_dir``, split into train / validation by content hash.

    ``tokenizer``: a ``tokenizer.json`` to use; without one, a byte-level BPE of ``vocab_size`` is trained on
    the train split first (one extra pass over the inputs). Bad documents are counted per reason in the
    manifest (``bad_documents``) and logged; a file that cannot be read is a DataError naming it.
    Rerunning is idempotent, and resumes an interrupted run.
    """
    out_dir = Path(out_dir)
    _check_budgets(shard_tokens, batch_tokens)
    if not 0.0 <= validation_fraction < 1.0:
        raise DataError(f"validation_fraction ({validation_fraction}) must be in [0, 1)")
    check_apart([str(i) for i in inputs], out_dir)
    sources = outside(expand_inputs([str(i) for i in inputs], exclude=[str(out_dir)]), out_dir)
    if not sources:
        raise DataError(f"no input files outside the output folder {out_dir} in {', '.join(map(str, inputs))}")
    request = {"name": FILES_SOURCE_NAME, "text_field": text_field, "validation_fraction": validation_fraction,
               "trained_vocab_size": None if tokenizer is not None else vocab_size}
    tokenizer_sha = None
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        load_tokenizer(tokenizer)
        tokenizer_sha = file_sha256(tokenizer)
    def check(manifest: dict[str, Any]) -> None:
        _check_same_inputs(manifest, out_dir, tokenizer_sha, None, shard_tokens, batch_tokens)
        _check_same_files(manifest, out_dir, request, [{"path": s.url, "bytes": s.size} for s in sources])
        log.info("%s is already prepared", out_dir)

    if _prepared(out_dir, check):
        return out_dir
    check_own_folder(out_dir)
    with prepare_lock(out_dir):
        if _prepared(out_dir, check, upgrade=True):
            return out_dir
        identity = {"source": request, "files": [s.identity() for s in sources]}
        if tokenizer is None:
            tokenizer = _trained_tokenizer(
                out_dir, identity, vocab_size,
                lambda: FileDocuments(sources, text_field, validation_fraction).train_texts())
        _write_corpus(FileDocuments(sources, text_field, validation_fraction), tokenizer, out_dir, source=request,
                      identity=identity, shard_tokens=shard_tokens, batch_tokens=batch_tokens, workers=workers,
                      progress=progress)
    return out_dir


# --- the embedded docstring corpus ------------------------------------------------------------------------


def pydocs_source(vocab_size: int, validation_fraction: float, max_documents: int | None) -> dict[str, Any]:
    """The manifest ``source`` entry of a docstring corpus (``python`` is informational)."""
    return {"name": PYDOCS_SOURCE_NAME, "vocab_size": vocab_size, "validation_fraction": validation_fraction,
            "max_documents": max_documents, "python": platform.python_version()}


def _same_request(recorded: Any, wanted: dict[str, Any]) -> bool:
    """Whether a recorded pydocs source asked for the same corpus (ignoring the Python version)."""
    return isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in wanted.items() if k != "python")


def prepare_pydocs(out_dir: Path, vocab_size: int = 4096, *, validation_fraction: float = 0.05,
                   max_documents: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                   batch_tokens: int = DEFAULT_BATCH_TOKENS, workers: int | None = None,
                   progress: bool | None = None) -> Path:
    """Prepare the standard-library docstring corpus: train a BPE on its train split, then shard it.

    ``max_documents`` keeps only the first documents (before splitting), for tiny demos and tests.
    """
    out_dir = Path(out_dir)
    _check_budgets(shard_tokens, batch_tokens)
    source = pydocs_source(vocab_size, validation_fraction, max_documents)
    def check(manifest: dict[str, Any]) -> None:
        if not _same_request(manifest["source"], source):
            raise DataError(f"{manifest_path(out_dir)} was prepared from source {manifest['source']}, "
                            f"asked for {source}")
        _check_same_inputs(manifest, out_dir, None, None, shard_tokens, batch_tokens)

    if _prepared(out_dir, check):
        return out_dir
    check_own_folder(out_dir)
    with prepare_lock(out_dir):
        if _prepared(out_dir, check, upgrade=True):
            return out_dir
        docs = stdlib_docstrings(max_documents, workers=workers)
        splits = split_train_validation(docs, validation_fraction)
        fingerprints = {name: texts_sha256(texts) for name, texts in splits.items()}
        identity = {"source": source, "texts": fingerprints}
        tokenizer = _trained_tokenizer(out_dir, identity, vocab_size, lambda: splits[TRAIN])
        documents = TextDocuments(splits, {"method": "content_sha256", "validation_fraction": validation_fraction})
        _write_corpus(documents, tokenizer, out_dir, source=source, identity=identity,
                      shard_tokens=shard_tokens, batch_tokens=batch_tokens, workers=workers, progress=progress)
    return out_dir
