"""One rank of an alignment-objective parity run: SFT, reward model and DPO steps on fixed batches.

Run through ``triarch.launcher.local.launch_local``; argv: OUT_DIR then dotted config overrides. For each
objective it builds the engine from the same seed, takes 2 optimizer steps on fixed global batches (this DP
rank's rows), and writes the losses, gradient norms, statistics and final full parameters. DPO's reference
is a frozen engine on the same Topology (``forward_rows``), so its step-1 loss is log 2 exactly. Every pair
objective also checks, inside each loss call, that both rows of every pair arrived together.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from triarch.config import apply_overrides, config_from_dict, validate_for_world
from triarch.engine.build import build_engine
from triarch.labels import IGNORE_INDEX
from triarch.launcher.distributed import exit_process, init_distributed, pick_device, shutdown_distributed
from triarch.objectives.base import PRETRAIN
from triarch.objectives.preference import DpoObjective, RewardObjective, reference_row_fn
from triarch.parallel.topology import Topology

BASE = {
    "model": {"vocab_size": 256, "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 128,
              "seq_len": 16, "max_seq_len": 64},
    "train": {"steps": 2, "micro_batch_size": 1, "global_batch_size": 4, "warmup_steps": 1, "lr": 3e-4,
              "grad_clip": 0.5, "seed": 7},
}
STEPS = 2
PAD = 0


def sft_batch(step: int, rows: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows whose labels count only a 'response' tail of each row (SFT loss masks)."""
    gen = torch.Generator().manual_seed(500 + step)
    tokens = torch.randint(1, vocab, (rows, seq + 1), generator=gen)
    labels = tokens[:, 1:].clone()
    prompt = torch.randint(2, seq // 2, (rows,), generator=gen)
    labels[torch.arange(seq)[None, :] < prompt[:, None]] = IGNORE_INDEX
    return tokens[:, :-1], labels


def pair_batch(step: int, pairs: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    """Interleaved chosen/rejected rows: a shared prompt, responses of different lengths, right padding."""
    gen = torch.Generator().manual_seed(900 + step)
    ids = torch.full((2 * pairs, seq), PAD, dtype=torch.int64)
    labels = torch.full((2 * pairs, seq), IGNORE_INDEX, dtype=torch.int64)
    for p in range(pairs):
        prompt = torch.randint(1, vocab, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen)
        for side in range(2):
            row = 2 * p + side
            response = torch.randint(1, vocab, (int(torch.randint(2, seq - len(prompt) + 1, (1,), generator=gen)),),
                                     generator=gen)
            full = torch.cat([prompt, response])
            ids[row, :len(full)] = full
            labels[row, len(prompt) - 1:len(full) - 1] = response
    return {"input_ids": ids, "labels": labels, "pair_id": torch.arange(2 * pairs) // 2,
            "margin": torch.full((2 * pairs,), 0.25, dtype=torch.float64)}


class PairsTogether:
    """Wraps a pair objective: every loss call must hold both rows of each of its pairs."""

    def __init__(self, inner, calls: list[int]) -> None:
        self.inner, self.calls = inner, calls
        self.rows_per_example, self.stat_names = inner.rows_per_example, inner.stat_names

    def units(self, fields):
        return self.inner.units(fields)

    def units_bound(self, fields):
        return self.inner.units_bound(fields)

    def loss(self, output, fields):
        ids = fields["pair_id"].view(-1, 2)
        assert torch.equal(ids[:, 0], ids[:, 1]), f"a pair was split across loss calls: {fields['pair_id'].tolist()}"
        self.calls.append(len(ids))
        return self.inner.loss(output, fields)


def dp_rows(batch: torch.Tensor, topo: Topology) -> torch.Tensor:
    rows = batch.shape[0] // topo.dp
    return batch[topo.dp_rank * rows:(topo.dp_rank + 1) * rows]


def run_objective(kind: str, overrides: list[str], device: torch.device) -> dict:
    cfg = config_from_dict(apply_overrides(json.loads(json.dumps(BASE)), [*overrides, f"objective.kind={kind}"]))
    cfg = validate_for_world(cfg, dist.get_world_size())
    p = cfg.parallel
    topo = Topology.build(device, pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp)
    engine = build_engine(cfg, topo)
    reference = build_engine(cfg, topo, trainable=False) if kind == "dpo" else None
    calls: list[int] = []
    if kind == "rm":
        objective = PairsTogether(RewardObjective(use_margin=True), calls)
    elif kind == "dpo":
        objective = PairsTogether(DpoObjective(beta=0.5, loss_type="sigmoid", label_smoothing=0.1), calls)
    else:
        objective = PRETRAIN
    out: dict = {"loss": [], "grad_norm": [], "stats": []}
    for step in range(STEPS):
        if kind == "sft":
            inputs, labels = sft_batch(step, cfg.train.global_batch_size, cfg.model.seq_len, cfg.model.vocab_size)
            fields = {"labels": dp_rows(labels, topo)}
            inputs = dp_rows(inputs, topo)
        else:
            batch = {k: dp_rows(v, topo) for k, v in pair_batch(step, cfg.train.global_batch_size, cfg.model.seq_len,
                                                                 cfg.model.vocab_size).items()}
            inputs = batch.pop("input_ids")
            fields = batch
            if reference is not None:
                ref = reference.forward_rows(inputs, {"labels": fields["labels"]}, reference_row_fn)
                fields["ref_logps"] = ref if ref is not None else torch.zeros(inputs.shape[0], dtype=torch.float64)
        result = engine.train_step(inputs, step=step + 1, objective=objective, fields=fields)
        out["loss"].append(result.loss)
        out["grad_norm"].append(result.grad_norm)
        out["stats"].append(result.stats)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, calls)
    out["pairs_per_call"] = sorted({n for c in everyone for n in c})
    params = engine.full_parameters()
    out["params"] = params if topo.dp_rank == 0 and topo.tp_rank == 0 else {}
    out["pp_rank"] = topo.pp_rank
    if reference is not None:  # what the reference ran on (an engine's own description, where it has one)
        out["reference"] = getattr(reference, "describe", dict)()
        out["reference_local_parameters"] = reference.local_parameter_count()
        out["local_parameters"] = engine.local_parameter_count()
    return out


def main() -> None:
    out_dir = Path(sys.argv[1])
    kinds = sys.argv[2].split(",")
    device = pick_device("cpu")
    init_distributed(device)
    summary = {}
    for kind in kinds:
        result = run_objective(kind, sys.argv[3:], device)
        if result["params"]:
            torch.save(result["params"], out_dir / f"{kind}_params_pp{result['pp_rank']}.pt")
        if dist.get_rank() == 0:
            summary[kind] = {k: v for k, v in result.items() if k not in ("params", "pp_rank")}
    if dist.get_rank() == 0:
        (out_dir / "results.json").write_text(json.dumps(summary))
    shutdown_distributed(sync=True)


if __name__ == "__main__":
    main()
    exit_process(0)  # skip interpreter teardown (see triarch.launcher.distributed.exit_process)
