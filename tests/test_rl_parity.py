"""Layout parity of PPO and GRPO: two iterations at tp2, pp2 and tp2 x pp2 (and dp2: FSDP, each rank its own prompts),
and on the megatron engine at tp2 x dp2 and tp2 x pp2, equal one native process (rollouts,
rewards, losses, statistics, every updated actor and critic parameter; 1e-5, gradient norms 1e-4), and no train/rollout
mismatch: the first optimizer step of each iteration sees ratio 1 and clip fraction 0, since the training
forward recomputes exactly the rollout's log-probs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from triarch.launcher.local import launch_local

WORKER = str(Path(__file__).with_name("rl_worker.py"))
TOL = 1e-5
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "dp2": (2, ["parallel.dp_shard=2"]),
    # the megatron engine: its forward trains and scores; rollouts sample on a native engine of the same layout
    # holding its weights (engine.weight_sync), from TP shards (and the distributed optimizer's fp32 main
    # weights gathered over DP) into TP x FSDP shards
    "megatron_tp2_dp2": (4, ["engine=megatron", "parallel.tp=2", "parallel.dp_shard=2"]),
    "megatron_tp2_pp2": (4, ["engine=megatron", "parallel.tp=2", "parallel.pp=2"]),
    # the deepspeed engine: actor and critic each a ZeRO-3 engine, rollouts on the gathered weights
    "deepspeed_zero3_dp2": (2, ["engine=deepspeed", "parallel.dp_shard=2", "deepspeed.zero_stage=3"]),
}


def _run(out: Path, nproc: int, overrides: list[str]) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    out.mkdir(parents=True, exist_ok=True)
    launch_local(nproc, [WORKER, str(out), *overrides])
    params: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(out.glob("*_pp*.pt")):
        params.setdefault(f.name.rsplit("_pp", 1)[0], {}).update(torch.load(f))
    return json.loads((out / "results.json").read_text()), params


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[dict, dict]:
    return _run(tmp_path_factory.mktemp("rl_single"), 1, [])


GRAD_NORM_TOL = 1e-4  # a norm over every gradient entry sums float32 terms in another order per layout
# a clip indicator at its boundary may flip on float32 noise: one token of a step's 16 at most
INDICATOR_TOL = 1 / 16
INDICATORS = ("clip_fraction", "value_clip_fraction")


def _close(a: float, b: float, tol: float = TOL) -> bool:
    return abs(a - b) <= tol * max(abs(b), 1.0)


def test_first_step_of_each_iteration_has_no_mismatch(single) -> None:
    results, params = single
    for kind in ("ppo", "grpo"):
        for steps in results[kind]["steps"]:
            assert abs(steps["ratio"][0] - 1.0) <= TOL and steps["clip_fraction"][0] == 0.0
            assert steps["approx_kl"][0] <= 1e-10
        assert results[kind]["metrics"][0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the actor starts as the reference
    assert set(params) == {"ppo_actor", "ppo_critic", "grpo_actor"}
    assert results["grpo"]["steps"][0]["kl_loss"][0] == pytest.approx(0.0, abs=1e-6)
    assert results["grpo"]["steps"][0]["kl_loss"][-1] > 0  # the KL term becomes active as the policy moves


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_one_process(layout, single, tmp_path) -> None:
    if layout.startswith("megatron"):
        pytest.importorskip("megatron.core")
    if layout.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    results, params = single
    nproc, overrides = LAYOUTS[layout]
    got, got_params = _run(tmp_path / layout, nproc, overrides)
    for kind in ("ppo", "grpo"):
        for ours, theirs in zip(got[kind]["metrics"], results[kind]["metrics"]):
            assert set(ours) == set(theirs)
            bad = {k: (ours[k], theirs[k]) for k in theirs
                   if not _close(ours[k], theirs[k], INDICATOR_TOL if k in INDICATORS else TOL)}
            assert not bad, f"{kind} {layout}: {bad}"
        for ours, theirs in zip(got[kind]["steps"], results[kind]["steps"]):
            for k in theirs:
                tol = GRAD_NORM_TOL if k.endswith("grad_norm") else INDICATOR_TOL if k in INDICATORS else TOL
                assert all(_close(a, b, tol) for a, b in zip(ours[k], theirs[k])), (kind, layout, k, ours[k], theirs[k])
    assert set(got_params) == set(params)
    for model, tensors in params.items():
        assert set(got_params[model]) == set(tensors)
        for name, value in tensors.items():
            diff = (got_params[model][name] - value).abs().max().item()
            assert diff <= TOL * max(value.abs().max().item(), 1.0), (model, name, diff)
