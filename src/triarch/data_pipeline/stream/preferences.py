"""Preference batches for the alignment stages: a prepared preference folder read back, memory-mapped.

For a *pairs* set each example is, for ``chosen`` and ``rejected``: ``*_input_ids`` = prompt + response,
right-padded with ``pad_id`` to ``max_len``, and ``*_labels`` = the next token at each position where that
next token is a response token (EOS included), ``IGNORE_INDEX`` over the prompt and the padding. For a
*prompts* set: ``prompt_ids`` left-padded to ``max_len`` (generation continues at the right end) and
``prompt_lengths``. Global example ``g`` is ``permutation(g // n)[g % n]`` with ``permutation(e) =
default_rng([seed, e]).permutation(n)``, and a DP rank takes its contiguous rows of each global batch
(``dp_slice_batch``). ``prepare.preferences`` writes the folders.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.preference_format import PROMPTS, read_preference_manifest
from triarch.data_pipeline.split_folders import split_folder
from triarch.labels import IGNORE_INDEX


def _map_columns(file: Path, columns: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Memory-map one shard: per column, (int64 row offsets, uint32 token values), without copying tokens; a
    scalar column (a pair's ``margin``) has one value per row."""
    try:
        table = pa.ipc.open_file(pa.memory_map(str(file), "r")).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"cannot read shard {file}: {str(exc).splitlines()[0]}") from exc
    if table.column_names != columns:
        raise DataError(f"shard {file} has columns {table.column_names}, expected {columns}")
    mapped = {}
    for name in columns:
        chunk = table.column(name).combine_chunks()
        if not pa.types.is_list(chunk.type):
            mapped[name] = (np.arange(len(chunk) + 1, dtype=np.int64), chunk.to_numpy(zero_copy_only=False))
            continue
        offsets = chunk.offsets.to_numpy().astype(np.int64)
        mapped[name] = (offsets - offsets[0], chunk.values.to_numpy(zero_copy_only=True)[offsets[0]:offsets[-1]])
    return mapped


