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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def _require(mapping: Any, keys: dict[str, type], where: str, path: Path) -> None:
    """Check that ``mapping`` is a dict holding ``keys`` with the given types."""
    if not isinstance(mapping, dict):
        raise DataError(f"invalid manifest {path}: {where} is not an object")
    for key, kind in keys.items():
        value = mapping.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(f"invalid manifest {path}: {where}.{key} missing or not {kind.__name__}")


def _check_shard(shard: Any, where: str, path: Path) -> None:
    """One shard entry: its keys, and record-batch token counts that are positive and sum to its tokens."""
    _require(shard, _SHARD_KEYS, where, path)
    batches = shard["batch_tokens"]
    if not all(_is_int(n) and n > 0 for n in batches):
        raise DataError(f"invalid manifest {path}: {where}.batch_tokens must be positive integers")
    if sum(batches) != shard["tokens"] or (shard["tokens"] > 0) != bool(batches):
        raise DataError(f"invalid manifest {path}: {where}.batch_tokens sum to {sum(batches)}, "
                        f"tokens is {shard['tokens']}")


def _check_sums(manifest: dict[str, Any], path: Path) -> None:
    """Totals equal the sums over splits, and bad-document totals equal the sums over reasons."""
    splits = manifest["splits"].values()
    for key in ("documents", "tokens"):
        total = sum(split[key] for split in splits)
        if manifest["totals"][key] != total:
            raise DataError(f"invalid manifest {path}: totals.{key} is {manifest['totals'][key]} "
                            f"but the splits sum to {total}")
    bad = manifest["bad_documents"]
    if not all(isinstance(k, str) and _is_int(v) and v >= 0 for k, v in bad.items()):
        raise DataError(f"invalid manifest {path}: bad_documents must map reasons to counts")
    if manifest["totals"]["bad_documents"] != sum(bad.values()):
        raise DataError(f"invalid manifest {path}: totals.bad_documents is {manifest['totals']['bad_documents']} "
                        f"but the reasons sum to {sum(bad.values())}")


def validate_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """Check the manifest's structure and internal sums; return it, or raise a one-line DataError."""
    _require(manifest, {"format": str, "format_version": int}, "manifest", path)
    if manifest["format"] != FORMAT_NAME or manifest["format_version"] != FORMAT_VERSION:
        raise DataError(f"invalid manifest {path}: format {manifest['format']!r} version "
                        f"{manifest['format_version']}, expected {FORMAT_NAME!r} version {FORMAT_VERSION} "
                        f"(run triarch prepare on it again to rewrite it)")
    _require(manifest, _TOP_KEYS, "manifest", path)
    _require(manifest["tokenizer"], _TOKENIZER_KEYS, "tokenizer", path)
    _require(manifest["totals"], _TOTAL_KEYS, "totals", path)
    _require(manifest["split"], {"method": str}, "split", path)
    for i, source in enumerate(manifest["sources"]):
        _require(source, _SOURCE_FILE_KEYS, f"sources[{i}]", path)
    for name, split in manifest["splits"].items():
        _require(split, _SPLIT_KEYS, f"splits.{name}", path)
        for i, shard in enumerate(split["shards"]):
            _check_shard(shard, f"splits.{name}.shards[{i}]", path)
        for key in ("documents", "tokens"):
            total = sum(shard[key] for shard in split["shards"])
            if total != split[key]:
                raise DataError(f"invalid manifest {path}: splits.{name}.{key} is {split[key]} "
                                f"but its shards sum to {total}")
    _check_sums(manifest, path)
    return manifest


def read_manifest(data_dir: Path) -> dict[str, Any]:
    """Read and validate ``data_dir/manifest.json``; a missing or invalid one is a one-line DataError."""
    path = manifest_path(data_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"no manifest at {path} (run prepare first)") from None
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {exc.strerror}") from exc
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid manifest {path}: {exc}") from exc
    return validate_manifest(manifest, path)


def write_manifest(data_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest atomically (temp file + fsync + rename); this marks the folder complete."""
    path = manifest_path(data_dir)
    validate_manifest(manifest, path)
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
