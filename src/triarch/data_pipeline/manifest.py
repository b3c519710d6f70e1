"""The manifest of a prepared corpus: written last, its presence means the folder is complete.

Layout (``format_version`` 2)::

    {"format": "triarch.tokens", "format_version": 2, "dtype": "uint32",
     "shard_tokens": int,                  # a shard closes at the first document end at or past this
     "record_batch_tokens": int,           # a record batch closes at the first document end at or past this
     "tokenizer": {"file", "sha256", "vocab_size", "eos_id", "model"},
     "source": {...what was asked for: free-form, compared on a rerun...},
     "sources": [{"path", "format", "bytes", "sha256", "documents", "bad_documents"}],   # input files
     "split": {"method": "content_sha256" | "given", "validation_fraction": float | null},
     "splits": {name: {"documents", "tokens", "source_sha256",
                       "shards": [{"file", "documents", "tokens", "max_token_id", "bytes", "sha256",
                                   "batch_tokens": [int, ...]}]}},
     "bad_documents": {reason: int},
     "totals": {"documents", "tokens", "bad_documents"}}

``batch_tokens`` lists the token count of every Arrow record batch of the shard file, in file order. A
document longer than ``shard_tokens`` spans consecutive shards (one row in each); a shard's ``documents``
counts the documents that end in it.

This module is the one manifest reader, for local folders and fsspec URLs alike (``read_manifest``, or
``load_manifest`` on a filesystem already open): ``prepare``, the training stream, ``triarch data verify``
and the CLI all read through it, and ``preference_format`` reads its own manifests with the same
``load_manifest_json``. Readers of shards (``accept_v1=True``) also take a format-1 manifest, written before
``batch_tokens`` existed (one record batch per shard); ``prepare`` rewrites such a folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.fileio import file_sha256, replace_atomically, temp_path

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "triarch.tokens"
FORMAT_VERSION = 2
_TOP_KEYS = {"format": str, "format_version": int, "dtype": str, "shard_tokens": int, "record_batch_tokens": int,
             "tokenizer": dict, "source": dict, "sources": list, "split": dict, "splits": dict,
             "bad_documents": dict, "totals": dict}
_TOKENIZER_KEYS = {"file": str, "sha256": str, "vocab_size": int, "eos_id": int, "model": str}
_SOURCE_FILE_KEYS = {"path": str, "format": str, "bytes": int, "sha256": str, "documents": int, "bad_documents": int}
_SPLIT_KEYS = {"documents": int, "tokens": int, "source_sha256": str, "shards": list}
_SHARD_KEYS = {"file": str, "documents": int, "tokens": int, "max_token_id": int, "bytes": int, "sha256": str,
               "batch_tokens": list}
_TOTAL_KEYS = {"documents": int, "tokens": int, "bad_documents": int}


def manifest_path(data_dir: Path) -> Path:
    """Where the manifest of ``data_dir`` lives."""
    return Path(data_dir) / MANIFEST_NAME


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(mapping: Any, keys: dict[str, type], part: str, where: str | Path) -> None:
    """Check that ``mapping`` (the manifest's ``part``) is a dict holding ``keys`` with the given types."""
    if not isinstance(mapping, dict):
        raise DataError(f"invalid manifest {where}: {part} is not an object")
    for key, kind in keys.items():
        value = mapping.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(f"invalid manifest {where}: {part}.{key} missing or not {kind.__name__}")


def _check_shard(shard: Any, part: str, where: str | Path) -> None:
    """One shard entry: its keys, and record-batch token counts that are positive and sum to its tokens."""
    _require(shard, _SHARD_KEYS, part, where)
    batches = shard["batch_tokens"]
    if not all(_is_int(n) and n > 0 for n in batches):
        raise DataError(f"invalid manifest {where}: {part}.batch_tokens must be positive integers")
    if sum(batches) != shard["tokens"] or (shard["tokens"] > 0) != bool(batches):
        raise DataError(f"invalid manifest {where}: {part}.batch_tokens sum to {sum(batches)}, "
                        f"tokens is {shard['tokens']}")


def _check_sums(manifest: dict[str, Any], where: str | Path) -> None:
    """Totals equal the sums over splits, and bad-document totals equal the sums over reasons."""
    splits = manifest["splits"].values()
    for key in ("documents", "tokens"):
        total = sum(split[key] for split in splits)
        if manifest["totals"][key] != total:
            raise DataError(f"invalid manifest {where}: totals.{key} is {manifest['totals'][key]} "
                            f"but the splits sum to {total}")
    bad = manifest["bad_documents"]
    if not all(isinstance(k, str) and _is_int(v) and v >= 0 for k, v in bad.items()):
        raise DataError(f"invalid manifest {where}: bad_documents must map reasons to counts")
    if manifest["totals"]["bad_documents"] != sum(bad.values()):
        raise DataError(f"invalid manifest {where}: totals.bad_documents is {manifest['totals']['bad_documents']} "
                        f"but the reasons sum to {sum(bad.values())}")


def _validate_v1(manifest: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """The parts of a format-1 manifest (one record batch per shard, no ``batch_tokens``) a reader uses."""
    def bad(what: str) -> DataError:
        return DataError(f"invalid manifest {where}: {what}")

    tokenizer, splits = manifest.get("tokenizer"), manifest.get("splits")
    if manifest.get("format") != FORMAT_NAME or not isinstance(tokenizer, dict) or not isinstance(splits, dict):
        raise bad("not a triarch.tokens version 1 manifest")
    if not all(isinstance(tokenizer.get(k), kind) for k, kind in (("sha256", str), ("vocab_size", int),
                                                                  ("eos_id", int))):
        raise bad("tokenizer.sha256, vocab_size or eos_id missing")
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list) or not all(
                isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("sha256"), str)
                and isinstance(e.get("tokens"), int) and isinstance(e.get("max_token_id"), int) for e in shards):
            raise bad(f"splits.{name}.shards entries need file, sha256, tokens and max_token_id")
    return manifest


