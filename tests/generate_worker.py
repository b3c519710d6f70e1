"""One rank of a generation run on HF-imported weights: greedy and seeded-sampled completions.

Run through ``triarch.launcher.local.launch_local``; argv: HF_DIR OUT_DIR then dotted config overrides. The
engine is built for the layout, loads the Hugging Face Llama in HF_DIR (``init.from: hf:``), and each data-
parallel rank continues its share of ``PROMPTS`` (in order, so global prompt indices are the same as in one
process). Rank 0 writes ``results.json``: every prompt's greedy and sampled tokens and log-probs, and the
largest difference between the rollout log-probs and those of a full forward of prompt + completion.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from triarch.checkpointing.init_from import load_initial_weights
from triarch.config import apply_overrides, config_from_dict, validate_for_world
from triarch.engine.generation import SamplingParams
from triarch.engine.native import NativeEngine
from triarch.launcher.distributed import exit_process, init_distributed, pick_device, shutdown_distributed
from triarch.objectives.token_loss import token_log_probs
from triarch.parallel.topology import Topology

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3, 4, 5, 1], [40, 41, 42, 43, 44]]
EOS, PAD, NEW = 2, 0, 10
BASE = {
    "model": {"vocab_size": 128, "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 160,
              "seq_len": 16, "max_seq_len": 64, "rope_theta": 500000.0},
    "train": {"steps": 20, "micro_batch_size": 1, "global_batch_size": 4, "seed": 3},
}
GREEDY = SamplingParams(max_new_tokens=NEW, temperature=0.0, eos_id=EOS, pad_id=PAD)
SAMPLED = SamplingParams(max_new_tokens=NEW, temperature=1.0, top_k=40, top_p=0.95, seed=11, eos_id=EOS, pad_id=PAD)


def rollout_mismatch(engine: NativeEngine, prompts: list[list[int]], result) -> float:
    """Largest |rollout log-prob - full-forward log-prob| over the generated tokens of these prompts."""
    rows = [p + c for p, c in zip(prompts, result.completions())]
    width = -(-max(map(len, rows)) // 4) * 4  # sequence parallelism splits the sequence over tp ranks
    if width > engine.cfg.model.max_seq_len:
        return float("nan")  # a context too tight for the padded training rows: nothing to compare
    ids = torch.full((len(rows), width), PAD, dtype=torch.int64)
    labels = torch.full((len(rows), width), -100, dtype=torch.int64)
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, len(prompt) - 1:len(row) - 1] = torch.tensor(row[len(prompt):])
    worst = torch.zeros(len(rows), dtype=torch.float64)
    for i in range(len(rows)):  # one row at a time: forward_rows collects one value per row

        def row_fn(output, fields, i=i):
            lp = token_log_probs(output, fields["labels"])
            lp = lp.full_tensor() if isinstance(lp, DTensor) else lp
            return (lp - fields["rollout"]).abs().amax(dim=-1)

        rollout = torch.zeros(len(rows), width, dtype=torch.float64)
        n = int(result.lengths[i])
        start = len(prompts[i]) - 1
        rollout[i, start:start + n] = result.logprobs[i, :n].double()
        got = engine.forward_rows(ids, {"labels": labels, "rollout": rollout.float()}, row_fn)
        if got is not None:
            worst[i] = got[i]
    return float(worst.max())


def main() -> None:
    hf_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    device = pick_device("cpu")
    init_distributed(device)
    cfg = config_from_dict(apply_overrides(json.loads(json.dumps(BASE)), sys.argv[3:]))
    cfg = validate_for_world(cfg, dist.get_world_size())
    p = cfg.parallel
    topo = Topology.build(device, pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp)
    engine = NativeEngine(cfg, topo)
    load_initial_weights(engine, f"hf:{hf_dir}", topo.host_group)
    share = len(PROMPTS) // topo.dp
    mine = PROMPTS[topo.dp_rank * share:(topo.dp_rank + 1) * share]
    out: dict = {}
    for name, params in (("greedy", GREEDY), ("sampled", SAMPLED)):
        result = engine.generate(mine, params, micro_batches=name == "sampled")  # PP: both decode schedules
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (topo.dp_rank, result.completions(), result.logprobs.tolist()))
        by_dp = {dp: (c, lp) for dp, c, lp in everyone}
        out[name] = [c for dp in sorted(by_dp) for c in by_dp[dp][0]]
        out[name + "_logprobs"] = [lp for dp in sorted(by_dp) for lp in by_dp[dp][1]]
        mismatch = torch.tensor(rollout_mismatch(engine, mine, result), dtype=torch.float64)
        dist.all_reduce(mismatch, op=dist.ReduceOp.MAX)
        out[name + "_mismatch"] = float(mismatch)
    if dist.get_rank() == 0:
        (out_dir / "results.json").write_text(json.dumps(out))
    shutdown_distributed(sync=True)


if __name__ == "__main__":
    main()
    exit_process(0)
