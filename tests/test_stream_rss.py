"""Memory stays flat while streaming a dataset far larger than the reader's cache (measured in a fresh
process, so pytest's own memory does not count)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_stream_core import EOS, SCHEMA, VOCAB, shard_entry, write_manifest_for

SHARDS = 20
BATCHES_PER_SHARD = 40
BATCH_TOKENS = 1 << 16
DOC_TOKENS = 512  # fixed-length documents: 128 per record batch
SEQ_LEN = 1024
GLOBAL_BATCH = 32
MIB = 1 << 20
MAX_GROWTH_BYTES = 48 * MIB  # the reader's cache is 16 MiB + one shuffle block's span (4 MiB here)
FLAT_TOLERANCE_BYTES = 8 * MIB

MEASURE = """
import json, sys

def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

import torch
from triarch.data_pipeline.stream import TokenStream

folder, seq_len, global_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
before = rss()
stream = TokenStream(folder, "train", seq_len, global_batch_size=global_batch, seed=0)
steps = stream.windows_per_epoch[0] // global_batch
samples = []
for step, batch in enumerate(stream.batches(steps)):
    if step % 50 == 0:
        samples.append(rss()["VmRSS"])
print(json.dumps({"before": before["VmRSS"], "samples": samples, "peak": rss()["VmHWM"], "steps": steps,
                  "tokens": steps * global_batch * seq_len, "cache": stream.sources[0].cache_info()}))
"""


@pytest.fixture(scope="module")
def large_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 52M tokens (210 MB) in shards of 40 record batches, written through pyarrow directly."""
    root = tmp_path_factory.mktemp("large")
    (root / "train").mkdir()
    rng = np.random.default_rng(0)
    offsets = pa.array(np.arange(0, BATCH_TOKENS + 1, DOC_TOKENS, dtype=np.int32))
    entries = []
    for shard in range(SHARDS):
        path = root / "train" / f"shard_{shard:05d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            for _ in range(BATCHES_PER_SHARD):
                tokens = rng.integers(1, VOCAB, BATCH_TOKENS, dtype=np.uint32)
                tokens[DOC_TOKENS - 1::DOC_TOKENS] = EOS
                writer.write_batch(pa.record_batch([pa.ListArray.from_arrays(offsets, pa.array(tokens))],
                                                   schema=SCHEMA))
        entries.append(shard_entry(root, path, [BATCH_TOKENS] * BATCHES_PER_SHARD,
                                   BATCHES_PER_SHARD * BATCH_TOKENS // DOC_TOKENS, VOCAB - 1))
    return write_manifest_for(root, {"train": entries})


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_rss_stays_flat_over_a_whole_epoch(large_folder: Path) -> None:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(large_folder), str(SEQ_LEN), str(GLOBAL_BATCH)],
                            capture_output=True, text=True, timeout=300, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    data_bytes = SHARDS * BATCHES_PER_SHARD * BATCH_TOKENS * 4
    assert figures["tokens"] > 0.95 * data_bytes / 4  # the whole epoch was read
    samples = figures["samples"]  # every 50 steps; the cache is full after the first quarter of the epoch
    warm = samples[len(samples) // 4]
    assert max(samples[len(samples) // 4:]) - warm < FLAT_TOLERANCE_BYTES, f"RSS grew while streaming: {samples}"
    assert figures["peak"] - figures["before"] < MAX_GROWTH_BYTES, figures
    assert figures["cache"]["bytes"] <= 20 * MIB + BATCH_TOKENS * 4