def validate_manifest(manifest: Any, where: str | Path, *, accept_v1: bool = False) -> dict[str, Any]:
    """Check the manifest's structure and internal sums; return it, or raise a one-line DataError naming
    ``where``. ``accept_v1``: a format-1 manifest is checked as such (for readers) instead of refused."""
    if accept_v1 and isinstance(manifest, dict) and manifest.get("format_version") == 1:
        return _validate_v1(manifest, where)
    _require(manifest, {"format": str, "format_version": int}, "manifest", where)
    if manifest["format"] != FORMAT_NAME or manifest["format_version"] != FORMAT_VERSION:
        raise DataError(f"invalid manifest {where}: format {manifest['format']!r} version "
                        f"{manifest['format_version']}, expected {FORMAT_NAME!r} version {FORMAT_VERSION} "
                        f"(run triarch prepare on it again to rewrite it)")
    _require(manifest, _TOP_KEYS, "manifest", where)
    _require(manifest["tokenizer"], _TOKENIZER_KEYS, "tokenizer", where)
    _require(manifest["totals"], _TOTAL_KEYS, "totals", where)
    _require(manifest["split"], {"method": str}, "split", where)
    for i, source in enumerate(manifest["sources"]):
        _require(source, _SOURCE_FILE_KEYS, f"sources[{i}]", where)
    for name, split in manifest["splits"].items():
        _require(split, _SPLIT_KEYS, f"splits.{name}", where)
        for i, shard in enumerate(split["shards"]):
            _check_shard(shard, f"splits.{name}.shards[{i}]", where)
        for key in ("documents", "tokens"):
            total = sum(shard[key] for shard in split["shards"])
            if total != split[key]:
                raise DataError(f"invalid manifest {where}: splits.{name}.{key} is {split[key]} "
                                f"but its shards sum to {total}")
    _check_sums(manifest, where)
    return manifest


# --- reading: one reader for local folders and fsspec URLs ------------------------------------------------


def _is_url(folder: str | Path) -> bool:
    """Whether ``folder`` names a location through an fsspec protocol (``s3://``, ``file://``, ...)."""
    return not isinstance(folder, Path) and "://" in folder


def open_folder(folder: str | Path, storage_options: Mapping[str, Any] | None = None
                ) -> tuple[AbstractFileSystem, str]:
    """The filesystem and root path of a prepared folder: a local path as it is, or an fsspec URL such as
    ``s3://bucket/data`` (``storage_options`` go to its filesystem)."""
    if not _is_url(folder):
        return LocalFileSystem(), os.path.abspath(folder)
    try:
        return url_to_fs(str(folder), **dict(storage_options or {}))
    except (ValueError, ImportError) as exc:
        raise DataError(f"cannot open '{folder}': {exc}") from exc


def manifest_where(folder: str | Path) -> str:
    """How messages name the manifest of ``folder``: ``folder/manifest.json`` as the user wrote ``folder``."""
    if not _is_url(folder):
        return str(Path(folder) / MANIFEST_NAME)
    return f"{str(folder).rstrip('/')}/{MANIFEST_NAME}"


def load_manifest_json(fs: AbstractFileSystem, root: str, where: str | Path,
                       missing: str = "run prepare first") -> Any:
    """The parsed ``manifest.json`` under ``root`` on ``fs``, unchecked; a missing, unreadable or non-JSON
    file is a one-line DataError naming ``where`` (``missing`` says what to do when there is none)."""
    try:
        text = fs.cat_file(f"{root.rstrip('/')}/{MANIFEST_NAME}").decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"no manifest at {where} ({missing})") from None
    except OSError as exc:
        raise DataError(f"cannot read manifest {where}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"invalid manifest {where}: not UTF-8 ({exc.reason})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid manifest {where}: {exc}") from exc


def load_manifest(fs: AbstractFileSystem, root: str, where: str | Path, *,
                  accept_v1: bool = False) -> dict[str, Any]:
    """The validated manifest of the prepared folder at ``root`` on ``fs`` (see ``validate_manifest``)."""
    return validate_manifest(load_manifest_json(fs, root, where), where, accept_v1=accept_v1)


def read_manifest(folder: str | Path, *, storage_options: Mapping[str, Any] | None = None,
                  accept_v1: bool = False) -> dict[str, Any]:
    """Read and validate ``folder/manifest.json`` (a local folder or fsspec URL); a missing or invalid one is
    a one-line DataError."""
    fs, root = open_folder(folder, storage_options)
    return load_manifest(fs, root, manifest_where(folder), accept_v1=accept_v1)


def write_manifest(data_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest atomically (temp file + fsync + rename); this marks the folder complete."""
    path = manifest_path(data_dir)
    validate_manifest(manifest, str(path))
    tmp = temp_path(path)
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    replace_atomically(tmp, path)
    return path


def verify_files(data_dir: Path) -> dict[str, Any]:
    """Hash the tokenizer and every shard and compare with the manifest (reads everything once)."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    entries = [manifest["tokenizer"]] + [s for split in manifest["splits"].values() for s in split["shards"]]
    for entry in entries:
        file = data_dir / entry["file"]
        if not file.is_file():
            raise DataError(f"{file} listed in {manifest_path(data_dir)} is missing")
        actual = file_sha256(file)
        if actual != entry["sha256"]:
            raise DataError(f"{file} has sha256 {actual}, manifest says {entry['sha256']}")
    return manifest
