"""SFT batches: a prepared SFT folder read back memory-mapped, whole examples packed into rows.

Order: epoch ``e`` visits the examples in ``default_rng([seed, e]).permutation(n)`` (storage order with
``shuffle=False``). Packing: greedily, in that order, into rows of ``seq_len`` tokens; an example that does
not fit in the rest of the current row starts a new row (an example is never split across rows), and one
longer than ``seq_len`` is cut to its first ``seq_len`` tokens (counted in ``truncated_examples``). An
epoch ends with its last, partly filled row, so epochs hold different numbers of rows; each epoch's row
boundaries are computed once, when first needed (one pass over the example lengths).

Global row ``g`` is row ``g - rows_before(e)`` of the epoch ``e`` it falls in; step ``s`` is global rows
``[s·G, (s+1)·G)``, built the same way for any DP size, and DP rank ``r`` of ``R`` takes rows
``[s·G + r·G/R, s·G + (r+1)·G/R)``. The whole reader state is the number of consumed rows
(``consumed_sequences``, as for ``TokenStream``), so a resumed run (on any DP size) continues exactly.

Per row: ``input_ids`` (the examples, then ``pad_id``), ``labels`` (position ``i`` holds token ``i + 1`` when
that token belongs to the same example and is trained, mask 1; else ``IGNORE_INDEX``: nothing is learned
across an example boundary or on padding) and ``position_ids`` (0 at each example start; the padding counts
from 0 as a document of its own, so document-masked attention keeps every example to itself).
``prepare.sft`` writes the folders (``sft_format`` has the layout).
"""

from __future__ import annotations

import hashlib
import itertools
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.sft_format import COLUMNS, read_sft_manifest
from triarch.data_pipeline.split_folders import split_folder
from triarch.data_pipeline.stream.preferences import _map_columns
from triarch.data_pipeline.stream.shard_check import VERIFY_MODES, HashJob, ShardHasher, VerifyMode, advice, check_sizes
from triarch.labels import IGNORE_INDEX

STATE_VERSION = 1
KEPT_EPOCH_PACKINGS = 2  # a step's rows lie in at most two consecutive epochs (more only for tiny epochs)
_IDENTITY_KEYS = ("kind", "split", "seq_len", "seed", "shuffle", "data_sha256")


