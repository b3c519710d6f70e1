"""Damaged shards are caught (issue 15 item 2): real bytes of a real prepared corpus are changed on disk.

(a) an id flipped out of range stops training with one line naming the shard and record, never an
IndexError, also when only one of two ranks reads it; (b) an in-range change is caught by the background
hash; (c) a truncated shard stops the run at start; (d) ``triarch data verify`` on good and bad folders,
local and on S3 (a real S3-compatible server on loopback).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from triarch.data_pipeline import DataError, prepare_pydocs, read_manifest
from triarch.data_pipeline.stream import TokenStream

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SEQ_LEN, GLOBAL_BATCH, SEED = 32, 8, 1234  # the trainer's stream below: SMALL's shape, train.seed's default
SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
         f"model.seq_len={SEQ_LEN}", f"train.global_batch_size={GLOBAL_BATCH}", "train.micro_batch_size=4",
         "train.steps=4", "train.warmup_steps=1", "train.eval_interval=0", "logging.log_interval=1",
         "logging.progress=off", "logging.tensorboard=false"]
EXIT_DATA = 7
BUCKET = "triarch-verify-test"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_pydocs(tmp_path_factory.mktemp("data") / "pydocs", 2048, max_documents=600, shard_tokens=8192,
                          batch_tokens=2048, workers=1, progress=False)


@pytest.fixture
def data(prepared: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared corpus, to damage."""
    return Path(shutil.copytree(prepared, tmp_path / "data"))


def _stream(folder: Path, dp_rank: int = 0, dp_size: int = 1) -> TokenStream:
    return TokenStream(folder, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=SEED, dp_rank=dp_rank,
                       dp_size=dp_size)


