"""The training token stream: blended, shuffled, packed windows, split across DP ranks and loader workers.

The stream is a pure function of (datasets and weights, split, seq_len, seed, shuffle settings):
global sequence g is dataset d's sequence k (``blend.BlendSchedule``), which is window w of epoch e of d
(``index.EpochLayout``), which is T + 1 consecutive tokens of that epoch's shard-order stream. Step s of a
run is global sequences [s·G, (s+1)·G); DP rank r of R reads rows [r·G/R, (r+1)·G/R) of it. Loader worker
w of W produces messages m ≡ w (mod W) of a few consecutive steps each, which a DataLoader hands back in
order. The number of ranks and workers therefore never changes which tokens come next: the whole reader
state is the count of consumed global sequences, so a run resumed on another DP size (or global batch
size) continues the same stream — no sequence twice, none skipped.

Reading: a step's windows lie in one shuffle block (two at a block boundary); each block is a
``span.Span`` (one uint32 buffer, copied from memory-mapped local shards, or lazily from the remote
record batches this rank's windows touch) whose windows are rows of a strided view. A step inside the
block read last (nearly every step) is one slice of the block's permutation and one fancy index into a
fresh uint32 array, cast once into the int64 ``input_ids`` and ``labels``. Memory per dataset: two blocks
(default 2M tokens each, 8 MiB; more only if a rank's rows outnumber a block's windows) plus two mapped
shards or a small record-batch cache, whatever the dataset's size.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.stream.blend import BlendSchedule
from triarch.data_pipeline.stream.guard import StreamGuard
from triarch.data_pipeline.stream.index import EpochLayout
from triarch.data_pipeline.stream.shard_check import VERIFY_MODES, VerifyMode
from triarch.data_pipeline.stream.source import TokenSource
from triarch.data_pipeline.stream.span import Span

DEFAULT_SHUFFLE_TOKENS = 1 << 21  # default shuffle block: this many tokens' worth of windows (8 MiB of uint32)
BATCH_CACHE_BYTES = 4 << 20  # record batches are copied into block spans; this cache only bridges blocks
DEFAULT_BLEND_BLOCK = 1000
STATE_VERSION = 1
WORKER_MESSAGE_TOKENS = 1 << 16  # a loader worker sends about this many tokens (whole steps) per message
_IDENTITY_KEYS = ("split", "seq_len", "seed", "shuffle", "shuffle_block", "blend_block", "datasets")

DatasetSpec = str | Path | tuple[str | Path, float]


def _parse_datasets(datasets: DatasetSpec | Sequence[DatasetSpec]) -> list[tuple[str, float]]:
    """``path`` or ``[(path, weight), ...]`` (a bare path in a list has weight 1) -> [(url, weight)]."""
    if isinstance(datasets, (str, Path)) or (isinstance(datasets, tuple) and len(datasets) == 2
                                             and isinstance(datasets[1], (int, float))):
        datasets = [datasets]
    parsed = []
    for item in datasets:
        url, weight = (item, 1.0) if isinstance(item, (str, Path)) else item
        parsed.append((str(url), float(weight)))
    if not parsed:
        raise DataError("a token stream needs at least one dataset")
    return parsed


def document_positions(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """Position ids that count from 0 at each row start and restart after every EOS token."""
    index = np.arange(inputs.shape[1], dtype=np.int64)
    starts = np.zeros(inputs.shape, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = inputs[:, :-1] == eos_id
    return index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)


class TokenStream:
    """This DP rank's view of the run's global token stream; see the module docstring.

    ``datasets`` is one prepared folder (path or fsspec URL) or a list of ``(folder, weight)``.
    ``batch_for_step(s)`` reads step ``s`` directly; iterating yields the steps from the current position
    (through a DataLoader with ``num_workers`` prefetching workers when > 0) and advances it as each batch
    is handed out. ``state_dict()`` after handing out step s makes a later ``load_state_dict`` resume at
    step s + 1, on any DP size.
    """

    def __init__(self, datasets: DatasetSpec | Sequence[DatasetSpec], split: str, seq_len: int, *,
                 global_batch_size: int, seed: int = 0, dp_rank: int = 0, dp_size: int = 1,
                 num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False,
                 shuffle: bool = True, shuffle_block: int | None = None,
                 blend_block: int = DEFAULT_BLEND_BLOCK, position_ids: bool = False,
                 cache_bytes: int = BATCH_CACHE_BYTES, storage_options: Mapping[str, Any] | None = None,
                 verify: VerifyMode = "local") -> None:
        _check(seq_len >= 1, f"seq_len ({seq_len}) must be at least 1")
        _check(seed >= 0, f"seed ({seed}) must be >= 0")
        _check(global_batch_size >= 1, f"global_batch_size ({global_batch_size}) must be at least 1")
        _check(dp_size >= 1 and 0 <= dp_rank < dp_size, f"dp_rank ({dp_rank}) must be in [0, dp_size ({dp_size}))")
        _check(global_batch_size % dp_size == 0,
               f"global_batch_size ({global_batch_size}) must be divisible by dp_size ({dp_size})")
        _check(num_workers >= 0, f"num_workers ({num_workers}) must be >= 0")
        if shuffle_block is None:
            shuffle_block = max(1, DEFAULT_SHUFFLE_TOKENS // seq_len)
        _check(shuffle_block >= 1, f"shuffle_block ({shuffle_block}) must be at least 1")
        _check(verify in VERIFY_MODES, f"verify ({verify!r}) must be one of {', '.join(VERIFY_MODES)}")
        specs = _parse_datasets(datasets)
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size
        self.local_batch_size = global_batch_size // dp_size
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.shuffle, self.shuffle_block, self.position_ids = shuffle, shuffle_block, position_ids
        self.blend_block = blend_block if len(specs) > 1 else None
        total_weight = sum(w for _, w in specs)
        self.weights = [w / total_weight for _, w in specs]
        self.blend = BlendSchedule([w for _, w in specs], blend_block) if len(specs) > 1 else None
        self.sources = [TokenSource(url, split, storage_options=storage_options, cache_bytes=cache_bytes)
                        for url, _ in specs]
        self._check_sources()
        self.vocab_size, self.eos_id = self.sources[0].vocab_size, self.sources[0].eos_id
        self.layouts = [EpochLayout(s.shard_tokens, seq_len, seed, d, shuffle=shuffle, shuffle_block=shuffle_block)
                        for d, s in enumerate(self.sources)]
        self._spans: OrderedDict[tuple[int, int, int], Span] = OrderedDict()
        self._hot: _Block | None = None  # the one-dataset block read last: the fast path of ``_rows``
        # a step's rows of one dataset lie in 1 + ceil((rows - 1) / B) consecutive blocks; keep them all
        self._span_capacity = len(self.sources) * (2 + self.local_batch_size // shuffle_block)
        self.consumed_sequences = 0
        self.verify = verify
        self.guard = StreamGuard(self.sources, self.layouts, seq_len, verify)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for spawned loader workers) without the filled block spans or the integrity checks' state
        (loader workers only read; the rank's main process checks)."""
        return {**self.__dict__, "_spans": OrderedDict(), "_hot": None, "guard": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.guard = StreamGuard(self.sources, self.layouts, self.seq_len, self.verify)

    def _check_sources(self) -> None:
        first = self.sources[0]
        for source in self.sources:
            if source.tokenizer_sha256 != first.tokenizer_sha256:
                raise DataError(f"{source.url} was prepared with another tokenizer than {first.url} "
                                f"(sha256 {source.tokenizer_sha256} vs {first.tokenizer_sha256}); blended "
                                f"datasets must share one")
            if source.total_tokens < self.seq_len + 1:
                raise DataError(f"split {self.split!r} of {source.url} has {source.total_tokens} tokens, "
                                f"fewer than seq_len + 1 ({self.seq_len + 1})")

    # --- the global stream ---------------------------------------------------------------------------

    @property
    def windows_per_epoch(self) -> tuple[int, ...]:
        """Windows (sequences) in one epoch of each dataset."""
        return tuple(layout.windows for layout in self.layouts)

    def shard_order(self, epoch: int, dataset: int = 0) -> np.ndarray:
        """The order in which ``dataset`` reads its shards (manifest indices) in ``epoch``."""
        return self.layouts[dataset].shard_order(epoch)

    def origin(self, sequence: int) -> tuple[int, int, int]:
        """(dataset, epoch, window) of global sequence ``sequence``."""
        dataset, local = self.blend.locate(sequence) if self.blend else (0, sequence)
        return (dataset, *self.layouts[dataset].locate(local))

    def sequences(self, start: int, count: int, dtype: type = np.int64) -> np.ndarray:
        """Global sequences ``[start, start + count)`` as rows of ``seq_len + 1`` tokens."""
        _check(start >= 0 and count >= 0, f"sequence range start={start}, count={count} must be non-negative")
        return self._rows(start, count).astype(dtype, copy=False)

    def _rows(self, start: int, count: int) -> np.ndarray:
        """Global sequences ``[start, start + count)`` as a new uint32 array of rows (the hot path)."""
        hot = self._hot
        if hot is not None and hot.lo <= start and start + count <= hot.hi:
            return hot.span.rows(hot.windows[start - hot.lo:start - hot.lo + count])
        self._hot = None
        out = np.empty((count, self.seq_len + 1), dtype=np.uint32)
        if self.blend is None:
            self._fill(0, self.layouts[0].locate_range(start, count), out)
            return out
        datasets, local = self.blend.locate_many(np.arange(start, start + count, dtype=np.int64))
        for dataset in range(len(self.sources)):
            rows = np.flatnonzero(datasets == dataset)
            if len(rows):
                part = np.empty((len(rows), self.seq_len + 1), dtype=np.uint32)
                self._fill(dataset, self.layouts[dataset].locate_runs(local[rows]), part)
                out[rows] = part
        return out

    def _fill(self, dataset: int, located: list[tuple[int, int, slice, np.ndarray]], out: np.ndarray) -> None:
        """Rows of ``dataset``'s located windows (runs within one epoch and block) into ``out``; with one
        dataset, the last block read becomes the hot one."""
        for epoch, block, part, windows in located:
            span = self._span(dataset, epoch, block)
            first, _ = self.layouts[dataset].block_windows(block)
            out[part] = span.rows(windows - first)
        if self.blend is None and located:
            epoch, block = located[-1][:2]
            self._hot = _Block(self.layouts[0], epoch, block, self._span(0, epoch, block))

    def _span(self, dataset: int, epoch: int, block: int) -> Span:
        """The tokens of one shuffle block of one epoch of ``dataset``."""
        key = (dataset, epoch, block)
        span = self._spans.get(key)
        if span is None:
            spare = None
            if len(self._spans) >= self._span_capacity:  # reuse the retired buffer: no heap growth
                spare = self._spans.popitem(last=False)[1].buffer
            layout = self.layouts[dataset]
            first, stop = layout.block_windows(block)
            order, starts = layout.stream(epoch)
            span = Span(self.sources[dataset], order, starts, first, stop - first, self.seq_len, buffer=spare)
            self._spans[key] = span
        else:
            self._spans.move_to_end(key)
        return span

    def _local_rows(self, start: int) -> np.ndarray:
        """This rank's rows (uint32) of the global batch that begins at global sequence ``start``."""
        return self._rows(start + self.dp_rank * self.local_batch_size, self.local_batch_size)

    def _as_batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """``input_ids``, ``labels`` (and ``position_ids``) of rows of ``seq_len + 1`` tokens."""
        inputs = rows[:, :-1].astype(np.int64)
        batch = {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(rows[:, 1:].astype(np.int64))}
        if self.position_ids:
            batch["position_ids"] = torch.from_numpy(document_positions(inputs, self.eos_id))
        return batch

    def batch_at(self, start: int) -> dict[str, torch.Tensor]:
        """This rank's rows of the global batch that begins at global sequence ``start``."""
        return self._checked(self._local_rows(start), start)

    def batch_for_step(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's part of step ``step``: global sequences ``[step·G, (step+1)·G)`` (position unchanged)."""
        _check(step >= 0, f"step ({step}) must be >= 0")
        return self.batch_at(step * self.global_batch_size)

    # --- iteration and position ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.batches()

    def batches(self, steps: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the current position on (``steps`` of them, or forever), advancing the position."""
        start, size = self.consumed_sequences, self.global_batch_size
        if self.num_workers == 0:
            firsts = itertools.count(start, size) if steps is None else range(start, start + steps * size, size)
            for first in firsts:
                rows = self._local_rows(first)
                self._advance(first)
                yield self._handed_out(rows, first)
            return
        # each message carries a few steps of compact uint32 rows: far less overhead than a tensor each
        per_message = max(1, WORKER_MESSAGE_TOKENS // (self.local_batch_size * (self.seq_len + 1)))
        chunks = DataLoader(_Steps(self, start, steps, per_message), batch_size=None,
                            num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                            collate_fn=_unchanged)
        try:
            for first, chunk in chunks:
                for i, rows in enumerate(chunk):
                    self._advance(first + i * size)
                    yield self._handed_out(rows, first + i * size)
        except DataError as err:  # from a worker: its message carries the worker's traceback
            raise DataError(_worker_message(err)) from None

    def _advance(self, first: int) -> None:
        """Count the step that begins at global sequence ``first`` as consumed (it must be the next one)."""
        if first != self.consumed_sequences:
            raise DataError(f"stream position moved to {self.consumed_sequences} while an iterator was "
                            f"at {first}; start a new iterator after load_state_dict")
        self.consumed_sequences += self.global_batch_size

    def _handed_out(self, rows: np.ndarray, first: int) -> dict[str, torch.Tensor]:
        batch = self._checked(rows, first)
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch

    def _checked(self, rows: np.ndarray, first: int) -> dict[str, torch.Tensor]:
        """The batch of this rank's ``rows`` of the global batch at ``first``, after the integrity checks:
        its shards queued for hashing, its ids bounded (``guard``)."""
        start = first + self.dp_rank * self.local_batch_size
        self._watch(start, self.local_batch_size)
        self.guard.check_ids(rows, start, self.origin)
        return self._as_batch(rows)

    def _watch(self, start: int, count: int) -> None:
        """Queue the shards of global sequences ``[start, start + count)`` for the background hash check."""
        if self.blend is None:
            self._watch_dataset(0, start, start + count - 1)
            return
        datasets, local = self.blend.locate_many(np.arange(start, start + count, dtype=np.int64))
        for dataset in np.unique(datasets).tolist():
            mine = local[datasets == dataset]  # consecutive sequences of this dataset
            self._watch_dataset(dataset, int(mine.min()), int(mine.max()))

    def _watch_dataset(self, dataset: int, lo: int, hi: int) -> None:
        """Queue the shards of every block that ``dataset``'s sequences ``lo..hi`` lie in."""
        layout = self.layouts[dataset]
        for epoch in range(lo // layout.windows, hi // layout.windows + 1):
            first = max(lo - epoch * layout.windows, 0) // layout.shuffle_block
            last = min(hi - epoch * layout.windows, layout.windows - 1) // layout.shuffle_block
            for block in range(first, last + 1):
                self.guard.watch_block(dataset, epoch, block)

    def integrity_error(self) -> str | None:
        """The first background hash mismatch of a shard this stream read (None if none so far)."""
        return self.guard.error()

    def close(self) -> None:
        """Stop the background hash checks (a hash in progress is abandoned); reading still works."""
        self.guard.close()

    def wait_integrity(self) -> str | None:
        """Finish the background hash checks of every shard read so far; the first mismatch (or None)."""
        return self.guard.wait()

    def _identity(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same tokens."""
        return {"split": self.split, "seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle,
                "shuffle_block": self.shuffle_block, "blend_block": self.blend_block,
                "datasets": [{"data_sha256": s.data_sha256, "weight": w} for s, w in zip(self.sources, self.weights)]}

    def state_dict(self) -> dict[str, Any]:
        """The position (consumed global sequences) plus the stream's identity; JSON-able."""
        return {"version": STATE_VERSION, "consumed_sequences": self.consumed_sequences, **self._identity()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state``'s position; a state of another stream is a one-line DataError."""
        mine = self._identity()
        for key in _IDENTITY_KEYS:
            if key in state and not _same(state[key], mine[key]):
                raise DataError(f"data loader state has {key}={state[key]!r} but this stream has "
                                f"{key}={mine[key]!r}")
        consumed = state.get("consumed_sequences")
        if not isinstance(consumed, int) or isinstance(consumed, bool) or consumed < 0:
            raise DataError(f"data loader state has consumed_sequences={consumed!r}, expected an int >= 0")
        self.consumed_sequences = consumed


class _Block:
    """Shuffle block ``block`` of epoch ``epoch`` of a lone dataset: its sequences ``[lo, hi)`` are the block's
    ``windows`` (block-relative, in stream order) of ``span``."""

    def __init__(self, layout: EpochLayout, epoch: int, block: int, span: Span) -> None:
        first, stop = layout.block_windows(block)
        self.lo = epoch * layout.windows + first
        self.hi = self.lo + stop - first
        self.windows = layout.block_order(epoch, block)
        self.span = span


class _Steps(IterableDataset):
    """Worker w of W produces messages m ≡ w (mod W), each ``per_message`` consecutive steps from ``start``;
    the DataLoader takes its workers' messages round-robin, so steps arrive in order."""

    def __init__(self, stream: TokenStream, start: int, steps: int | None, per_message: int) -> None:
        self.stream, self.start, self.steps, self.per_message = stream, start, steps, per_message

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        size = self.stream.global_batch_size
        for message in itertools.count(worker, workers):
            first_step = message * self.per_message
            count = self.per_message if self.steps is None else min(self.per_message, self.steps - first_step)
            if count <= 0:
                return
            first = self.start + first_step * size
            yield first, np.stack([self.stream._local_rows(first + i * size) for i in range(count)])


def _worker_message(err: DataError) -> str:
    """The original one-line message of a DataError a DataLoader worker raised (the loader re-raises it with
    the worker's traceback in the text)."""
    marker = f"{DataError.__module__}.{DataError.__name__}: "
    lines = str(err).splitlines()
    found = [line.split(marker, 1)[1] for line in lines if marker in line]
    return found[-1] if found else (lines[0] if lines else "DataError in a loader worker")


def _unchanged(item: Any) -> Any:
    """DataLoader collate function that passes worker output through as it is."""
    return item


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DataError(message)


def _same(saved: Any, current: Any) -> bool:
    """Equality that tolerates float round-off in saved blend weights."""
    if isinstance(saved, float) or isinstance(current, float):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (saved, current))
        return numbers and math.isclose(saved, current, rel_tol=1e-9)
    if isinstance(saved, list) and isinstance(current, list):
        return len(saved) == len(current) and all(_same(a, b) for a, b in zip(saved, current))
    if isinstance(saved, dict) and isinstance(current, dict):
        return saved.keys() == current.keys() and all(_same(saved[k], current[k]) for k in saved)
    return saved == current