class PreferenceDataset:
    """Padded preference (or prompt) examples of a prepared folder in a seeded order (module docstring)."""

    def __init__(self, path: str | Path, seed: int, *, pad_id: int | None = None) -> None:
        self.path = Path(path)
        self.seed = seed
        manifest = read_preference_manifest(self.path)
        self.kind: str = manifest["kind"]
        self.columns: list[str] = manifest["columns"]
        self.max_len: int = manifest["max_len"]
        self.vocab_size: int = manifest["tokenizer"]["vocab_size"]
        self.eos_id: int = manifest["tokenizer"]["eos_id"]
        self.pad_id: int = manifest["tokenizer"]["pad_id"] if pad_id is None else pad_id
        self._shards = []
        for entry in manifest["shards"]:
            file = self.path / entry["file"]
            if entry["max_token_id"] >= self.vocab_size:
                raise DataError(f"{file} holds token id {entry['max_token_id']} >= vocab_size {self.vocab_size}")
            mapped = _map_columns(file, self.columns)
            if len(mapped["prompt"][0]) - 1 != entry["records"]:
                raise DataError(f"{file} holds {len(mapped['prompt'][0]) - 1} records, manifest says "
                                f"{entry['records']}")
            self._shards.append(mapped)
        self._starts = np.cumsum([0] + [s["records"] for s in manifest["shards"]], dtype=np.int64)
        self.num_records = int(self._starts[-1])
        self.data_sha256 = hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()
        self.consumed = 0

    def __len__(self) -> int:
        """Examples per epoch."""
        return self.num_records

    def record(self, index: int) -> dict[str, np.ndarray]:
        """The stored token ids of example ``index`` (storage order): ``prompt`` [, ``chosen``, ``rejected``]."""
        if not 0 <= index < self.num_records:
            raise DataError(f"example index {index} out of range [0, {self.num_records})")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        row = index - int(self._starts[shard])
        out = {}
        for name, (offsets, values) in self._shards[shard].items():
            part = values[offsets[row]:offsets[row + 1]]
            out[name] = part.astype(np.int64) if part.dtype == np.uint32 else part.copy()
        return out

    def permutation(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_records)

    def examples(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A padded batch of the examples ``indices`` (storage order), shapes (len(indices), max_len)."""
        rows = len(indices)
        if self.kind == PROMPTS:
            ids = np.full((rows, self.max_len), self.pad_id, dtype=np.int64)
            lengths = np.zeros(rows, dtype=np.int64)
            for r, index in enumerate(indices):
                prompt = self.record(index)["prompt"]
                ids[r, self.max_len - len(prompt):] = prompt
                lengths[r] = len(prompt)
            return {"prompt_ids": torch.from_numpy(ids), "prompt_lengths": torch.from_numpy(lengths)}
        out = {}
        records = [self.record(index) for index in indices]
        for side in ("chosen", "rejected"):
            ids = np.full((rows, self.max_len), self.pad_id, dtype=np.int64)
            labels = np.full((rows, self.max_len), IGNORE_INDEX, dtype=np.int64)
            for r, rec in enumerate(records):
                prompt_len, seq_len = len(rec["prompt"]), len(rec["prompt"]) + len(rec[side])
                ids[r, :prompt_len] = rec["prompt"]
                ids[r, prompt_len:seq_len] = rec[side]
                labels[r, prompt_len - 1:seq_len - 1] = rec[side]  # position i predicts token i + 1
            out[f"{side}_input_ids"], out[f"{side}_labels"] = torch.from_numpy(ids), torch.from_numpy(labels)
        if "margin" in self.columns:
            out["margin"] = torch.tensor([float(rec["margin"][0]) for rec in records], dtype=torch.float64)
        return out

    def global_indices(self, start: int, count: int) -> list[int]:
        """Storage indices of global examples ``[start, start + count)`` (across epochs)."""
        if start < 0 or count < 0:
            raise DataError(f"example range start={start}, count={count} must be non-negative")
        out, epoch, perm = [], -1, np.empty(0, dtype=np.int64)
        for g in range(start, start + count):
            e, position = divmod(g, self.num_records)
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            out.append(int(perm[position]))
        return out

    def global_batch(self, step: int, global_batch_size: int) -> dict[str, torch.Tensor]:
        """Step ``step``'s whole batch (examples ``[step * G, (step + 1) * G)``); records the position."""
        if step < 0 or global_batch_size < 1:
            raise DataError(f"step ({step}) must be >= 0 and global_batch_size ({global_batch_size}) >= 1")
        batch = self.examples(self.global_indices(step * global_batch_size, global_batch_size))
        self.consumed = (step + 1) * global_batch_size
        return batch

    def next_global_batch(self, global_batch_size: int) -> dict[str, torch.Tensor]:
        """The next ``global_batch_size`` examples after the consumed position, advancing it."""
        batch = self.examples(self.global_indices(self.consumed, global_batch_size))
        self.consumed += global_batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The reader position plus what must match for it to mean the same examples."""
        return {"consumed": self.consumed, "seed": self.seed, "data_sha256": self.data_sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; another seed or data set is a one-line DataError."""
        for key in ("seed", "data_sha256"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"preference loader state has {key}={state[key]!r} but this dataset has "
                                f"{key}={getattr(self, key)!r}")
        consumed = state.get("consumed")
        if not isinstance(consumed, int) or consumed < 0:
            raise DataError(f"preference loader state has consumed={consumed!r}, expected an int >= 0")
        self.consumed = consumed


def dp_slice(batch: torch.Tensor, dp_rank: int, dp_size: int) -> torch.Tensor:
    """The contiguous rows of ``batch`` that data-parallel rank ``dp_rank`` of ``dp_size`` trains on."""
    rows = batch.shape[0]
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank ({dp_rank}) must be in [0, dp_size ({dp_size}))")
    if rows % dp_size:
        raise DataError(f"global batch of {rows} rows is not divisible by dp_size ({dp_size})")
    per_rank = rows // dp_size
    return batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]


def dp_slice_batch(batch: dict[str, torch.Tensor], dp_rank: int, dp_size: int) -> dict[str, torch.Tensor]:
    """Data-parallel rank ``dp_rank``'s contiguous rows of every field of a global batch."""
    return {name: dp_slice(value, dp_rank, dp_size) for name, value in batch.items()}




