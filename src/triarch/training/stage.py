"""What differs between pretraining, SFT, reward modelling and DPO: the objective, the streams it reads, and
the per-row fields each batch carries to the loss. The step loop (``training.trainer``) is the same for all.

- pretrain: ``TokenStream`` over packed token shards; next-token loss.
- sft: ``SFTStream`` (whole examples packed per row, labels on response tokens only, per-example position
  ids); the same next-token loss, over the counted labels.
- rm / dpo: ``PreferenceStream`` (interleaved chosen/rejected rows); Bradley-Terry loss on the scalar head,
  or DPO against the frozen reference's log-probs (``rlhf.reference``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from triarch.config import TriarchConfig
from triarch.data_pipeline.stream import TokenStream
from triarch.objectives.base import PRETRAIN, Fields, Objective
from triarch.parallel.topology import Topology

log = logging.getLogger("triarch.train")

ReferenceFn = Callable[[dict[str, torch.Tensor], str], torch.Tensor]


def build_objective(cfg: TriarchConfig) -> Objective:
    """The loss of ``objective.kind``."""
    obj = cfg.objective
    if obj.kind == "rm":
        from triarch.objectives.preference import RewardObjective

        return RewardObjective(use_margin=obj.margin)
    if obj.kind == "dpo":
        from triarch.objectives.preference import DpoObjective

        return DpoObjective(beta=obj.beta, loss_type=obj.loss_type, label_smoothing=obj.label_smoothing)
    return PRETRAIN


def open_stream(cfg: TriarchConfig, topo: Topology, split: str, *, training: bool) -> Any:
    """The stream of ``split`` for this DP rank (``training``: the blend and worker settings apply)."""
    d, size, seq = cfg.data, cfg.train.global_batch_size, cfg.model.seq_len
    kind = cfg.objective.kind
    if kind in ("rm", "dpo"):
        from triarch.data_pipeline.stream.preferences import PreferenceStream

        return PreferenceStream(d.path, split, seq, global_batch_size=size, seed=cfg.train.seed, dp_rank=topo.dp_rank,
                                dp_size=topo.dp, train_split=d.train_split)
    if kind == "sft":
        from triarch.data_pipeline.stream.sft import SFTStream

        return SFTStream(d.path, split, seq, global_batch_size=size, seed=cfg.train.seed, dp_rank=topo.dp_rank,
                         dp_size=topo.dp, shuffle=training, verify=d.verify_shards)
    if training:
        return TokenStream(d.train_datasets(), split, seq, global_batch_size=size, seed=cfg.train.seed,
                           dp_rank=topo.dp_rank, dp_size=topo.dp, num_workers=d.num_workers,
                           shuffle_block=d.shuffle_block, position_ids=d.document_masks, verify=d.verify_shards)
    return TokenStream(d.path, split, seq, global_batch_size=size, seed=cfg.train.seed, dp_rank=topo.dp_rank,
                       dp_size=topo.dp, shuffle=False, position_ids=d.document_masks, verify=d.verify_shards)


@dataclass
class Stage:
    """The objective plus how a batch becomes the engine's fields (labels, margins, reference log-probs)."""

    objective: Objective
    reference: ReferenceFn | None = None

    @property
    def rows_per_example(self) -> int:
        return self.objective.rows_per_example

    def fields(self, batch: dict[str, torch.Tensor], split: str) -> Fields:
        """The per-row fields of ``batch`` (of ``split``) the objective reads."""
        fields = {"labels": batch["labels"]}
        for name in ("margin",):
            if name in batch:
                fields[name] = batch[name]
        if self.reference is not None:
            fields["ref_logps"] = self.reference(batch, split)
        return fields


def build_reference(cfg: TriarchConfig, topo: Topology, run_dir: Path, streams: dict[str, Any],
                    source: str | None, host_group: Any) -> ReferenceFn | None:
    """DPO's reference (``rlhf.reference``): a frozen engine with the starting weights (``source``, the
    resolved ``init.from``; None: the seeded random init, equal to the policy's), online or precomputed."""
    if cfg.objective.kind != "dpo":
        return None
    import torch.distributed as dist

    from triarch.engine.build import build_engine
    from triarch.rlhf.reference import OnlineReference, precomputed_reference, release, stored_tables

    precompute = cfg.objective.reference == "precompute"
    stored = stored_tables(streams, cfg, run_dir, source) if precompute else {}
    found: list = [None] * dist.get_world_size(host_group)  # computing a table is collective: all ranks agree
    dist.all_gather_object(found, sorted(stored), group=host_group)
    agreed = set.intersection(*(set(f) for f in found))
    stored = {split: table for split, table in stored.items() if split in agreed}
    if precompute and len(stored) == len(streams):  # every table is stored: no frozen model, no source read
        return precomputed_reference(None, streams, topo, cfg, run_dir, source, stored)
    engine = build_engine(cfg, topo, trainable=False)
    if source is not None:
        from triarch.checkpointing.init_from import load_initial_weights

        load_initial_weights(engine, source, host_group)
    if not precompute:
        return OnlineReference(engine)
    reference = precomputed_reference(engine, streams, topo, cfg, run_dir, source, stored)
    release(engine)
    return reference
