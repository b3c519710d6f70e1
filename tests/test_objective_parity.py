"""Layout parity of the alignment objectives: SFT (masked labels), reward model (scalar head, margins) and
DPO (online frozen reference) take the same optimizer steps at tp2, tp2+sp, pp2 (1F1B and interleaved),
tp2 x dp2 and pp2 x dp2 as in one process: losses, gradient norms, statistics and every updated parameter
within 1e-5 (fp32). With micro-batch 1 each loss call holds exactly one whole pair (the worker asserts it
inside every call), and DPO's first loss, with the policy equal to the reference, is log 2 with zero
rewards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from triarch.launcher.local import launch_local

WORKER = str(Path(__file__).with_name("objective_worker.py"))
KINDS = ("sft", "rm", "dpo")
REL_TOL = 1e-5

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2", "parallel.sequence_parallel=false"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2_1f1b": (2, ["parallel.pp=2", "parallel.schedule=1f1b"]),
    "pp2_interleaved": (2, ["parallel.pp=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved_1f1b"]),
    "tp2_dp2": (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
    "pp2_dp2": (4, ["parallel.pp=2", "parallel.dp_shard=2"]),
}


def run(out: Path, nproc: int, overrides: list[str]) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    out.mkdir(parents=True, exist_ok=True)
    launch_local(nproc, [WORKER, str(out), ",".join(KINDS), *overrides])
    params: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in KINDS}
    for kind in KINDS:
        for f in sorted(out.glob(f"{kind}_params_pp*.pt")):
            params[kind].update(torch.load(f))
    return json.loads((out / "results.json").read_text()), params


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[dict, dict]:
    return run(tmp_path_factory.mktemp("objectives_single"), 1, [])


def close(a: float, b: float) -> bool:
    """Relative 1e-5, absolute below 1: DPO rewards are small differences of sequence log-probs of size ~50,
    so their float32 rounding is absolute, not relative."""
    return abs(a - b) <= REL_TOL * max(abs(b), 1.0)


def test_single_process_dpo_starts_at_log_2_with_zero_rewards(single) -> None:
    results, _ = single
    first = results["dpo"]
    assert abs(first["loss"][0] - math.log(2)) < 1e-6
    assert all(first["stats"][0][k] == 0.0 for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    assert first["loss"][1] != first["loss"][0]  # the policy moved away from the reference
    assert results["rm"]["pairs_per_call"] == [1] and results["dpo"]["pairs_per_call"] == [1]


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_objectives_match_single_process(name: str, single, tmp_path: Path) -> None:
    want, want_params = single
    nproc, overrides = LAYOUTS[name]
    got, got_params = run(tmp_path, nproc, overrides)
    for kind in KINDS:
        for key in ("loss", "grad_norm"):
            for a, b in zip(got[kind][key], want[kind][key], strict=True):
                assert close(a, b), f"{name} {kind} {key}: {got[kind][key]} vs {want[kind][key]}"
        for got_stats, want_stats in zip(got[kind]["stats"], want[kind]["stats"], strict=True):
            assert got_stats.keys() == want_stats.keys()
            for stat, value in want_stats.items():
                assert close(got_stats[stat], value), f"{name} {kind} {stat}: {got_stats[stat]} vs {value}"
        assert got_params[kind].keys() == want_params[kind].keys(), f"{name} {kind}: parameter names differ"
        for key, ref in want_params[kind].items():
            err = float((got_params[kind][key] - ref).norm() / ref.norm())
            assert err <= REL_TOL, f"{name} {kind} {key}: relative difference {err:.2e}"
    assert got["rm"]["pairs_per_call"] == [1] and got["dpo"]["pairs_per_call"] == [1]
    assert abs(got["dpo"]["loss"][0] - math.log(2)) < 1e-6
