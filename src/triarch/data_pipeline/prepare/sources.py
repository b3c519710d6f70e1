"""Find the input files of ``triarch prepare``: local paths or fsspec URLs, folders, globs, HF dataset folders.

Every input is listed and later opened through fsspec (``file://``, ``s3://``, ``gs://``, ``http://``, ...).
Formats, by name: ``.txt`` (one document per file), ``.jsonl``, ``.parquet``, ``.arrow`` (Arrow IPC stream
or file, as ``datasets.save_to_disk`` writes); ``.txt`` and ``.jsonl`` may be compressed as ``.gz`` or
``.zst``. A folder is walked in sorted order, skipping hidden entries and unsupported names; a folder written
by ``datasets`` ``save_to_disk`` (``state.json`` + ``dataset_info.json``, or ``dataset_dict.json`` for
several splits) contributes its Arrow files in the order it lists them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from triarch.data_pipeline.errors import DataError

FORMATS = ("txt", "jsonl", "parquet", "arrow")
COMPRESSIONS = {"gz": "gzip", "zst": "zstd"}
_COMPRESSIBLE = {"txt", "jsonl"}
HF_STATE = "state.json"
HF_INFO = "dataset_info.json"
HF_DATASET_DICT = "dataset_dict.json"
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class SourceFile:
    """One input file. ``url`` names it to users and in the manifest; ``fs`` and ``path`` open it."""

    url: str
    path: str
    format: str
    compression: str | None
    size: int
    version: str
    fs: AbstractFileSystem = field(compare=False, repr=False)

    @property
    def kind(self) -> str:
        """Format plus compression, e.g. ``jsonl.gz``."""
        suffix = {v: k for k, v in COMPRESSIONS.items()}.get(self.compression or "")
        return f"{self.format}.{suffix}" if suffix else self.format

    def identity(self) -> dict[str, Any]:
        """What must be unchanged for a half-done preparation of this file to be resumed."""
        return {"path": self.url, "bytes": self.size, "version": self.version}


def detect_format(name: str) -> tuple[str, str | None] | None:
    """``(format, compression)`` from a file name, or None if it is not a supported input."""
    parts = name.lower().rsplit(".", 2)
    compression = COMPRESSIONS.get(parts[-1]) if len(parts) > 1 else None
    fmt = parts[-2] if compression and len(parts) > 2 else parts[-1] if len(parts) > 1 else ""
    if fmt not in FORMATS or (compression and fmt not in _COMPRESSIBLE):
        return None
    return fmt, compression


def _version(info: dict[str, Any]) -> str:
    """A modification stamp from an fsspec ``info`` dict (local mtime, S3 ETag, ...), or ''."""
    for key in ("mtime", "ETag", "etag", "LastModified", "last_modified", "updated", "md5Hash"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _source(fs: AbstractFileSystem, info: dict[str, Any], fmt: tuple[str, str | None]) -> SourceFile:
    path = info["name"]
    url = path if _is_local(fs) else fs.unstrip_protocol(path)
    return SourceFile(url=url, path=path, format=fmt[0], compression=fmt[1], size=int(info.get("size") or 0),
                      version=_version(info), fs=fs)


def _is_local(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _read_json(fs: AbstractFileSystem, path: str) -> Any:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read '{path}': {detail}") from exc


def _hf_dataset(fs: AbstractFileSystem, folder: str) -> list[SourceFile]:
    """The Arrow files of a ``save_to_disk`` folder, in the order ``state.json`` lists them."""
    state = _read_json(fs, f"{folder}/{HF_STATE}")
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) and "filename" in f for f in files):
        raise DataError(f"'{folder}/{HF_STATE}' does not list _data_files; is it a datasets save_to_disk folder?")
    return [_source(fs, fs.info(f"{folder}/{f['filename']}"), ("arrow", None)) for f in files]


def _expand_dir(fs: AbstractFileSystem, folder: str, exclude: set[str]) -> list[SourceFile]:
    """Supported files under ``folder`` (sorted walk), honouring HF dataset folders."""
    entries = {_basename(e["name"]): e for e in fs.ls(folder, detail=True)}
    if HF_STATE in entries and HF_INFO in entries:
        return _hf_dataset(fs, folder)
    if HF_DATASET_DICT in entries:
        listing = _read_json(fs, f"{folder}/{HF_DATASET_DICT}")
        splits = listing.get("splits") if isinstance(listing, dict) else None
        if not isinstance(splits, list):
            raise DataError(f"'{folder}/{HF_DATASET_DICT}' does not list splits")
        return [s for split in splits for s in _expand_dir(fs, f"{folder}/{split}", exclude)]
    files: list[SourceFile] = []
    for name in sorted(entries):
        entry = entries[name]
        if name.startswith(".") or entry["name"].rstrip("/") in exclude:
            continue
        if entry.get("type") == "directory":
            files.extend(_expand_dir(fs, entry["name"].rstrip("/"), exclude))
        elif (fmt := detect_format(name)) is not None:
            files.append(_source(fs, entry, fmt))
    return files


def _expand_one(item: str, exclude: set[str]) -> list[SourceFile]:
    try:
        fs, path = url_to_fs(item)
    except (ValueError, ImportError) as exc:
        raise DataError(f"input '{item}': {exc}") from exc
    if any(c in path for c in _GLOB_CHARS):
        matches = sorted(fs.glob(path))
        if not matches:
            raise DataError(f"input '{item}' matches no files")
        found: list[SourceFile] = []
        for match in matches:
            info = fs.info(match)
            if info.get("type") == "directory":
                found.extend(_expand_dir(fs, match.rstrip("/"), exclude))
            elif (fmt := detect_format(_basename(match))) is not None:
                found.append(_source(fs, info, fmt))
        return found
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise DataError(f"input '{item}' does not exist") from None
    except OSError as exc:
        raise DataError(f"cannot read input '{item}': {exc}") from exc
    if info.get("type") == "directory":
        return _expand_dir(fs, path.rstrip("/"), exclude)
    fmt = detect_format(_basename(path))
    if fmt is None:
        raise DataError(f"input '{item}' is not a supported format (.txt, .jsonl, .parquet, .arrow; "
                        f".txt and .jsonl may end in .gz or .zst)")
    return [_source(fs, info, fmt)]


def expand_inputs(inputs: list[str], exclude: list[str] | None = None) -> list[SourceFile]:
    """The input files of ``inputs`` in order (each listed once); ``exclude``: local folders to skip."""
    skip = {url_to_fs(str(e))[1].rstrip("/") for e in exclude or []}
    files: list[SourceFile] = []
    seen: set[str] = set()
    for item in inputs:
        for source in _expand_one(str(item), skip):
            if source.url not in seen:
                seen.add(source.url)
                files.append(source)
    if not files:
        raise DataError(f"no .txt, .jsonl, .parquet or .arrow files found in {', '.join(map(str, inputs))}")
    return files


def open_source(source: SourceFile) -> Any:
    """Open ``source`` for binary reading through its filesystem."""
    return source.fs.open(source.path, "rb")
