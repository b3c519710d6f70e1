"""Weighted blending: exact proportions, smooth interleave, each dataset's own epochs, one stream on any layout."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_stream_core import SEQ_LEN, epoch_windows, sorted_rows, synthetic_shards, write_token_folder

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.stream import TokenStream
from triarch.data_pipeline.stream.blend import BlendSchedule, largest_remainder

SEQUENCES = 10_000
RANGES = [(1, 300), (300, 600), (600, 1000)]  # dataset d's tokens (besides EOS) lie in RANGES[d]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("blend")
    layouts = [[[30, 20], [25]], [[60], [40, 35]], [[15], [10], [20]]]
    return [write_token_folder(root / f"d{d}", {"train": synthetic_shards(10 + d, layout, *RANGES[d])})
            for d, layout in enumerate(layouts)]


def dataset_of(row: np.ndarray) -> int:
    """Which dataset a window came from, from its tokens alone."""
    body = row[row != 0]
    (d,) = {next(i for i, (lo, hi) in enumerate(RANGES) if lo <= t < hi) for t in body.tolist()}
    return d


@pytest.mark.parametrize("weights", [(5, 3, 2), (1, 2, 4), (0.7, 0.2, 0.1)])
def test_proportions_within_one_percent_over_10k_sequences(folders: list[Path], weights: tuple) -> None:
    stream = TokenStream(list(zip(folders, weights)), "train", SEQ_LEN, global_batch_size=16, seed=4)
    rows = stream.sequences(0, SEQUENCES)
    counts = Counter(dataset_of(row) for row in rows)
    total = sum(weights)
    for d, weight in enumerate(weights):
        assert abs(counts[d] / SEQUENCES - weight / total) < 0.01 * weight / total
    assert [stream.origin(g)[0] for g in range(SEQUENCES)] == [dataset_of(row) for row in rows]


def test_interleave_is_smooth(folders: list[Path]) -> None:
    stream = TokenStream([(folders[0], 1), (folders[1], 2), (folders[2], 4)], "train", SEQ_LEN,
                         global_batch_size=16)
    labels = np.array([stream.origin(g)[0] for g in range(SEQUENCES)])
    for start in range(0, SEQUENCES - 70, 70):
        window = Counter(labels[start:start + 70].tolist())
        assert all(abs(window[d] - 70 * w / 7) <= 2 for d, w in enumerate((1, 2, 4)))


def test_each_dataset_runs_its_own_epochs(folders: list[Path]) -> None:
    """Dataset d's sequences in the blend, in order, cover each of its epochs exactly once."""
    stream = TokenStream([(f, 1) for f in folders], "train", SEQ_LEN, global_batch_size=16, seed=8,
                         shuffle_block=8)
    rows = stream.sequences(0, 3000)
    for d, folder in enumerate(folders):
        mine = rows[[stream.origin(g)[0] == d for g in range(3000)]]
        windows = stream.windows_per_epoch[d]
        assert len(mine) > 2 * windows
        for epoch in range(2):
            expected, _ = epoch_windows(folder, "train", stream.shard_order(epoch, d), SEQ_LEN)
            assert np.array_equal(sorted_rows(mine[epoch * windows:(epoch + 1) * windows]), sorted_rows(expected))


def test_blend_is_the_same_on_every_layout(folders: list[Path]) -> None:
    specs = [(folders[0], 3), (folders[2], 1)]
    single = TokenStream(specs, "train", SEQ_LEN, global_batch_size=16, seed=2)
    ranks = [TokenStream(specs, "train", SEQ_LEN, global_batch_size=16, seed=2, dp_rank=r, dp_size=4,
                         num_workers=1) for r in range(4)]
    per_rank = [[b["input_ids"] for b in r.batches(5)] for r in ranks]
    for step in range(5):
        whole = np.concatenate([per_rank[r][step].numpy() for r in range(4)])
        assert np.array_equal(whole, single.batch_for_step(step)["input_ids"].numpy())


def test_schedule_arithmetic() -> None:
    assert largest_remainder([1, 2, 4], 1000).tolist() == [143, 286, 571]
    assert largest_remainder([1, 1, 1], 10).tolist() == [4, 3, 3]
    schedule = BlendSchedule([1, 3], 8)
    assert schedule.pattern.tolist() == [1, 0, 1, 1, 1, 0, 1, 1]
    assert [schedule.locate(g) for g in (0, 1, 8, 13)] == [(1, 0), (0, 0), (1, 6), (0, 3)]
    with pytest.raises(DataError, match="raise blend_block"):
        BlendSchedule([1, 10_000], 100)
    with pytest.raises(DataError, match="positive"):
        BlendSchedule([1, 0], 100)
