"""The progress journal of an unfinished preparation, so a rerun after a kill redoes only the missing shards.

``prepare.journal.jsonl`` in the output folder: the first line is the header (everything that determines
the shards: inputs, tokenizer hash, budgets); each later line records one shard after its file was renamed
into place, with ``end_document``: how many documents of its split end in the shards up to and including
it, and ``carry``: how many tokens of the next document they already hold (a long document spans shards).
Shard ``k`` of a split is a deterministic function of the inputs, so a rerun with the same header keeps the
longest prefix of recorded shards whose files still hash right, skips tokenizing their documents, and
continues from there. A line cut short by a kill is ignored. The journal is deleted after the manifest is
written; the manifest, not the journal, marks a folder complete.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triarch.data_pipeline.fileio import file_sha256
from triarch.data_pipeline.prepare.shards import ShardInfo

log = logging.getLogger(__name__)

JOURNAL_NAME = "prepare.journal.jsonl"


@dataclass(frozen=True)
class JournalEntry:
    """One recorded shard of a split."""

    split: str
    index: int
    end_document: int
    shard: ShardInfo
    carry: int = 0  # tokens of the next (long) document already in the shards up to this one


def _parse(line: str) -> JournalEntry | None:
    """A journal line as an entry; None for a line that a kill cut short or that is malformed."""
    try:
        record = json.loads(line)
        return JournalEntry(split=record["split"], index=int(record["index"]),
                            end_document=int(record["end_document"]), shard=ShardInfo.from_json(record["shard"]),
                            carry=int(record.get("carry", 0)))
    except (ValueError, KeyError, TypeError):
        return None


class Journal:
    """Append-only record of finished shards for one preparation request (see the module docstring)."""

    def __init__(self, out_dir: Path, header: dict[str, Any]) -> None:
        self.root = Path(out_dir)
        self.path = self.root / JOURNAL_NAME
        self.header = json.loads(json.dumps(header))  # normalise tuples etc. to what a reread gives
        self._entries = self._load()

    @staticmethod
    def read_header(out_dir: Path) -> dict[str, Any] | None:
        """The header of ``out_dir``'s journal, or None if there is none (or it is unreadable)."""
        try:
            with open(Path(out_dir) / JOURNAL_NAME, encoding="utf-8") as f:
                header = json.loads(f.readline()).get("header")
        except (OSError, ValueError, AttributeError):
            return None
        return header if isinstance(header, dict) else None

    def _load(self) -> dict[tuple[str, int], JournalEntry]:
        """Entries of a journal written for the same header; otherwise start a new journal."""
        entries: dict[tuple[str, int], JournalEntry] = {}
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        lines = text.splitlines()
        try:
            same = bool(lines) and json.loads(lines[0]).get("header") == self.header
        except (ValueError, AttributeError):
            same = False
        if same:
            for line in lines[1:]:
                entry = _parse(line)
                if entry is not None:
                    entries[(entry.split, entry.index)] = entry  # a later line for the same shard wins
            if not text.endswith("\n"):  # a kill cut the last line short: end it so the next line parses
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("\n")
            return entries
        if lines:
            log.info("%s was written for other inputs or settings; starting this preparation afresh", self.path)
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"header": self.header}, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return entries

    def resumable(self, split: str) -> list[JournalEntry]:
        """The longest prefix of ``split``'s recorded shards whose files exist and still hash right."""
        prefix: list[JournalEntry] = []
        previous_end = 0
        while (entry := self._entries.get((split, len(prefix)))) is not None:
            file = self.root / entry.shard.file
            try:
                intact = (file.stat().st_size == entry.shard.bytes and file_sha256(file) == entry.shard.sha256)
            except OSError:
                intact = False
            if not intact or entry.end_document != previous_end + entry.shard.documents:
                break
            prefix.append(entry)
            previous_end = entry.end_document
        return prefix

    def record(self, entry: JournalEntry) -> None:
        """Append one finished shard.

        Flushed, so a killed process keeps it; not fsynced: after a machine crash a lost line only means
        that shard is written again, and a line whose file was lost fails the hash check in ``resumable``.
        """
        line = {"split": entry.split, "index": entry.index, "end_document": entry.end_document,
                "shard": entry.shard.to_json(), "carry": entry.carry}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
        self._entries[(entry.split, entry.index)] = entry

    def remove(self) -> None:
        """Delete the journal (after the manifest is written)."""
        self.path.unlink(missing_ok=True)