class SFTStream:
    """This DP rank's view of the run's packed SFT rows; see the module docstring.

    Mirrors what the trainer uses of ``TokenStream``: ``batches(n)``, ``batch_for_step(s)``,
    ``state_dict()`` / ``load_state_dict()``, ``consumed_sequences`` (rows), ``windows_per_epoch`` (rows of
    epoch 0), ``integrity_error()`` / ``wait_integrity()`` / ``close()``, ``vocab_size``, ``seq_len``,
    ``local_batch_size``, ``position_ids``. ``path`` is a local folder written by ``prepare_sft``.
    """

    def __init__(self, path: str | Path, split: str, seq_len: int, *, global_batch_size: int, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True, position_ids: bool = True,
                 verify: VerifyMode = "local") -> None:
        _check(seq_len >= 2, f"seq_len ({seq_len}) must be at least 2")
        _check(seed >= 0, f"seed ({seed}) must be >= 0")
        _check(global_batch_size >= 1, f"global_batch_size ({global_batch_size}) must be at least 1")
        _check(dp_size >= 1 and 0 <= dp_rank < dp_size, f"dp_rank ({dp_rank}) must be in [0, dp_size ({dp_size}))")
        _check(global_batch_size % dp_size == 0,
               f"global_batch_size ({global_batch_size}) must be divisible by dp_size ({dp_size})")
        _check(verify in VERIFY_MODES, f"verify ({verify!r}) must be one of {', '.join(VERIFY_MODES)}")
        self.split, self.seq_len, self.seed, self.shuffle = split, seq_len, seed, shuffle
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size
        self.local_batch_size = global_batch_size // dp_size
        self.position_ids, self.verify = position_ids, verify
        self.folder = split_folder(path, split, what="SFT")
        manifest = read_sft_manifest(self.folder)
        tokenizer = manifest["tokenizer"]
        self.vocab_size: int = tokenizer["vocab_size"]
        self.eos_id: int = tokenizer["eos_id"]
        self.pad_id: int = tokenizer["pad_id"]
        self._entries = manifest["shards"]
        self.max_token_id = max(int(e["max_token_id"]) for e in self._entries)
        if max(self.max_token_id, self.pad_id) >= self.vocab_size:
            raise DataError(f"{self.folder} holds token id {max(self.max_token_id, self.pad_id)} >= vocab_size "
                            f"{self.vocab_size}")
        check_sizes(LocalFileSystem(), str(self.folder.resolve()), str(self.folder), self._entries)
        self._shards = [self._map(entry) for entry in self._entries]
        self._starts = np.cumsum([0] + [e["records"] for e in self._entries], dtype=np.int64)
        self.num_examples = int(self._starts[-1])
        _check(self.num_examples > 0, f"{self.folder} holds no examples")
        lengths = np.concatenate([np.diff(s["tokens"][0]) for s in self._shards])
        self.truncated_examples = int((lengths > seq_len).sum())
        self._lengths = np.minimum(lengths, seq_len)
        self.data_sha256 = hashlib.sha256("".join(e["sha256"] for e in self._entries).encode()).hexdigest()
        self.consumed_sequences = 0
        self._rows_before = [0]  # rows of the epochs before epoch e, for e = 0 .. (epochs packed so far)
        self._packings: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._positions = np.arange(seq_len, dtype=np.int64)
        self._hasher = ShardHasher()
        self._watched = False

    def _map(self, entry: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """One shard memory-mapped and checked against its manifest entry."""
        file = self.folder / entry["file"]
        mapped = _map_columns(file, list(COLUMNS))
        offsets = mapped["tokens"][0]
        if len(offsets) - 1 != entry["records"]:
            raise DataError(f"{file} holds {len(offsets) - 1} records, the manifest says {entry['records']}")
        if not np.array_equal(offsets, mapped["mask"][0]):
            raise DataError(f"{file} has a mask whose lengths differ from its tokens'; {advice(str(self.folder))}")
        return mapped

    # --- examples and packing ------------------------------------------------------------------------

    def __len__(self) -> int:
        """Examples per epoch."""
        return self.num_examples

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, mask) of example ``index`` (storage order), as stored (not cut to ``seq_len``)."""
        _check(0 <= index < self.num_examples, f"example index {index} out of range [0, {self.num_examples})")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        row = index - int(self._starts[shard])
        (offsets, tokens), (_, mask) = self._shards[shard]["tokens"], self._shards[shard]["mask"]
        return tokens[offsets[row]:offsets[row + 1]], mask[offsets[row]:offsets[row + 1]]

    def permutation(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``."""
        if not self.shuffle:
            return np.arange(self.num_examples, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def _pack(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, row starts) of ``epoch``: row r holds ``order[starts[r]:starts[r + 1]]``."""
        packed = self._packings.get(epoch)
        if packed is not None:
            self._packings.move_to_end(epoch)
            return packed
        order = self.permutation(epoch)
        starts, used, seq_len = [0], 0, self.seq_len
        for i, length in enumerate(self._lengths[order].tolist()):
            if used + length > seq_len:
                starts.append(i)
                used = 0
            used += length
        starts.append(len(order))
        packed = (order, np.asarray(starts, dtype=np.int64))
        self._packings[epoch] = packed
        if len(self._packings) > KEPT_EPOCH_PACKINGS:
            self._packings.popitem(last=False)
        return packed

    def _locate(self, row: int) -> tuple[int, int]:
        """(epoch, row within it) of global row ``row``."""
        while self._rows_before[-1] <= row:
            epoch = len(self._rows_before) - 1
            self._rows_before.append(self._rows_before[-1] + len(self._pack(epoch)[1]) - 1)
        epoch = bisect_right(self._rows_before, row) - 1
        return epoch, row - self._rows_before[epoch]

    def rows_in_epoch(self, epoch: int) -> int:
        """Packed rows of ``epoch``."""
        return len(self._pack(epoch)[1]) - 1

    @property
    def windows_per_epoch(self) -> tuple[int, ...]:
        """Rows of epoch 0 (one dataset; later shuffled epochs may pack into a few rows more or fewer)."""
        return (self.rows_in_epoch(0),)

    def row_examples(self, row: int) -> np.ndarray:
        """Storage indices of the examples packed into global row ``row``, in row order."""
        _check(row >= 0, f"row ({row}) must be >= 0")
        epoch, local = self._locate(row)
        order, starts = self._pack(epoch)
        return order[starts[local]:starts[local + 1]]

    @property
    def consumed_examples(self) -> int:
        """Examples (across epochs) in the rows consumed so far."""
        epoch, local = self._locate(self.consumed_sequences)
        return epoch * self.num_examples + int(self._pack(epoch)[1][local])

    def rows(self, start: int, count: int) -> dict[str, torch.Tensor]:
        """Global rows ``[start, start + count)`` as a batch (``input_ids``, ``labels``, ``position_ids``)."""
        _check(start >= 0 and count >= 0, f"row range start={start}, count={count} must be non-negative")
        shape = (count, self.seq_len)
        ids = np.full(shape, self.pad_id, dtype=np.int64)
        labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
        positions = np.empty(shape, dtype=np.int64)
        for r in range(count):
            column = 0
            for index in self.row_examples(start + r).tolist():
                tokens, mask = self.example(index)
                tokens, mask = tokens[:self.seq_len].astype(np.int64), mask[:self.seq_len]
                end = column + len(tokens)
                ids[r, column:end] = tokens
                labels[r, column:end - 1] = np.where(mask[1:] != 0, tokens[1:], IGNORE_INDEX)
                positions[r, column:end] = self._positions[:len(tokens)]
                column = end
            positions[r, column:] = self._positions[:self.seq_len - column]
        if count and int(ids.max()) > max(self.max_token_id, self.pad_id):
            self._raise_bad_id(start, count)
        batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if self.position_ids:
            batch["position_ids"] = torch.from_numpy(positions)
        return batch

    def _raise_bad_id(self, start: int, count: int) -> None:
        """Name the shard and record of the first id above the manifest's ``max_token_id`` in these rows."""
        for row in range(start, start + count):
            for index in self.row_examples(row).tolist():
                tokens = self.example(index)[0][:self.seq_len]
                if len(tokens) and int(tokens.max()) > self.max_token_id:
                    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
                    raise DataError(f"{self.folder / self._entries[shard]['file']} record "
                                    f"{index - int(self._starts[shard])} holds token id {int(tokens.max())}, above "
                                    f"the manifest's max_token_id {self.max_token_id}; {advice(str(self.folder))}")

    # --- steps, iteration and position ---------------------------------------------------------------

    def batch_at(self, start: int) -> dict[str, torch.Tensor]:
        """This rank's rows of the global batch that begins at global row ``start``."""
        self._watch()
        return self.rows(start + self.dp_rank * self.local_batch_size, self.local_batch_size)

    def batch_for_step(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's part of step ``step``: global rows ``[step·G, (step+1)·G)`` (position unchanged)."""
        _check(step >= 0, f"step ({step}) must be >= 0")
        return self.batch_at(step * self.global_batch_size)

    def global_batch(self, step: int) -> dict[str, torch.Tensor]:
        """All ranks' rows of step ``step`` (position unchanged); DP rank r's part is its contiguous slice."""
        return self.rows(step * self.global_batch_size, self.global_batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.batches()

    def batches(self, steps: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the current position on (``steps`` of them, or forever), advancing the position as
        each is handed out."""
        start, size = self.consumed_sequences, self.global_batch_size
        firsts = itertools.count(start, size) if steps is None else range(start, start + steps * size, size)
        for first in firsts:
            batch = self.batch_at(first)
            if first != self.consumed_sequences:
                raise DataError(f"stream position moved to {self.consumed_sequences} while an iterator was "
                                f"at {first}; start a new iterator after load_state_dict")
            self.consumed_sequences += size
            yield batch

    def _watch(self) -> None:
        """Hash every shard in the background, once, from the first read on (every epoch reads them all)."""
        if self._watched or self.verify == "off":
            return
        self._watched = True
        fs, url = LocalFileSystem(), str(self.folder)
        for entry in self._entries:
            path = self.folder / entry["file"]
            self._hasher.submit(HashJob(fs, str(path), str(path), url, entry["sha256"], entry.get("bytes")))

    def integrity_error(self) -> str | None:
        """The first background hash mismatch found so far (None if none)."""
        return self._hasher.error

    def wait_integrity(self) -> str | None:
        """Finish the background hash checks started so far; the first mismatch (or None)."""
        return self._hasher.wait()

    def close(self) -> None:
        """Stop the background hash checks (a hash in progress is abandoned); reading still works."""
        self._hasher.close()

    def _identity(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same rows."""
        return {"kind": "sft", "split": self.split, "seq_len": self.seq_len, "seed": self.seed,
                "shuffle": self.shuffle, "data_sha256": self.data_sha256}

    def state_dict(self) -> dict[str, Any]:
        """The position (consumed global rows) plus the stream's identity; JSON-able."""
        return {"version": STATE_VERSION, "consumed_sequences": self.consumed_sequences, **self._identity()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state``'s position; a state of another stream (dataset, seed, ...) is a one-line
        DataError."""
        mine = self._identity()
        if state.get("kind") != "sft":
            raise DataError(f"data loader state is not an SFT stream's (kind={state.get('kind')!r}); "
                            f"it was saved by another data loader")
        for key in _IDENTITY_KEYS:
            if state.get(key) != mine[key]:
                raise DataError(f"data loader state has {key}={state.get(key)!r} but this stream has "
                                f"{key}={mine[key]!r}")
        consumed = state.get("consumed_sequences")
        if not isinstance(consumed, int) or isinstance(consumed, bool) or consumed < 0:
            raise DataError(f"data loader state has consumed_sequences={consumed!r}, expected an int >= 0")
        self.consumed_sequences = consumed


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DataError(message)
