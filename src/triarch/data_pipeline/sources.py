"""Read documents from user files for ``triarch prepare``: ``.txt`` (one document per file) and ``.jsonl``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from triarch.data_pipeline.errors import DataError


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named directly, plus the .txt/.jsonl files under named directories, sorted."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input '{item}' does not exist")
    if not files:
        raise DataError(f"no .txt or .jsonl files found in {inputs}")
    return files


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one file; empty or malformed JSONL lines are skipped."""
    if path.suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read '{path}': {err}") from None
        if text.strip():
            yield text
        return
    if path.suffix != ".jsonl":
        raise DataError(f"input '{path}' is not .txt or .jsonl")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                value = record.get(text_field) if isinstance(record, dict) else None
                if isinstance(value, str) and value.strip():
                    yield value
    except OSError as err:
        raise DataError(f"cannot read '{path}': {err}") from None
