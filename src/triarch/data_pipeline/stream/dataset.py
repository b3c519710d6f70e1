"""The trainer's current reader (legacy order), now reading lazily through ``stream_source.TokenSource``.

Superseded by ``stream.TokenStream``, which adds the shard shuffle, bounded shuffle, blending, workers and
reshard-safe state; this class stays until the trainer moves over, with its order unchanged:

A split is read as one stream of tokens in manifest shard order (every document already ends with EOS),
cut into ``num_sequences = (total_tokens - 1) // seq_len`` windows of ``seq_len + 1`` tokens; window ``i``
starts at ``i * seq_len``, so input ``window[:-1]`` and labels ``window[1:]`` cover the stream once. Global
sequence index ``g`` (counted across epochs) is window ``permutation(epoch)[g % num_sequences]`` of epoch
``g // num_sequences``, with ``permutation(e) = default_rng([seed, e]).permutation(num_sequences)``.
Batches are therefore a pure function of (data, seed, seq_len, step, global batch size), independent of
the data-parallel layout; each DP rank takes its contiguous rows with ``dp_slice``. Shards may hold any
number of record batches; only the record batches a window touches are read (small LRU cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.stream.source import TokenSource

_CACHED_EPOCHS = 2  # a batch spans at most two epochs unless it is larger than an epoch


class PackedTokenDataset:
    """Fixed-length training windows of one split of a prepared folder (see the module docstring)."""

    def __init__(self, path: Path | str, split: str, seq_len: int, seed: int) -> None:
        self.path = Path(path) if "://" not in str(path) else path
        self.split = split
        self.seq_len = seq_len
        self.seed = seed
        if seq_len < 1:
            raise DataError(f"seq_len ({seq_len}) must be at least 1")
        self._source = TokenSource(path, split)
        self.vocab_size: int = self._source.vocab_size
        self.eos_id: int = self._source.eos_id
        self._order = list(range(len(self._source.shard_tokens)))
        self._starts = [0, *np.cumsum(self._source.shard_tokens).tolist()]
        self.total_tokens = self._source.total_tokens
        if self.total_tokens < seq_len + 1:
            raise DataError(f"split {split!r} of {self.path} has {self.total_tokens} tokens, fewer than "
                            f"seq_len + 1 ({seq_len + 1})")
        self.num_sequences = (self.total_tokens - 1) // seq_len
        self.data_sha256 = self._source.data_sha256
        self.consumed_sequences = 0
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        """Windows per epoch."""
        return self.num_sequences

    def permutation(self, epoch: int) -> np.ndarray:
        """The window order of ``epoch`` (a few recent epochs are cached)."""
        perm = self._permutations.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            if len(self._permutations) >= _CACHED_EPOCHS:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = perm
        return perm

    def window(self, index: int) -> np.ndarray:
        """Tokens ``[index * seq_len, index * seq_len + seq_len + 1)`` of the stream as int64 (may cross shards)."""
        if not 0 <= index < self.num_sequences:
            raise DataError(f"window index {index} out of range [0, {self.num_sequences})")
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        self._source.copy_stream_range(self._order, self._starts, index * self.seq_len, out)
        return out

    def sequences(self, start: int, count: int) -> torch.Tensor:
        """Rows for global sequence indices ``[start, start + count)``: int64 of shape (count, seq_len + 1)."""
        if start < 0 or count < 0:
            raise DataError(f"sequence range start={start}, count={count} must be non-negative")
        out = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for row, g in enumerate(range(start, start + count)):
            epoch, position = divmod(g, self.num_sequences)
            window = int(self.permutation(epoch)[position])
            self._source.copy_stream_range(self._order, self._starts, window * self.seq_len, out[row])
        return torch.from_numpy(out)

    def global_batch(self, step: int, global_batch_size: int) -> torch.Tensor:
        """Step ``step``'s whole batch: sequences ``[step * G, (step + 1) * G)``, shape (G, seq_len + 1).

        Records ``(step + 1) * G`` as the consumed position, so ``state_dict`` after serving a step
        resumes at the next one.
        """
        if step < 0 or global_batch_size < 1:
            raise DataError(f"step ({step}) must be >= 0 and global_batch_size ({global_batch_size}) >= 1")
        batch = self.sequences(step * global_batch_size, global_batch_size)
        self.consumed_sequences = (step + 1) * global_batch_size
        return batch

    def next_global_batch(self, global_batch_size: int) -> torch.Tensor:
        """The next ``global_batch_size`` sequences after the consumed position, advancing it."""
        batch = self.sequences(self.consumed_sequences, global_batch_size)
        self.consumed_sequences += global_batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The reader position plus what must match for it to mean the same tokens."""
        return {"consumed_sequences": self.consumed_sequences, "seed": self.seed, "seq_len": self.seq_len,
                "split": self.split, "data_sha256": self.data_sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; a different seed, seq_len, split or data is a one-line DataError."""
        for key in ("seed", "seq_len", "split", "data_sha256"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"data loader state has {key}={state[key]!r} but this dataset has "
                                f"{key}={getattr(self, key)!r}")
        consumed = state.get("consumed_sequences")
        if not isinstance(consumed, int) or consumed < 0:
            raise DataError(f"data loader state has consumed_sequences={consumed!r}, expected an int >= 0")
        self.consumed_sequences = consumed


def dp_slice(batch: torch.Tensor, dp_rank: int, dp_size: int) -> torch.Tensor:
    """The contiguous rows of ``batch`` that data-parallel rank ``dp_rank`` of ``dp_size`` trains on."""
    rows = batch.shape[0]
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank ({dp_rank}) must be in [0, dp_size ({dp_size}))")
    if rows % dp_size:
        raise DataError(f"global batch of {rows} rows is not divisible by dp_size ({dp_size})")
    per_rank = rows // dp_size
    return batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
