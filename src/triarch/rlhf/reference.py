"""DPO's frozen reference: sequence log-probs of each pair row under the starting weights, on the same Topology.

``online``: a frozen engine (``build_engine(cfg, topo, trainable=False)``, no optimizer state) runs a forward pass per
batch. ``precompute``: that pass runs once over every example of each split before training, and the table
(example x (chosen, rejected), float64) is kept in the run directory (``reference/<split>.pt``), so each step
only looks rows up, a resumed run reads the same values, and the frozen engine's memory is freed before
training starts. Both are computed vocabulary-parallel under TP (full logits are never gathered).
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from triarch.checkpointing.commit import CheckpointError
from triarch.checkpointing.safe_load import load_plain
from triarch.config import TriarchConfig
from triarch.data_pipeline.stream.preferences import PreferenceStream
from triarch.engine.interface import Engine
from triarch.objectives.preference import reference_row_fn
from triarch.parallel.topology import Topology

log = logging.getLogger("triarch.rlhf")

REFERENCE_DIR = "reference"


def row_logps(engine: Engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-row reference log-probs of ``batch`` (float64, on every rank: zeros where the pass has no head;
    only the last pipeline stage's values reach a loss)."""
    values = engine.forward_rows(batch["input_ids"], {"labels": batch["labels"]}, reference_row_fn,
                                 position_ids=batch.get("position_ids"))
    if values is None:
        return torch.zeros(batch["input_ids"].shape[0], dtype=torch.float64)
    return values.cpu()


class OnlineReference:
    """Reference log-probs from a frozen engine, one forward pass per batch."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __call__(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        return row_logps(self.engine, batch)


class PrecomputedReference:
    """Reference log-probs looked up per row from tables computed once (module docstring)."""

    def __init__(self, tables: dict[str, torch.Tensor]) -> None:
        self.tables = tables

    def __call__(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        table = self.tables[split]
        rows = batch["example_ids"]
        sides = torch.arange(rows.shape[0]) % 2
        return table[rows, sides]


def reference_table(engine: Engine, stream: PreferenceStream, topo: Topology) -> torch.Tensor:
    """(examples, 2) float64 reference log-probs of every example of ``stream``'s dataset, on every rank.

    Each global batch of examples in storage order is split over the DP ranks; the last pipeline stage's
    tp rank 0 of each DP rank contributes its rows to one world all-reduce at the end."""
    n = len(stream.dataset)
    size, share = stream.global_batch_size, stream.local_batch_size
    table = torch.zeros(n, 2, dtype=torch.float64)
    counts = topo.is_last_stage and topo.tp_rank == 0
    for start in range(0, n, size):
        mine = [start + topo.dp_rank * share + i for i in range(share)]
        valid = [i < n for i in mine]
        values = row_logps(engine, stream.rows_of([i if ok else 0 for i, ok in zip(mine, valid)])).view(-1, 2)
        if counts:
            for row, (index, ok) in enumerate(zip(mine, valid)):
                if ok:
                    table[index] = values[row]
    reduced = table.to(topo.device)
    dist.all_reduce(reduced)
    return reduced.cpu()


def table_identity(stream: PreferenceStream, cfg: TriarchConfig, source: str | None) -> dict:
    """What a stored reference table must match to be reused: the data, the starting weights (the source,
    or the seed of the random init) and everything else that changes the values."""
    return {"data_sha256": stream.dataset.data_sha256, "examples": len(stream.dataset),
            "source": source or f"random init, seed {cfg.train.seed}, init_std {cfg.model.init_std}",
            "model": cfg.model.model_dump(mode="json"), "precision": cfg.train.precision,
            "seq_len": stream.seq_len}


def stored_tables(streams: dict[str, PreferenceStream], cfg: TriarchConfig, run_dir: Path,
                  source: str | None) -> dict[str, torch.Tensor]:
    """The reference tables already in the run directory that match (``table_identity``), by split."""
    found = {}
    for split, stream in streams.items():
        path = run_dir / REFERENCE_DIR / f"{split}.pt"
        try:
            saved = load_plain(path) if path.is_file() else None
        except CheckpointError as err:  # a damaged cache is computed again
            log.warning("ignoring %s: %s", path, err)
            saved = None
        if isinstance(saved, dict) and saved.get("identity") == table_identity(stream, cfg, source) \
                and isinstance(saved.get("logps"), torch.Tensor) and saved["logps"].shape == (len(stream.dataset), 2):
            found[split] = saved["logps"]
            log.info("reference log-probs of split %s read from %s", split, path)
    return found


def precomputed_reference(engine: Engine | None, streams: dict[str, PreferenceStream], topo: Topology,
                          cfg: TriarchConfig, run_dir: Path, source: str | None,
                          stored: dict[str, torch.Tensor]) -> PrecomputedReference:
    """The reference tables of ``streams`` (split -> stream): ``stored`` (those every rank found, see
    ``stored_tables``), the others computed with ``engine`` (collective) and written to the run directory
    (rank 0, temp file + rename)."""
    folder = run_dir / REFERENCE_DIR
    tables = dict(stored)
    for split, stream in streams.items():
        if split in tables:
            continue
        if engine is None:
            raise RuntimeError(f"no stored reference table for split {split} and no frozen engine to compute it")
        path = folder / f"{split}.pt"
        identity = table_identity(stream, cfg, source)
        tables[split] = reference_table(engine, stream, topo)
        if dist.get_rank() == 0:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"identity": identity, "logps": tables[split]}, tmp)
            os.replace(tmp, path)
            log.info("reference log-probs of %d examples (split %s) written to %s", len(stream.dataset), split, path)
    return PrecomputedReference(tables)


def release(engine: Engine) -> None:
    """Free a frozen engine's memory once its work is done (its schedule holds the stages too)."""
    engine.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
