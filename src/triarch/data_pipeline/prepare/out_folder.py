"""Checks on ``prepare``'s output folder: a folder it can create and write, apart from its inputs.

Every problem is a one-line DataError naming the path and the rule:

- the output path, or a folder above it, is a file; the folder cannot be created or written (read-only
  file system, no permission);
- an input is the output folder or lies inside it: prepare writes (and deletes stale) shards there, so on a
  rerun its own outputs would become inputs, or inputs would be deleted. Refused.
- an existing output folder with other content and no earlier prepare in it (an SFT or preference folder, a
  run directory, any folder of files): prepare would write its shards and manifest among them, replacing
  same-named shards. Refused (``check_own_folder``); an empty folder or an earlier prepare's is fine.
- the output folder inside an input folder is fine: its files are never inputs (``outside``), however the
  input names it (folder walk or glob), so a rerun sees the same inputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.prepare.sources import SourceFile

_GLOB_CHARS = "*?["


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` (itself included) that is not a folder, if any."""
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return None
        if candidate.exists():
            return candidate
    return None


def make_out_folder(out_dir: Path) -> None:
    """Create ``out_dir`` (and its parents) for writing, or raise a one-line DataError saying why not."""
    out_dir = Path(out_dir)
    blocker = _file_above(out_dir)
    if blocker == out_dir:
        raise DataError(f"output folder {out_dir} is a file; give a folder path (a missing folder is created)")
    if blocker is not None:
        raise DataError(f"cannot create output folder {out_dir}: {blocker} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create output folder {out_dir}: {_reason(exc)}") from None


def unwritable(out_dir: Path, exc: OSError) -> DataError:
    """The one-line error for a failed write in ``out_dir`` (e.g. creating its lock file)."""
    return DataError(f"output folder {out_dir} is not writable: {_reason(exc)}; prepare writes its shards there")


def _real(path: str | Path) -> str:
    return os.path.realpath(path)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _local_path(item: str) -> tuple[str, bool] | None:
    """The local path an input names (for a glob: its fixed leading folders) and whether it is a glob; None
    for a remote URL."""
    try:
        fs, path = url_to_fs(item)
    except (ValueError, ImportError):
        return None  # expand_inputs reports it
    if not isinstance(fs, LocalFileSystem):
        return None
    if not any(c in path for c in _GLOB_CHARS):
        return path, False
    fixed = path[:min(path.index(c) for c in _GLOB_CHARS if c in path)]
    return fixed.rsplit("/", 1)[0] or "/", True


def check_apart(inputs: Sequence[str], out_dir: Path) -> None:
    """Refuse an input that is ``out_dir`` or lies inside it (see the module docstring)."""
    out = _real(out_dir)
    for item in inputs:
        named = _local_path(str(item))
        if named is None or not _within(_real(named[0]), out):
            continue
        where = "is" if _real(named[0]) == out and not named[1] else "lies in"
        raise DataError(f"input '{item}' {where} the output folder {out_dir}; prepare writes there, so its "
                        f"outputs would become inputs: give an output folder outside the inputs")


def outside(sources: Sequence[SourceFile], out_dir: Path) -> list[SourceFile]:
    """``sources`` without the files inside ``out_dir`` (an output folder inside an input folder)."""
    out = _real(out_dir)
    return [s for s in sources if not (isinstance(s.fs, LocalFileSystem) and _within(_real(s.path), out))]


# what marks an earlier prepare's folder: its manifest, its journal of a half-done run, its lock file
_PREPARE_MARKERS = ("manifest.json", "prepare.journal.jsonl", ".prepare.lock")


def check_own_folder(out_dir: Path) -> None:
    """Refuse (one line) an existing, non-empty ``out_dir`` that no earlier prepare wrote."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    try:
        names = sorted(os.listdir(out_dir))
    except OSError:
        return  # unreadable: creating the lock names the problem
    if not names or any(name in _PREPARE_MARKERS for name in names):
        return
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise DataError(f"output folder {out_dir} holds other files ({shown}) and no earlier prepare: prepare "
                    "writes shards, a tokenizer and a manifest there, so choose a new or empty --out")