class PreferenceStream:
    """Pairs of a prepared *pairs* folder as this DP rank's rows, in the trainer's stream interface.

    A global batch is the next ``global_batch_size`` examples in the dataset's seeded order (counted in
    ``consumed_sequences``); DP rank r takes its contiguous share of pairs. Rows interleave each pair's two
    sequences (row 2i chosen, 2i + 1 rejected; ``objectives.preference``), right-padded to ``seq_len``; batches
    carry ``input_ids``, ``labels`` (response tokens only) and ``example_ids`` (each row's storage index, for
    reference log-probs computed once per example).
    """

    position_ids = False
    rows_per_example = 2

    def __init__(self, path: str | Path, split: str, seq_len: int, *, global_batch_size: int, seed: int,
                 dp_rank: int, dp_size: int, train_split: str = "train") -> None:
        self.folder = split_folder(path, split, train_split=train_split, what="preference")
        self.dataset = PreferenceDataset(self.folder, seed)
        if self.dataset.kind != "pairs":
            raise DataError(f"{self.folder} is a '{self.dataset.kind}' preference set; reward models and DPO "
                            "train on 'pairs' (prompt, chosen, rejected)")
        if self.dataset.max_len > seq_len:
            raise DataError(f"{self.folder} was prepared with max_len {self.dataset.max_len}, more than "
                            f"model.seq_len ({seq_len}); raise model.seq_len or prepare with --max-len {seq_len}")
        if global_batch_size % dp_size:
            raise DataError(f"global batch of {global_batch_size} pairs is not divisible by dp_size ({dp_size})")
        self.seq_len, self.global_batch_size = seq_len, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.local_batch_size = global_batch_size // dp_size  # pairs
        self.vocab_size = self.dataset.vocab_size
        self.has_margin = "margin" in self.dataset.columns
        self.consumed_sequences = 0

    @property
    def windows_per_epoch(self) -> tuple[int, ...]:
        """Examples per epoch (the evaluator's measure of the held-out set)."""
        return (len(self.dataset),)

    def rows_of(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Interleaved, padded rows of the examples ``indices`` (storage order)."""
        pairs = self.dataset.examples(indices)
        width = self.dataset.max_len
        ids = torch.full((2 * len(indices), self.seq_len), self.dataset.pad_id, dtype=torch.int64)
        labels = torch.full((2 * len(indices), self.seq_len), IGNORE_INDEX, dtype=torch.int64)
        ids[:, :width] = torch.stack([pairs["chosen_input_ids"], pairs["rejected_input_ids"]], 1).flatten(0, 1)
        labels[:, :width] = torch.stack([pairs["chosen_labels"], pairs["rejected_labels"]], 1).flatten(0, 1)
        example_ids = torch.tensor(list(indices), dtype=torch.int64).repeat_interleave(2)
        batch = {"input_ids": ids, "labels": labels, "example_ids": example_ids}
        if "margin" in pairs:  # the pair's margin on both of its rows
            batch["margin"] = pairs["margin"].repeat_interleave(2)
        return batch

    def batch_at(self, start: int) -> dict[str, torch.Tensor]:
        """This rank's rows of the global batch that starts at global example ``start``."""
        indices = self.dataset.global_indices(start, self.global_batch_size)
        share = self.local_batch_size
        return self.rows_of(indices[self.dp_rank * share:(self.dp_rank + 1) * share])

    def batch_for_step(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's rows of global batch ``step`` counted from the first example (evaluation)."""
        return self.batch_at(step * self.global_batch_size)

    def batches(self, steps: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The next ``steps`` batches (endless when None) from the consumed position, advancing it."""
        produced = 0
        while steps is None or produced < steps:
            batch = self.batch_at(self.consumed_sequences)
            self.consumed_sequences += self.global_batch_size
            produced += 1
            yield batch

    def placeholder(self) -> dict[str, torch.Tensor]:
        """A batch of this stream's shape for a step that only agrees on another rank's data error."""
        rows = 2 * self.local_batch_size
        labels = torch.full((rows, self.seq_len), IGNORE_INDEX, dtype=torch.int64)
        labels[:, 0] = 0
        batch = {"input_ids": torch.zeros((rows, self.seq_len), dtype=torch.int64), "labels": labels,
                "example_ids": torch.zeros(rows, dtype=torch.int64)}
        if self.has_margin:
            batch["margin"] = torch.zeros(rows, dtype=torch.float64)
        return batch

    def integrity_error(self) -> str | None:
        """Preference shards are checked when opened (record counts, token ids); nothing runs behind."""
        return None

    def wait_integrity(self) -> str | None:
        return None

    def close(self) -> None:
        """Nothing to stop (no background work)."""

    def state_dict(self) -> dict[str, Any]:
        """The position in examples, plus what must match for it to mean the same examples."""
        return {"kind": "preference_pairs", "consumed_sequences": self.consumed_sequences, "seed": self.dataset.seed,
                "data_sha256": self.dataset.data_sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; a state of another reader, seed or data set is a one-line DataError."""
        if state.get("kind") != "preference_pairs":
            raise DataError(f"the saved data position belongs to another reader ({state.get('kind') or 'token stream'}),"
                            f" not to preference pairs; start this run in a new run directory")
        self.dataset.load_state_dict({**state, "consumed": state.get("consumed_sequences")})
        self.consumed_sequences = self.dataset.consumed
