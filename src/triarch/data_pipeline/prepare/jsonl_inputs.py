"""Reading JSONL inputs (``.jsonl``, ``.jsonl.gz``) record by record, for the preference and SFT preparers:
which files an argument names, their non-blank lines, and counting bad records per reason."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator, Sequence
from glob import glob
from pathlib import Path

from triarch.data_pipeline.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def find_inputs(inputs: str | Path | Sequence[str | Path], what: str) -> list[Path]:
    """JSONL files named by ``inputs`` (files, directories searched recursively, globs), in a fixed order;
    ``what`` names the inputs in errors (``preference``, ``SFT``)."""
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(JSONL_SUFFIXES)))
        elif path.is_file():
            files.append(path)
        elif any(ch in str(item) for ch in "*?["):
            files.extend(sorted(Path(p) for p in glob(str(item), recursive=True) if Path(p).is_file()))
        else:
            raise DataError(f"{what} input not found: {item}")
    if not files:
        raise DataError(f"no .jsonl or .jsonl.gz files in {', '.join(str(i) for i in items)}")
    return files


def count_bad(bad: dict[str, int], examples: dict[str, str], reason: str, where: str) -> None:
    """Count one bad record and remember where the first of each reason was."""
    bad[reason] += 1
    examples.setdefault(reason, where)


def jsonl_lines(path: Path, what: str, bad: dict[str, int], examples: dict[str, str]) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines of one JSONL file with their numbers; a truncated gzip ends the file, counted as
    ``truncated_file``."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        handle = opener(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read {what} input {path}: {exc.strerror or exc}") from exc
    number = 0
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, line
        except _GZIP_ERRORS as exc:
            if number == 0:
                raise DataError(f"cannot read {what} input {path}: {exc}") from exc
            count_bad(bad, examples, "truncated_file", f"{path}:{number + 1}")
        except OSError as exc:
            raise DataError(f"cannot read {what} input {path}: {exc.strerror or exc}") from exc