def _token_of_first_step(folder: Path, dp_rank: int = 0, dp_size: int = 1) -> tuple[str, int]:
    """(shard file, token offset in it) of the first input token of the rank's first row in step 1."""
    stream = _stream(folder, dp_rank, dp_size)
    dataset, epoch, window = stream.origin(dp_rank * (GLOBAL_BATCH // dp_size))
    order, starts = stream.layouts[dataset].stream(epoch)
    position = window * SEQ_LEN + 1
    index = int(np.searchsorted(starts, position, side="right")) - 1
    return read_manifest(folder)["splits"]["train"]["shards"][order[index]]["file"], position - starts[index]


def _token_location(path: Path, offset: int) -> tuple[int, int, int, int]:
    """(byte position of token ``offset`` in the file, its value, record batch, row in the shard)."""
    raw = pa.py_buffer(path.read_bytes())
    reader = pa.ipc.open_file(pa.BufferReader(raw))
    rows = 0
    for index in range(reader.num_record_batches):
        column = reader.get_batch(index).column("tokens")
        values, offsets = column.values, column.offsets.to_numpy()
        if offset < len(values):
            byte = values.buffers()[1].address - raw.address + 4 * (values.offset + offset)
            row = rows + int(np.searchsorted(offsets, offset, side="right")) - 1
            return byte, int(values[offset].as_py()), index, row
        offset -= len(values)
        rows += len(column)
    raise AssertionError("offset past the shard's tokens")


def _poke(path: Path, byte: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(byte)
        f.write(bytes([value]))


def _train(run_dir: Path, folder: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "triarch.cli", "train", str(EXAMPLES / "tiny.yaml"), "--nproc", str(nproc),
           "--run-dir", str(run_dir), f"data.path={folder}", *SMALL]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == EXIT_DATA, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "IndexError" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_out_of_range_id_names_shard_and_record(data: Path) -> None:
    file, offset = _token_of_first_step(data)
    byte, _, batch, row = _token_location(data / file, offset)
    _poke(data / file, byte + 3, 0x7F)  # the id's high byte: ~2.1e9, far past the 2048-token vocabulary
    stream = _stream(data)
    with pytest.raises(DataError) as caught:
        next(stream.batches(1))
    message = str(caught.value)
    assert message.startswith(f"{data}/{file} record {row} (record batch {batch}, token {offset} of the shard) "
                              f"holds token id ")
    assert "above the manifest's max_token_id" in message and "triarch data verify" in message
    assert "\n" not in message


def test_out_of_range_id_in_one_ranks_batch_stops_both_ranks(data: Path, tmp_path: Path) -> None:
    file, offset = _token_of_first_step(data, dp_rank=1, dp_size=2)
    byte, _, batch, row = _token_location(data / file, offset)
    rank0_file, rank0_offset = _token_of_first_step(data, dp_rank=0, dp_size=2)
    assert (rank0_file, rank0_offset) != (file, offset)
    _poke(data / file, byte + 3, 0x7F)
    result = _train(tmp_path / "run", data, nproc=2)
    line = _one_error_line(result)
    assert line.startswith(f"error: {data}/{file} record {row} (record batch {batch}, token {offset} of the shard)")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or "loss" not in (
        tmp_path / "run" / "metrics.jsonl").read_text()  # no step was applied


def test_in_range_change_is_caught_by_the_hash(data: Path, tmp_path: Path) -> None:
    file, offset = _token_of_first_step(data)
    byte, value, _, _ = _token_location(data / file, offset)
    _poke(data / file, byte, (value & 0xFF) ^ 0x01)  # another id, still inside the vocabulary
    assert _token_location(data / file, offset)[1] != value
    stream = _stream(data)
    next(stream.batches(1))  # the batch itself looks fine ...
    assert stream.wait_integrity().startswith(f"{data}/{file} has sha256 ")  # ... its shard's hash does not
    line = _one_error_line(_train(tmp_path / "run", data))
    assert line.startswith(f"error: {data}/{file} has sha256 ") and ", the manifest says " in line


def test_truncated_shard_stops_at_start(data: Path, tmp_path: Path) -> None:
    shard = read_manifest(data)["splits"]["train"]["shards"][-1]
    with open(data / shard["file"], "r+b") as f:
        f.truncate(shard["bytes"] - 100)
    expected = (f"{data}/{shard['file']} is {shard['bytes'] - 100} bytes, the manifest says {shard['bytes']} "
                f"(truncated or replaced)")
    with pytest.raises(DataError, match=r"is \d+ bytes, the manifest says"):
        _stream(data)
    line = _one_error_line(_train(tmp_path / "run", data))
    assert line.startswith(f"error: {expected}")


def _verify(target: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "triarch.cli", "data", "verify", target], capture_output=True,
                          text=True, timeout=300, env=env)


def _damage_three_ways(folder: Path) -> dict[str, str]:
    """An id out of range, an in-range change, a truncation; returns file -> expected problem prefix."""
    shards = read_manifest(folder)["splits"]["train"]["shards"]
    out_of_range, in_range, truncated = (shards[i]["file"] for i in (0, 1, 2))
    byte, _, batch, row = _token_location(folder / out_of_range, 5)
    _poke(folder / out_of_range, byte + 3, 0x7F)
    byte, value, _, _ = _token_location(folder / in_range, 7)
    _poke(folder / in_range, byte, (value & 0xFF) ^ 0x01)
    with open(folder / truncated, "r+b") as f:
        f.truncate(100)
    return {out_of_range: f"record {row} (record batch {batch}) holds token id ", in_range: "sha256 ",
            truncated: "100 bytes, the manifest says "}


def test_data_verify_good_and_bad_folders(data: Path) -> None:
    shards = len(read_manifest(data)["splits"]["train"]["shards"]) + 1
    good = _verify(str(data))
    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines() == [f"{data}: all {shards} shards good "
                                        f"({read_manifest(data)['totals']['tokens']} tokens; sizes, sha256 and "
                                        f"token ids checked against the manifest)"]
    expected = _damage_three_ways(data)
    bad = _verify(str(data))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    lines = bad.stdout.splitlines()
    assert lines[-1] == f"{data}: 3 of {shards} shards bad"
    assert len(lines) == 4
    for line, (file, problem) in zip(lines, sorted(expected.items())):
        assert line.startswith(f"{data}/{file}: ") and problem in line, line
    missing = _verify(str(data / "nothing_here"))
    assert missing.returncode == 2 and missing.stderr.strip() == (
        f"error: no manifest at {data / 'nothing_here'}/manifest.json (run prepare first)")


def test_data_verify_on_s3(s3_server, data: Path) -> None:
    fs = s3_server.filesystem()
    s3_server.create_bucket(BUCKET)
    for name, folder in (("good", data), ("bad", None)):
        if folder is None:
            _damage_three_ways(data)
            folder = data
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            fs.put_file(str(file), f"{BUCKET}/{name}/{file.relative_to(folder).as_posix()}")
    env = {**__import__("os").environ, "FSSPEC_S3_ENDPOINT_URL": s3_server.endpoint_url,
           "FSSPEC_S3_KEY": "testing", "FSSPEC_S3_SECRET": "testing"}
    good = _verify(f"s3://{BUCKET}/good", env)
    assert good.returncode == 0 and good.stdout.startswith(f"s3://{BUCKET}/good: all "), good.stderr[-2000:]
    bad = _verify(f"s3://{BUCKET}/bad", env)
    assert bad.returncode == 1 and bad.stdout.splitlines()[-1].startswith(f"s3://{BUCKET}/bad: 3 of "), bad.stdout


def test_a_loader_workers_data_error_is_one_line(data: Path) -> None:
    """A shard whose footer is damaged (same size) fails in the DataLoader worker that reads it; the rank
    reports the worker's own one-line message, not the worker's traceback."""
    for entry in read_manifest(data)["splits"]["train"]["shards"]:
        path = data / entry["file"]
        raw = bytearray(path.read_bytes())
        raw[-200:-10] = b"\xab" * 190
        path.write_bytes(bytes(raw))
    stream = TokenStream(data, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=SEED, num_workers=1)
    with pytest.raises(DataError) as caught:
        next(stream.batches(2))
    assert str(caught.value).startswith(f"cannot read shard {data}/train/shard_") and "\n" not in str(caught.value)


def test_remote_shards_are_hashed_in_the_background(s3_server, data: Path) -> None:
    """verify="local" also hashes remote shards up to 64 MiB (these); "off" hashes nothing."""
    file, offset = _token_of_first_step(data)
    byte, value, _, _ = _token_location(data / file, offset)
    _poke(data / file, byte, (value & 0xFF) ^ 0x01)
    fs = s3_server.filesystem()
    s3_server.create_bucket(BUCKET + "-stream")
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{BUCKET}-stream/d/{path.relative_to(data).as_posix()}")
    url = f"s3://{BUCKET}-stream/d"
    for verify, expected in (("local", f"{url}/{file} has sha256 "), ("off", None)):
        stream = TokenStream(url, "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=SEED, verify=verify,
                             storage_options=s3_server.storage_options)
        next(stream.batches(1))
        problem = stream.wait_integrity()
        assert problem.startswith(expected) if expected else problem is None, problem
