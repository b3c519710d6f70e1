"""One rank of an RL layout-parity run: PPO (reward model, critic, reference) and GRPO (KL in the loss).

Run through ``triarch.launcher.local.launch_local``; argv: OUT_DIR then dotted config overrides. Every
model starts from the same seeded initialization on any layout (the reward model and the critic from
their own seeds), the prompts are fixed, and each objective runs ``ITERATIONS`` iterations. Rank 0 writes
``results.json`` (each iteration's metrics and each optimizer step's statistics); the ranks holding
dp rank 0 / tp rank 0 write their pipeline stage's final actor (and critic) parameters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from triarch.config import apply_overrides, config_from_dict, validate_for_world
from triarch.engine.build import build_engine
from triarch.launcher.distributed import exit_process, init_distributed, pick_device, shutdown_distributed
from triarch.parallel.topology import Topology
from triarch.rlhf.rl_loop import RLIteration, RLModels

ITERATIONS = 2
BASE = {
    "model": {"vocab_size": 128, "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 128,
              "seq_len": 24, "max_seq_len": 64},
    "train": {"steps": 10, "micro_batch_size": 1, "global_batch_size": 2, "warmup_steps": 0, "lr": 3e-4,
              "decay": "constant", "grad_clip": 1.0, "seed": 5, "weight_decay": 0.0,
              "eps": 1e-6},  # AdamW would turn float32 noise in near-zero gradient entries into whole steps
    "rl": {"rollout": {"prompts": 4, "samples": 1, "max_new_tokens": 8, "temperature": 1.0}, "epochs": 2,
           "kl_coef": 0.1, "kl_target": 0.5, "critic_init": "policy", "missing_eos_penalty": 0.5},
    "reward": {"kind": "model", "model": "seeded"},
}
PROMPTS = [[5, 6, 7, 8, 9], [12, 13], [30, 31, 32, 1], [40, 41, 42, 43, 44, 45, 46], [7, 7, 7], [90, 91, 92, 93],
           [3, 4], [60, 61, 62, 63, 64]]


class FixedPrompts:
    """The PromptSource interface over a fixed list (in order, wrapping)."""

    eos_id, pad_id = 2, 0

    def prompts(self, iteration: int, count: int) -> list[tuple[int, list[int]]]:
        return [(i % len(PROMPTS), PROMPTS[(iteration * count + i) % len(PROMPTS)]) for i in range(count)]


def build(cfg, topo) -> RLModels:
    actor = build_engine(cfg, topo)
    reference = build_engine(cfg, topo, trainable=False)  # the same seeded init as the actor
    reward_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 99})})
    reward = build_engine(reward_cfg, topo, trainable=False, head="score")
    critic = build_engine(cfg, topo, head="score") if cfg.objective.kind == "ppo" else None
    return RLModels(actor=actor, critic=critic, reference=reference, reward=reward)


def run(kind: str, overrides: list[str], device: torch.device, out_dir: Path) -> dict:
    extra = {"grpo": ["rl.rollout.samples=2", "rl.rollout.prompts=2", "rl.kl_in=loss", "rl.kl_estimator=k3",
                      "rl.entropy_coef=0.01"]}.get(kind, [])
    cfg = config_from_dict(apply_overrides(json.loads(json.dumps(BASE)), [f"objective.kind={kind}", *extra,
                                                                          *overrides]))
    cfg = validate_for_world(cfg, dist.get_world_size())
    p = cfg.parallel
    topo = Topology.build(device, pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp)
    models = build(cfg, topo)
    loop = RLIteration(cfg, topo, models, FixedPrompts())
    out: dict = {"metrics": [], "steps": []}
    for it in range(ITERATIONS):
        result = loop.run(it)
        out["metrics"].append({k: v for k, v in result.metrics.items() if not k.endswith("_s")})
        out["steps"].append(result.extra)
    for name, engine in (("actor", models.actor), ("critic", models.critic)):
        if engine is None:
            continue
        params = engine.full_parameters()
        if topo.dp_rank == 0 and topo.tp_rank == 0:
            torch.save(params, out_dir / f"{kind}_{name}_pp{topo.pp_rank}.pt")
    return out


def main() -> None:
    out_dir = Path(sys.argv[1])
    device = pick_device("cpu")
    init_distributed(device)
    results = {kind: run(kind, sys.argv[2:], device, out_dir) for kind in ("ppo", "grpo")}
    if dist.get_rank() == 0:
        (out_dir / "results.json").write_text(json.dumps(results))
    shutdown_distributed(sync=True)


if __name__ == "__main__":
    main()
    exit_process(0)
