"""Checkpoint save/load throughput against raw disk bandwidth for the same bytes, and async stall time.

One rank, a model whose parameters + AdamW moments exceed 1 GB (``--quick``: about 0.1 GB). In the same
run and directory:
- raw write: the same number of bytes written with plain file writes + fsync, then read back;
- triarch sync save (DCP write, each rank hashing the files it wrote, then the commit) and load (DCP into
  the live model, verify skipped to time the read path only; the verify cost is printed separately);
- async save: the time the training loop is blocked (staging) against the synchronous save time;
- commit: the critical-path time of an async save's commit (gather the digests, write ``COMMITTED.json``,
  agree; every rank waits for it) against hashing the whole step in one thread, which is what rank 0 used
  to do there while all ranks waited.
Last line: JSON with ``state_gb``, ``save_vs_disk``, ``load_vs_disk``, ``async_stall_ratio``, ``commit_s``,
``hash_all_s``, ``commit_vs_hash_all``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from triarch.checkpointing.commit import integrity_manifest, verify
from triarch.checkpointing.manager import CheckpointManager, StepInfo
from triarch.config import load_config, validate_for_world
from triarch.engine.native import NativeEngine
from triarch.launcher.distributed import init_distributed, shutdown_distributed
from triarch.parallel.topology import Topology

SHAPE = ["model.vocab_size=32000", "model.dim=1024", "model.n_layers=6", "model.n_heads=16", "model.n_kv_heads=8",
         "model.ffn_hidden=2816", "model.seq_len=128", "train.global_batch_size=1", "train.micro_batch_size=1",
         "train.warmup_steps=0", "train.steps=10"]
QUICK_SHAPE = [*SHAPE, "model.vocab_size=8000", "model.dim=256", "model.n_heads=4", "model.n_kv_heads=2",
               "model.ffn_hidden=704"]


def state_bytes(engine: NativeEngine) -> int:
    return sum(t.numel() * t.element_size() for t in engine.checkpoint_state().values())


def raw_disk(path: Path, nbytes: int) -> tuple[float, float]:
    """Seconds to write (with fsync) and read back ``nbytes`` in 64 MiB chunks."""
    chunk = np.random.default_rng(0).integers(0, 255, size=64 << 20, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            n = min(len(chunk), nbytes - written)
            f.write(chunk[:n])
            written += n
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
    read_s = time.perf_counter() - start
    path.unlink()
    return write_s, read_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir under ./runs)")
    parser.add_argument("--quick", action="store_true", help="smoke run: a model of about 0.1 GB of state")
    args = parser.parse_args()
    device = torch.device("cpu")
    init_distributed(device)
    cfg = validate_for_world(load_config(None, QUICK_SHAPE if args.quick else SHAPE), 1)
    topo = Topology.build(device, pp=1, dp_replicate=1, dp_shard=1, tp=1)
    engine = NativeEngine(cfg, topo)
    nbytes = state_bytes(engine)
    base = args.dir or Path("runs")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=base))
    try:
        raw_write, raw_read = raw_disk(work / "raw.bin", nbytes)
        sync = CheckpointManager(work / "sync", keep=2, async_save=False)
        start = time.perf_counter()
        step_dir = sync.save(1, engine, {"layout": topo.describe()})
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        sync.load(StepInfo(1, step_dir, True), engine)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        verify(step_dir)
        verify_s = time.perf_counter() - start
        asyncm = CheckpointManager(work / "async", keep=2, async_save=True)
        asyncm.save(1, engine, {"layout": topo.describe()})  # first save allocates the staging buffers
        first_stall_s = asyncm.last_stall_s
        asyncm.save(2, engine, {"layout": topo.describe()})  # waits for save 1, then stages into reused buffers
        stall_s = asyncm.last_stall_s - asyncm.last_wait_s
        start = time.perf_counter()
        asyncm.wait()
        background_s = time.perf_counter() - start
        commit_s = asyncm.last_commit_s  # the commit of step 2, after its background write and hashing
        start = time.perf_counter()
        integrity_manifest(asyncm.dir / "step_2")
        hash_all_s = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutdown_distributed()
    gb = nbytes / 1e9
    print(f"state: {gb:.2f} GB (model + AdamW moments, fp32)")
    print(f"raw disk:  write+fsync {gb / raw_write:.2f} GB/s, read {gb / raw_read:.2f} GB/s")
    print(f"triarch:   save {gb / save_s:.2f} GB/s ({save_s:.2f} s incl. sha256 and commit), "
          f"load {gb / load_s:.2f} GB/s ({load_s:.2f} s); verify {verify_s:.2f} s")
    print(f"async:     loop blocked {stall_s:.2f} s (steady state; first save {first_stall_s:.2f} s while "
          f"allocating staging buffers) vs sync save {save_s:.2f} s; background write done {background_s:.2f} s later")
    print(f"commit:    critical path {commit_s * 1e3:.1f} ms (digests hashed by the writer) vs hashing the whole "
          f"step in one thread {hash_all_s:.2f} s ({gb / hash_all_s:.2f} GB/s): ratio {commit_s / hash_all_s:.4f}")
    print(json.dumps({"state_gb": round(gb, 3), "save_vs_disk": round(raw_write / save_s, 3),
                      "load_vs_disk": round(raw_read / load_s, 3), "async_stall_ratio": round(stall_s / save_s, 3),
                      "commit_s": round(commit_s, 4), "hash_all_s": round(hash_all_s, 3),
                      "commit_vs_hash_all": round(commit_s / hash_all_s, 5)}))


if __name__ == "__main__":
    main()
