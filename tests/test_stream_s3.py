"""The same reader over s3:// (a real S3-compatible server on loopback: moto's server mode, see conftest.py)
gives the same batches as over the local folder, with and without loader workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_stream_core import SEQ_LEN, synthetic_shards, write_token_folder

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.manifest import read_manifest
from triarch.data_pipeline.stream import TokenStream

BUCKET = "triarch-stream-test"
STEPS = 12


@pytest.fixture(scope="module")
def folders(s3_server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Two prepared folders (current format, and format 1 whose batch counts come from the files), each
    uploaded to the bucket: name -> (local path, s3 URL)."""
    root = tmp_path_factory.mktemp("s3")
    shards = synthetic_shards(7, [[40, 30], [50], [20, 25, 30]])
    local = {"current": write_token_folder(root / "current", {"train": shards}),
             "format1": write_token_folder(root / "format1", {"train": shards}, format_version=1)}
    s3_server.create_bucket(BUCKET)
    fs = s3_server.filesystem()
    out = {}
    for name, path in local.items():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            fs.put_file(str(file), f"{BUCKET}/{name}/{file.relative_to(path).as_posix()}")
        out[name] = (path, f"s3://{BUCKET}/{name}")
    assert fs.exists(f"{BUCKET}/current/train/shard_00002.arrow")
    return out


def batches(url: str | Path, storage_options: dict | None, workers: int, dp_rank: int = 0,
            dp_size: int = 1) -> list[dict[str, torch.Tensor]]:
    stream = TokenStream(url, "train", SEQ_LEN, global_batch_size=8, seed=6, dp_rank=dp_rank, dp_size=dp_size,
                         num_workers=workers, shuffle_block=16, position_ids=True, storage_options=storage_options)
    return list(stream.batches(STEPS))


@pytest.mark.parametrize("name", ["current", "format1"])
@pytest.mark.parametrize("workers", [0, 2])
def test_s3_batches_equal_local_batches(s3_server, folders, name: str, workers: int) -> None:
    local, url = folders[name]
    expected = batches(local, None, 0, dp_rank=1, dp_size=2)
    got = batches(url, s3_server.storage_options, workers, dp_rank=1, dp_size=2)
    assert len(got) == STEPS
    for a, b in zip(expected, got):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_s3_reads_only_record_batches_it_needs(s3_server, folders) -> None:
    _, url = folders["current"]
    stream = TokenStream(url, "train", SEQ_LEN, global_batch_size=2, shuffle=False,
                         storage_options=s3_server.storage_options)
    stream.batch_for_step(0)  # the first 2 windows lie in the first record batch of the first shard
    assert stream.sources[0].cache_info() == {"batches": 1, "bytes": 4 * stream.sources[0].batch_starts(0)[1],
                                               "open_shards": 1}


def test_missing_s3_folder_is_a_one_line_error(s3_server) -> None:
    with pytest.raises(DataError, match=f"no manifest at s3://{BUCKET}/absent/manifest.json"):
        TokenStream(f"s3://{BUCKET}/absent", "train", SEQ_LEN, global_batch_size=8,
                    storage_options=s3_server.storage_options)
    with pytest.raises(DataError, match=f"no manifest at s3://{BUCKET}/absent/manifest.json"):
        read_manifest(f"s3://{BUCKET}/absent", storage_options=s3_server.storage_options)


def test_one_manifest_reader_for_local_and_s3(s3_server, folders) -> None:
    options = s3_server.storage_options
    for name in ("current", "format1"):
        local, url = folders[name]
        assert read_manifest(url, storage_options=options, accept_v1=True) == read_manifest(local, accept_v1=True)
    with pytest.raises(DataError, match=f"s3://{BUCKET}/format1/manifest.json: format 'triarch.tokens' version 1"):
        read_manifest(folders["format1"][1], storage_options=options)  # prepare rewrites a format-1 folder


def test_blend_across_local_and_s3(s3_server, folders) -> None:
    local, url = folders["current"]
    mixed = TokenStream([(local, 1), (url, 1)], "train", SEQ_LEN, global_batch_size=8,
                        storage_options=s3_server.storage_options)
    local_only = TokenStream([(local, 1), (local, 1)], "train", SEQ_LEN, global_batch_size=8)
    assert np.array_equal(mixed.sequences(0, 200), local_only.sequences(0, 200))
