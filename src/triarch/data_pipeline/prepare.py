"""Prepare a corpus: tokenize, append EOS, write Arrow shards per split, then the manifest last.

A folder whose manifest exists is complete and never rewritten; a folder without one is (re)completed,
reusing shard files whose content is already right.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.fileio import file_sha256, is_temp, replace_atomically, temp_path
from triarch.data_pipeline.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    manifest_path,
    read_manifest,
    write_manifest,
)
from triarch.data_pipeline.pydocs import TRAIN, split_train_validation, stdlib_docstrings
from triarch.data_pipeline.shards import (
    MAX_SHARD_TOKENS,
    ShardInfo,
    TOKEN_DTYPE,
    describe_shard,
    pack_documents,
    shard_matches,
    write_shard,
)
from triarch.data_pipeline.tokenizer import eos_id, load_tokenizer, train_byte_level_bpe

__all__ = ["prepare_corpus", "prepare_pydocs", "read_manifest"]

log = logging.getLogger(__name__)

TOKENIZER_NAME = "tokenizer.json"
ENCODE_BATCH_DOCS = 1024
PYDOCS_SOURCE_NAME = "python-stdlib-docstrings"
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def texts_sha256(texts: list[str]) -> str:
    """A fingerprint of an ordered list of documents (length-prefixed, so boundaries count)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def shard_name(index: int) -> str:
    """File name of the ``index``-th shard of a split."""
    return f"shard_{index:05d}.arrow"


def _encoded_documents(tokenizer: Tokenizer, texts: list[str], eos: int) -> Iterator[np.ndarray]:
    """Token ids of each text with EOS appended, encoded in batches (no BOS or other specials)."""
    for start in range(0, len(texts), ENCODE_BATCH_DOCS):
        batch = tokenizer.encode_batch(texts[start:start + ENCODE_BATCH_DOCS], add_special_tokens=False)
        for encoding in batch:
            ids = encoding.ids
            ids.append(eos)
            yield np.asarray(ids, dtype=TOKEN_DTYPE)


def _emit_shard(docs: list[np.ndarray], path: Path, root: Path) -> ShardInfo:
    """Write one shard unless an identical file is already there; return its manifest entry."""
    packed = pack_documents(docs)
    if shard_matches(path, packed):
        log.debug("reusing %s", path)
    else:
        write_shard(path, packed)
    return describe_shard(path, root, packed)


def _remove_stale(split_dir: Path, keep: set[str]) -> None:
    """Delete interrupted temp files and shards beyond this preparation's last one."""
    for path in split_dir.iterdir():
        if is_temp(path) or (path.suffix == ".arrow" and path.name not in keep):
            path.unlink()


def _write_split(tokenizer: Tokenizer, eos: int, texts: list[str], root: Path, split: str,
                 shard_tokens: int) -> dict[str, Any]:
    """Tokenize one split into shards of about ``shard_tokens`` tokens (closed at document ends)."""
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)
    shards: list[ShardInfo] = []
    pending: list[np.ndarray] = []
    pending_tokens = 0
    for doc in _encoded_documents(tokenizer, texts, eos):
        pending.append(doc)
        pending_tokens += len(doc)
        if pending_tokens >= shard_tokens:
            shards.append(_emit_shard(pending, split_dir / shard_name(len(shards)), root))
            pending, pending_tokens = [], 0
    if pending:
        shards.append(_emit_shard(pending, split_dir / shard_name(len(shards)), root))
    _remove_stale(split_dir, {shard_name(i) for i in range(len(shards))})
    return {
        "documents": sum(s.documents for s in shards),
        "tokens": sum(s.tokens for s in shards),
        "source_sha256": texts_sha256(texts),
        "shards": [s.to_json() for s in shards],
    }


def _check_same_inputs(manifest: dict[str, Any], out_dir: Path, tokenizer_sha: str,
                       texts_by_split: Mapping[str, list[str]], shard_tokens: int) -> None:
    """Raise if a completed folder was prepared from other inputs than the ones now given."""
    where = manifest_path(out_dir)
    if manifest["tokenizer"]["sha256"] != tokenizer_sha:
        raise DataError(f"{where} was prepared with another tokenizer (sha256 {manifest['tokenizer']['sha256']}, "
                        f"given {tokenizer_sha}); use a new folder or delete this one")
    if manifest.get("shard_tokens") != shard_tokens:
        raise DataError(f"{where} was prepared with shard_tokens={manifest.get('shard_tokens')}, "
                        f"given {shard_tokens}; use a new folder or delete this one")
    if sorted(manifest["splits"]) != sorted(texts_by_split):
        raise DataError(f"{where} holds splits {sorted(manifest['splits'])}, given {sorted(texts_by_split)}")
    for name, texts in texts_by_split.items():
        if manifest["splits"][name]["source_sha256"] != texts_sha256(texts):
            raise DataError(f"{where} split {name!r} was prepared from other documents; "
                            f"use a new folder or delete this one")


