"""The embedded default corpus: docstrings of the Python standard library.

Real English prose on every machine with Python, without a download and without copying text into the
repository. Sources are parsed with ``ast`` (never imported), walked in sorted order, so the corpus is
deterministic for a given stdlib.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import sysconfig
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.prepare.tokenize_pool import default_workers
from triarch.data_workers import die_with_parent, file_docstrings, hidden_main, spawn_executor

MIN_DOCSTRING_CHARS = 40
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
TRAIN, VALIDATION = "train", "validation"
_PARALLEL_MIN_FILES = 64  # below this, starting worker processes costs more than it saves
_FILES_PER_TASK = 8


def stdlib_root() -> Path:
    """The directory holding this interpreter's standard-library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _python_files(root: Path) -> Iterator[Path]:
    """Every ``.py`` file under ``root`` outside skipped folders, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath, name)


def iter_docstrings(root: Path, min_chars: int = MIN_DOCSTRING_CHARS, workers: int | None = None) -> Iterator[str]:
    """Deduplicated docstrings (at least ``min_chars`` long) of the Python files under ``root``, lazily.

    Duplicates are detected after collapsing whitespace; the first occurrence (sorted path, source order)
    is kept. Files are parsed by ``workers`` processes (default min(cores, 8)) but yielded in order, so the
    result does not depend on ``workers``, and stopping early stops the parsing. A worker process that dies
    is a one-line DataError (see ``triarch.data_workers``), never a hang.
    """
    files = list(_python_files(root))
    workers = default_workers() if workers is None else workers
    seen: set[str] = set()
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(files) >= _PARALLEL_MIN_FILES:
            pool = stack.enter_context(spawn_executor(workers, die_with_parent, (os.getpid(),)))
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)  # stopping early cancels the rest
            with hidden_main():  # map submits every task now, which starts the workers
                per_file = _worker_results(pool, pool.map(file_docstrings, files, chunksize=_FILES_PER_TASK), workers)
        else:
            per_file = map(file_docstrings, files)
        for docs in per_file:
            for doc in docs:
                key = " ".join(doc.split())
                if len(key) < min_chars or key in seen:
                    continue
                seen.add(key)
                yield doc


def _worker_results(pool: ProcessPoolExecutor, results: Iterator[list[str]], workers: int) -> Iterator[list[str]]:
    """``results`` of the docstring processes; a process that died is a one-line DataError.

    Before raising, the broken pool is shut down without cancelling: its manager thread is still failing the
    pending futures and terminating the other workers, and cancelling under it (what an early stop does) would
    kill that thread half-way and leave workers running past this process.
    """
    try:
        yield from results
    except BrokenProcessPool as exc:
        pool.shutdown(wait=True)
        raise DataError(f"a docstring parser process died ({exc}); parse in this process with workers=1 "
                        f"(--workers 1) instead of {workers}") from None


def docstrings_under(root: Path, min_chars: int = MIN_DOCSTRING_CHARS, workers: int | None = None) -> list[str]:
    """All of ``iter_docstrings(root, min_chars, workers)``."""
    return list(iter_docstrings(root, min_chars, workers))


def stdlib_docstrings(max_documents: int | None = None, workers: int | None = None) -> list[str]:
    """The default corpus: deduplicated docstrings of the standard library, in deterministic order.

    ``max_documents`` keeps the first ones only (and parses no further than needed).
    """
    return list(itertools.islice(iter_docstrings(stdlib_root(), workers=workers), max_documents))


def unit_hash(data: bytes) -> float:
    """A stable number in [0, 1) derived from ``data`` (same on every machine)."""
    digest = hashlib.sha256(data).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(data: bytes, validation_fraction: float) -> str:
    """The split of a document given its UTF-8 bytes: validation when its hash falls below the fraction."""
    return VALIDATION if unit_hash(data) < validation_fraction else TRAIN


def split_train_validation(docs: list[str], validation_fraction: float = 0.05) -> dict[str, list[str]]:
    """Split ``docs`` into train and validation by a stable hash of each text; order is preserved."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction ({validation_fraction}) must be in [0, 1)")
    splits: dict[str, list[str]] = {TRAIN: [], VALIDATION: []}
    for doc in docs:
        splits[split_of(doc.encode("utf-8"), validation_fraction)].append(doc)
    return splits
