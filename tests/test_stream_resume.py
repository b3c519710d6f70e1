"""Resume equality: stop at step k, save the position, resume on the same or another DP size (and worker
count, and global batch size) and get the uninterrupted run's token stream, token for token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_stream_core import SEQ_LEN, full_rows, synthetic_shards, write_token_folder

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.stream import TokenStream

GLOBAL_BATCH = 32
SEED = 11
TOTAL_STEPS = 60  # about nine epochs of the folder below (207 windows each): resumes land mid-epoch


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shards = synthetic_shards(1, [[30, 25], [40], [20, 22, 18]])
    return write_token_folder(tmp_path_factory.mktemp("resume"), {"train": shards})


def make(folder: Path, dp_rank: int = 0, dp_size: int = 1, workers: int = 0,
         global_batch: int = GLOBAL_BATCH) -> TokenStream:
    return TokenStream(folder, "train", SEQ_LEN, global_batch_size=global_batch, seed=SEED, dp_rank=dp_rank,
                       dp_size=dp_size, num_workers=workers, shuffle_block=16, position_ids=True)


def run(folder: Path, dp_size: int, workers: int, steps: int, state: dict | None = None,
        global_batch: int = GLOBAL_BATCH) -> tuple[np.ndarray, dict]:
    """``steps`` steps on every rank of a ``dp_size`` layout (iterators stopped early, as a crash would),
    from ``state``; returns the global rows in order and the (identical) state every rank would save."""
    per_rank, states = [], []
    for rank in range(dp_size):
        stream = make(folder, rank, dp_size, workers, global_batch)
        if state is not None:
            stream.load_state_dict(state)
        per_rank.append([full_rows(batch) for _, batch in zip(range(steps), stream)])
        states.append(json.loads(json.dumps(stream.state_dict())))
    assert all(s == states[0] for s in states)
    rows = [np.concatenate([per_rank[r][s] for r in range(dp_size)]) for s in range(steps)]
    return np.concatenate(rows), states[0]


@pytest.fixture(scope="module")
def uninterrupted(folder: Path) -> np.ndarray:
    assert TOTAL_STEPS * GLOBAL_BATCH > 2 * make(folder).windows_per_epoch[0]
    return run(folder, 1, 0, TOTAL_STEPS)[0]


@pytest.mark.parametrize("legs", [
    [(4, 2, 23), (4, 0, TOTAL_STEPS)],                     # same DP size
    [(4, 2, 17), (2, 1, 41), (1, 0, TOTAL_STEPS)],         # 4 -> 2 -> 1, after losing nodes
    [(1, 1, 17), (2, 2, 41), (4, 0, TOTAL_STEPS)],         # and growing back
])
def test_resume_continues_the_same_stream(folder: Path, uninterrupted: np.ndarray,
                                          legs: list[tuple[int, int, int]]) -> None:
    """Each leg (dp_size, loader workers, stop step) resumes from the state the previous one saved."""
    pieces, state, done = [], None, 0
    for dp_size, workers, stop in legs:
        rows, state = run(folder, dp_size, workers, stop - done, state)
        assert state["consumed_sequences"] == stop * GLOBAL_BATCH
        pieces.append(rows)
        done = stop
    assert np.array_equal(np.concatenate(pieces), uninterrupted)


def test_resume_with_another_global_batch_size(folder: Path, uninterrupted: np.ndarray) -> None:
    first, state = run(folder, 2, 1, 10)
    rest, _ = run(folder, 4, 0, 20, state, global_batch=16)  # 20 half-size steps = 10 full steps
    assert np.array_equal(np.concatenate([first, rest]), uninterrupted[:20 * GLOBAL_BATCH])


def test_position_is_what_was_handed_out(folder: Path) -> None:
    stream = make(folder, workers=2)
    iterator = iter(stream)
    for _ in range(3):
        next(iterator)
    assert stream.state_dict()["consumed_sequences"] == 3 * GLOBAL_BATCH  # prefetched batches do not count
    stream.load_state_dict({**stream.state_dict(), "consumed_sequences": 0})
    with pytest.raises(DataError, match="new iterator"):
        next(iterator)
    assert np.array_equal(full_rows(next(iter(stream))), full_rows(make(folder).batch_for_step(0)))


def test_state_of_another_stream_is_rejected(folder: Path, tmp_path: Path) -> None:
    state = make(folder).state_dict()
    for key, value in [("seed", SEED + 1), ("seq_len", SEQ_LEN * 2), ("split", "validation"),
                       ("shuffle_block", 7)]:
        with pytest.raises(DataError, match=f"{key}={value!r}"):
            make(folder).load_state_dict({**state, key: value})
    other = write_token_folder(tmp_path / "other", {"train": synthetic_shards(2, [[30, 25], [40]])})
    with pytest.raises(DataError, match="datasets="):
        make(other).load_state_dict(state)
    with pytest.raises(DataError, match="consumed_sequences=-1"):
        make(folder).load_state_dict({**state, "consumed_sequences": -1})
