"""Layout parity: every TP/PP/DP layout that fits 4 gloo ranks matches one process (fp32).

Same seed -> same full initial weights (checked bit for bit against the one-process value, each rank
having drawn only its own shard); step k -> same global batch. Compared: the loss of each of the first 3 steps and the gradient norm (1e-5 relative), and every parameter after 3 clipped AdamW steps,
gathered to full tensors (1e-5 relative, by norm of the difference over norm of the reference).
Clipping is active in every step (grad_clip below the gradient norm), so equal parameters after the
steps also mean an equal clipped update.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layout_worker import BASE
from triarch.config import apply_overrides, config_from_dict
from triarch.launcher.local import launch_local
from triarch.parallel.init import full_init_value

WORKER = str(Path(__file__).with_name("layout_worker.py"))
REL_TOL = 1e-5
CLIP = ["train.grad_clip=0.5"]

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2", "parallel.sequence_parallel=false"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2_1f1b": (2, ["parallel.pp=2", "parallel.schedule=1f1b"]),
    "pp2_interleaved": (2, ["parallel.pp=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved_1f1b"]),
    "dp_shard2_fsdp": (2, ["parallel.dp_shard=2"]),
    "dp_replicate2_ddp": (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"]),
    "dp_shard2_cpu_offload": (2, ["parallel.dp_shard=2", "parallel.fsdp_offload=cpu"]),
    "tp2_cpu_offload": (2, ["parallel.tp=2", "parallel.fsdp_offload=cpu"]),
    "tp2_dp2": (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "pp2_dp2": (4, ["parallel.pp=2", "parallel.dp_shard=2"]),
    # beyond the required set: other schedules, HSDP, activation checkpointing
    "pp2_gpipe": (2, ["parallel.pp=2", "parallel.schedule=gpipe"]),
    "pp2_zero_bubble": (2, ["parallel.pp=2", "parallel.virtual_stages=2", "parallel.schedule=zero_bubble"]),
    "hsdp_2x2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    "tp4_kv_heads_replicated": (4, ["parallel.tp=4"]),
    "ac_full": (1, ["train.activation_checkpoint=full"]),
    "tp2_ac_selective": (2, ["parallel.tp=2", "train.activation_checkpoint=selective"]),
}


def run_layout(out: Path, nproc: int, overrides: list[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    out.mkdir(parents=True, exist_ok=True)
    launch_local(nproc, [WORKER, str(out), *CLIP, *overrides])
    params: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("params_pp*.pt")):
        params.update(torch.load(f))
    return json.loads((out / "losses.json").read_text()), params


def assert_initial_weights_exact(out: Path, overrides: list[str]) -> None:
    """The run's gathered initial weights equal the one-process full value of every parameter, bit for bit."""
    cfg = config_from_dict(apply_overrides(json.loads(json.dumps(BASE)), overrides))
    initial: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("initial_pp*.pt")):
        initial.update(torch.load(f))
    assert initial, f"no initial weights under {out}"
    for key, got in initial.items():
        want = full_init_value(key, got.shape, seed=cfg.train.seed, std=cfg.model.init_std, n_layers=cfg.model.n_layers)
        assert torch.equal(got, want), f"{key}: initial value differs from the one-process value"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    return run_layout(tmp_path_factory.mktemp("single"), 1, [])


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name: str, reference, tmp_path: Path) -> None:
    ref_losses, ref_params = reference
    nproc, overrides = LAYOUTS[name]
    losses, params = run_layout(tmp_path, nproc, overrides)
    assert_initial_weights_exact(tmp_path, overrides)
    assert len(losses["loss"]) == 3
    assert all(g > 0.5 for g in ref_losses["grad_norm"]), "clipping must be active in every step"
    for step, (got, want) in enumerate(zip(losses["loss"], ref_losses["loss"]), start=1):
        assert _rel(got, want) <= REL_TOL, f"{name} step {step}: loss {got} vs {want}"
    for step, (got, want) in enumerate(zip(losses["grad_norm"], ref_losses["grad_norm"]), start=1):
        assert _rel(got, want) <= REL_TOL, f"{name} step {step}: grad norm {got} vs {want}"
    assert set(params) == set(ref_params)
    for key, want in ref_params.items():
        got = params[key]
        assert got.shape == want.shape, key
        rel = float((got - want).norm() / want.norm())
        assert rel <= REL_TOL, f"{name}: {key} differs by {rel:.2e} relative after 3 steps"
    # the run moved the weights: parity is not trivially "nothing changed"
    init = ref_losses["init_norm"]
    assert abs(sum(float(v.norm()) for v in ref_params.values()) - init) > 1e-3


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_initial_weights_with_kv_heads_replicated_over_tp2(tmp_path: Path) -> None:
    """One KV head on two TP ranks: K/V stay whole on each rank and still start from the one-process value."""
    overrides = ["parallel.tp=2", "model.n_kv_heads=1"]
    run_layout(tmp_path, 2, [*CLIP, *overrides])
    assert_initial_weights_exact(tmp_path, overrides)


BF16 = ["train.precision=bf16"]
BF16_LAYOUTS = {  # name: (ranks, overrides, relative tolerance of losses and gradient norms vs one process)
    # the same bf16 computation, only fp32 gradient sums in another order
    "dp_shard2": (2, ["parallel.dp_shard=2"], 1e-6),
    "pp2": (2, ["parallel.pp=2"], 1e-6),
    # bf16 matmuls split over ranks round differently (bf16 has 8 bits of mantissa)
    "tp2": (2, ["parallel.tp=2"], 2e-3),
}


@pytest.fixture(scope="module")
def bf16_reference(tmp_path_factory) -> dict:
    return run_layout(tmp_path_factory.mktemp("single_bf16"), 1, BF16)[0]


@pytest.mark.parametrize("name", list(BF16_LAYOUTS))
def test_bf16_is_one_scheme_on_every_layout(name: str, bf16_reference: dict, tmp_path: Path) -> None:
    """bf16 parameters, activations, residual stream and pipeline messages on every layout (dp 1 too), fp32
    master weights and gradient reduction: layouts agree to the stated bf16 tolerance."""
    nproc, overrides, tol = BF16_LAYOUTS[name]
    got, _ = run_layout(tmp_path, nproc, [*BF16, *overrides])
    assert bf16_reference["hidden_dtypes"] == got["hidden_dtypes"] == ["torch.bfloat16"]
    for key in ("loss", "grad_norm"):
        for step, (a, b) in enumerate(zip(got[key], bf16_reference[key])):
            assert _rel(a, b) <= tol, f"{name} {key} step {step}: {a} vs {b}"