def _install_tokenizer(tokenizer_path: Path, out_dir: Path) -> Path:
    """Copy the tokenizer into the prepared folder (atomically) so the folder is self-contained."""
    target = out_dir / TOKENIZER_NAME
    if target.exists() and target.resolve() == tokenizer_path.resolve():
        return target
    tmp = temp_path(target)
    shutil.copyfile(tokenizer_path, tmp)
    replace_atomically(tmp, target)
    return target


def prepare_corpus(texts_by_split: dict[str, list[str]], tokenizer_path: Path, out_dir: Path,
                   shard_tokens: int = 1 << 20, *, source: Mapping[str, Any] | None = None) -> Path:
    """Tokenize ``texts_by_split`` into ``out_dir/<split>/shard_*.arrow`` and write the manifest last.

    Each document becomes one row of token ids ending with EOS; a shard is closed at the first document
    end at or past ``shard_tokens`` tokens. ``source`` is a JSON-able description stored in the manifest.
    Returns ``out_dir``. If its manifest exists and matches these inputs, returns at once.
    """
    out_dir, tokenizer_path = Path(out_dir), Path(tokenizer_path)
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise DataError(f"shard_tokens ({shard_tokens}) must be in [1, {MAX_SHARD_TOKENS}]")
    for name in texts_by_split:
        if not _SPLIT_NAME.match(name):
            raise DataError(f"split name {name!r} must be letters, digits, '_', '.', '-'")
    tokenizer = load_tokenizer(tokenizer_path)
    eos = eos_id(tokenizer, tokenizer_path)
    tokenizer_sha = file_sha256(tokenizer_path)
    if manifest_path(out_dir).exists():
        _check_same_inputs(read_manifest(out_dir), out_dir, tokenizer_sha, texts_by_split, shard_tokens)
        return out_dir
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    installed = _install_tokenizer(tokenizer_path, out_dir)
    splits = {name: _write_split(tokenizer, eos, texts_by_split[name], out_dir, name, shard_tokens)
              for name in sorted(texts_by_split)}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dtype": "uint32",
        "shard_tokens": shard_tokens,
        "tokenizer": {"file": installed.name, "sha256": tokenizer_sha,
                      "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True), "eos_id": eos},
        "source": dict(source or {}),
        "splits": splits,
        "totals": {key: sum(s[key] for s in splits.values()) for key in ("documents", "tokens")},
    }
    write_manifest(out_dir, manifest)
    log.info("prepared %s: %d documents, %d tokens in %.1fs", out_dir, manifest["totals"]["documents"],
             manifest["totals"]["tokens"], time.perf_counter() - started)
    return out_dir


def pydocs_source(vocab_size: int, validation_fraction: float, max_documents: int | None) -> dict[str, Any]:
    """The manifest ``source`` entry of a docstring corpus (``python`` is informational)."""
    return {"name": PYDOCS_SOURCE_NAME, "vocab_size": vocab_size, "validation_fraction": validation_fraction,
            "max_documents": max_documents, "python": platform.python_version()}


def _same_request(recorded: Any, wanted: dict[str, Any]) -> bool:
    """Whether a recorded pydocs source asked for the same corpus (ignoring the Python version)."""
    return isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in wanted.items() if k != "python")


def prepare_pydocs(out_dir: Path, vocab_size: int = 4096, *, validation_fraction: float = 0.05,
                   max_documents: int | None = None, shard_tokens: int = 1 << 20) -> Path:
    """Prepare the standard-library docstring corpus: train a BPE on its train split, then shard it.

    ``max_documents`` keeps only the first documents (before splitting), for tiny demos and tests.
    """
    out_dir = Path(out_dir)
    source = pydocs_source(vocab_size, validation_fraction, max_documents)
    if manifest_path(out_dir).exists():
        recorded = read_manifest(out_dir).get("source")
        if not _same_request(recorded, source):
            raise DataError(f"{manifest_path(out_dir)} was prepared from source {recorded}, asked for {source}")
        return out_dir
    docs = stdlib_docstrings()[:max_documents]
    splits = split_train_validation(docs, validation_fraction)
    tokenizer_path = out_dir / TOKENIZER_NAME
    train_byte_level_bpe(splits[TRAIN], vocab_size, tokenizer_path)
    return prepare_corpus(splits, tokenizer_path, out_dir, shard_tokens, source=source)
