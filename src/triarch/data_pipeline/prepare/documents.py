"""What ``prepare`` tokenizes: a stream of ``(split, text, utf8_bytes)`` plus counts of rejected documents.

``TextDocuments`` wraps texts already split in memory; ``FileDocuments`` reads input files in order and
assigns each document to train or validation by a hash of its content (``pydocs.split_of``), so the split
does not depend on file order, worker count or machine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from triarch.data_pipeline.prepare.pydocs import TRAIN, VALIDATION, split_of
from triarch.data_pipeline.prepare.readers import BadDocument, SourceReader, document_bytes
from triarch.data_pipeline.prepare.sources import SourceFile

Document = tuple[str, str, bytes]


class DocumentStream:
    """Yields accepted documents as ``(split, text, utf8_bytes)``; ``bad`` counts the rest by reason."""

    splits: tuple[str, ...] = ()
    progress_unit = "documents"
    progress_total: int | None = None

    def __init__(self) -> None:
        self.bad: Counter[str] = Counter()

    def __iter__(self) -> Iterator[Document]:
        raise NotImplementedError

    def progress_done(self) -> int:
        """How much of ``progress_total`` has been read."""
        return 0

    def sources_json(self) -> list[dict[str, Any]]:
        """The manifest's ``sources``: input files with sizes, hashes and counts (once iterated)."""
        return []

    def split_json(self) -> dict[str, Any]:
        """The manifest's ``split``: how documents were assigned to splits."""
        return {"method": "given", "validation_fraction": None}


class TextDocuments(DocumentStream):
    """Texts already divided into splits (each split in its given order); ``split`` describes how."""

    def __init__(self, texts_by_split: Mapping[str, Sequence[str]], split: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.texts_by_split = texts_by_split
        self._split = dict(split) if split is not None else super().split_json()
        self.splits = tuple(sorted(texts_by_split))
        self.progress_total = sum(len(texts) for texts in texts_by_split.values())
        self._done = 0

    def __iter__(self) -> Iterator[Document]:
        self.bad.clear()
        self._done = 0
        for split in self.splits:
            for text in self.texts_by_split[split]:
                self._done += 1
                data = document_bytes(text)
                if isinstance(data, BadDocument):
                    self.bad[data.reason] += 1
                else:
                    yield split, text, data

    def progress_done(self) -> int:
        return self._done

    def split_json(self) -> dict[str, Any]:
        return dict(self._split)


class FileDocuments(DocumentStream):
    """The documents of input files, in file order, split into train / validation by content hash."""

    progress_unit = "input bytes"

    def __init__(self, sources: Sequence[SourceFile], text_field: str, validation_fraction: float) -> None:
        super().__init__()
        self.sources = list(sources)
        self.text_field = text_field
        self.validation_fraction = validation_fraction
        self.splits = (TRAIN, VALIDATION)
        self.progress_total = sum(s.size for s in self.sources)
        self._finished_bytes = 0
        self._reader: SourceReader | None = None
        self._entries: list[dict[str, Any]] = []

    def __iter__(self) -> Iterator[Document]:
        self.bad.clear()
        self._entries, self._finished_bytes = [], 0
        for source in self.sources:
            reader = self._reader = SourceReader(source, self.text_field)
            good = bad = 0
            for item in reader:
                data = item if isinstance(item, BadDocument) else document_bytes(item)
                if isinstance(data, BadDocument):
                    self.bad[data.reason] += 1
                    bad += 1
                    continue
                good += 1
                yield split_of(data, self.validation_fraction), item, data
            self._finished_bytes += source.size
            self._reader = None
            self._entries.append({"path": source.url, "format": source.kind, "bytes": reader.size,
                                  "sha256": reader.sha256, "documents": good, "bad_documents": bad})

    def progress_done(self) -> int:
        return self._finished_bytes + (self._reader.bytes_read if self._reader is not None else 0)

    def sources_json(self) -> list[dict[str, Any]]:
        return list(self._entries)

    def split_json(self) -> dict[str, Any]:
        return {"method": "content_sha256", "validation_fraction": self.validation_fraction}

    def train_texts(self) -> Iterator[str]:
        """The texts of the train split only (one more pass over the inputs), for training a tokenizer."""
        return (text for split, text, _ in self if split == TRAIN)
