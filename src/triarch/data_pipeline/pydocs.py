"""The embedded default corpus: docstrings of the Python standard library.

Real English prose on every machine with Python, without a download and without copying text into the
repository. Sources are parsed with ``ast`` (never imported), walked in sorted order, so the corpus is
deterministic for a given stdlib.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

MIN_DOCSTRING_CHARS = 40
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
TRAIN, VALIDATION = "train", "validation"
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


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


def _docstrings_in_order(node: ast.AST) -> Iterator[str]:
    """Module, class and function docstrings of ``node``'s subtree, in source order."""
    if isinstance(node, _DOC_NODES):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(node):
        yield from _docstrings_in_order(child)


def _file_docstrings(path: Path) -> list[str]:
    """Docstrings of one source file; an unreadable or unparsable file gives none."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError, RecursionError):  # ValueError covers decode errors, NUL bytes
        return []
    return list(_docstrings_in_order(tree))


def docstrings_under(root: Path, min_chars: int = MIN_DOCSTRING_CHARS) -> list[str]:
    """Deduplicated docstrings (at least ``min_chars`` long) of the Python files under ``root``.

    Duplicates are detected after collapsing whitespace; the first occurrence (sorted path, source order)
    is kept.
    """
    seen: set[str] = set()
    docs: list[str] = []
    for path in _python_files(root):
        for doc in _file_docstrings(path):
            key = " ".join(doc.split())
            if len(key) < min_chars or key in seen:
                continue
            seen.add(key)
            docs.append(doc)
    return docs


def stdlib_docstrings() -> list[str]:
    """The default corpus: deduplicated docstrings of the standard library, in deterministic order."""
    return docstrings_under(stdlib_root())


def _unit_hash(text: str) -> float:
    """A stable number in [0, 1) derived from ``text`` (same on every machine)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_train_validation(docs: list[str], validation_fraction: float = 0.05) -> dict[str, list[str]]:
    """Split ``docs`` into train and validation by a stable hash of each text; order is preserved."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction ({validation_fraction}) must be in [0, 1)")
    splits: dict[str, list[str]] = {TRAIN: [], VALIDATION: []}
    for doc in docs:
        splits[VALIDATION if _unit_hash(doc) < validation_fraction else TRAIN].append(doc)
    return splits
