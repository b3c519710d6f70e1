"""`triarch plan`: its memory model against the bytes of engines actually built (exact for parameters,
gradients and AdamW state; peak within 20% of a measured CPU step), a golden plan for the 70B example, and
one-line reasons when nothing fits.

Peak memory on CPU is measured as the tensors a step starts with (parameters and AdamW state, counted from
their storages) plus the most the CPU allocator held above that during the step (torch.profiler's memory
events, ``Total Allocated``): tensor bytes only, which is what the planner predicts (no Python heap, no
shared libraries), so the two are comparable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from triarch.config import ConfigError, apply_overrides, config_from_dict, load_config, validate_for_world
from triarch.launcher.local import launch_local
from triarch.planning.devices import load_device
from triarch.planning.estimate import estimate_memory
from triarch.planning.memory import Layout, model_key, static_bytes
from triarch.planning.search import evaluate, plan

sys.path.insert(0, str(Path(__file__).parent))
from plan_worker import BASE  # noqa: E402

WORKER = str(Path(__file__).with_name("plan_worker.py"))
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GOLDEN = Path(__file__).parent / "golden"
PEAK_TOLERANCE = 0.2  # the bound; measured 0.86-1.05 (predicted / measured) on these layouts
SMALL = ["model.dim=256", "model.ffn_hidden=768", "model.vocab_size=2000", "model.seq_len=128",
         "model.max_seq_len=128"]
M125 = ["model.dim=768", "model.n_heads=12", "model.n_kv_heads=12", "model.ffn_hidden=2048", "model.vocab_size=32000",
        "model.n_layers=2", "model.seq_len=256", "model.max_seq_len=256", "train.micro_batch_size=1",
        "train.global_batch_size=2"]
LAYOUTS = {
    "recompute_none": (1, SMALL),
    "recompute_selective": (1, [*SMALL, "train.activation_checkpoint=selective"]),
    "recompute_full": (1, [*SMALL, "train.activation_checkpoint=full"]),
    "bf16": (1, [*SMALL, "train.precision=bf16"]),
    "125m_shaped": (1, M125),
    "pp2": (2, [*SMALL, "parallel.pp=2"]),
    "dp_shard4_uneven": (4, [*SMALL, "model.vocab_size=2002", "parallel.dp_shard=4"]),  # FSDP pads 2002 rows
    "tp4_kv_replicated": (4, [*SMALL, "parallel.tp=4"]),  # 2 KV heads on 4 TP ranks stay whole
    "tp2_pp2_bf16": (4, [*SMALL, "parallel.tp=2", "parallel.pp=2", "train.precision=bf16"]),
    "fsdp_offload_dp2": (2, [*SMALL, "parallel.dp_shard=2", "parallel.fsdp_offload=cpu"]),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_predicted_bytes_match_a_built_engine(name: str, tmp_path: Path) -> None:
    nproc, overrides = LAYOUTS[name]
    launch_local(nproc, [WORKER, str(tmp_path), *overrides])
    cfg = validate_for_world(config_from_dict(apply_overrides(json.loads(json.dumps(BASE)), overrides)), nproc)
    layout = Layout.of(cfg)
    stage_first = {}
    for rank in range(nproc):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        want = static_bytes(cfg, layout, got["pp_rank"])
        assert (got["parameters"], got["gradients"]) == (want.parameters, want.gradients), (rank, got, want)
        stage_first.setdefault(got["pp_rank"], got)
        # AdamW's moments are zeros_like the unpadded shard: the stage's first rank holds the most
        assert got["optimizer"] <= want.optimizer
        est = estimate_memory(cfg, layout, pp_rank=got["pp_rank"])
        peak = est.total + est.host  # on CPU offloaded state shares the one memory
        assert abs(peak / got["step_peak"] - 1) <= PEAK_TOLERANCE, (rank, peak, got["step_peak"])
    for pp_rank, got in stage_first.items():
        assert got["optimizer"] == static_bytes(cfg, layout, pp_rank).optimizer


def _meta_parameter_bytes(cfg, world: int, rank: int) -> tuple[int, int]:
    """(pipeline rank, parameter storage bytes) of ``rank``'s engine built on the meta device."""
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from triarch.engine.build import build_engine
    from triarch.parallel.topology import Topology

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        p = cfg.parallel
        topo = Topology.build(torch.device("cpu"), pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp)
        engine = build_engine(cfg, topo, materialize_weights=False)
        total = 0
        for chunk in engine.chunks:
            for prm in chunk.parameters():
                local = prm.to_local() if isinstance(prm, DTensor) else prm
                total += local.untyped_storage().nbytes()
        return topo.pp_rank, total
    finally:
        dist.destroy_process_group()


FOUR_RANK_LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4)]  # (tp, pp), the rest data parallel


def _example_cases() -> list[tuple[str, int, tuple[int, int] | None]]:
    cases = [(path.name, 4, tp_pp) for path in sorted(EXAMPLES.glob("*.yaml")) for tp_pp in FOUR_RANK_LAYOUTS]
    return cases + [("8b.yaml", 8, None), ("70b.yaml", 64, None)]  # the examples' own layouts


@pytest.mark.timeout(600)
def test_parameter_bytes_of_every_example_layout_equal_a_meta_build() -> None:
    checked, seen = 0, set()
    for name, world, tp_pp in _example_cases():
        overrides = [] if tp_pp is None else [f"parallel.tp={tp_pp[0]}", f"parallel.pp={tp_pp[1]}",
                                              "parallel.dp_replicate=1", "parallel.dp_shard=-1",
                                              "parallel.virtual_stages=1", "parallel.schedule=1f1b"]
        try:
            cfg = validate_for_world(load_config(EXAMPLES / name, overrides), world)
        except Exception:  # a layout this config's shapes or batch do not allow on four ranks
            continue
        layout = Layout.of(cfg)
        head = "score" if cfg.objective.kind == "rm" else "lm"
        key = (model_key(cfg.model), head, tp_pp or (cfg.parallel.tp, cfg.parallel.pp), world)
        if key in seen:  # the alignment examples share their base's shapes
            continue
        seen.add(key)
        for stage in range(cfg.parallel.pp):
            pp_rank, got = _meta_parameter_bytes(cfg, world, stage * (world // cfg.parallel.pp))
            assert got == static_bytes(cfg, layout, pp_rank, head).parameters, (name, tp_pp, stage)
            checked += 1
    assert checked >= 25


def _summary(candidates) -> list[dict]:
    return [{"overrides": c.layout.overrides(), "memory_gib": round(c.memory.total / 2**30, 1),
             "step_s": round(c.step.total, 2), "tokens_per_s": round(c.tokens_per_s, -1)} for c in candidates]


@pytest.mark.parametrize("gpus", [64, 512])
def test_golden_plan_for_the_70b_example(gpus: int) -> None:
    cfg = load_config(EXAMPLES / "70b.yaml")
    candidates = plan(cfg, gpus, 8, load_device("h100"), top=5)
    for c in candidates:
        validate_for_world(c.layout.apply(cfg), gpus)
        assert c.fits and c.memory.total <= load_device("h100").usable_bytes
    got = _summary(candidates)
    golden = GOLDEN / f"plan_70b_{gpus}xh100.json"
    if os.environ.get("TRIARCH_UPDATE_GOLDEN"):
        golden.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(golden.read_text()), f"the plan changed; review and regenerate {golden} " \
                                                   "with TRIARCH_UPDATE_GOLDEN=1"
    assert [c.tokens_per_s for c in candidates] == sorted((c.tokens_per_s for c in candidates), reverse=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "triarch.cli", *args], capture_output=True, text=True, timeout=120)


def test_plan_cli_prints_the_best_layout_and_json() -> None:
    done = _cli("plan", str(EXAMPLES / "8b.yaml"), "--gpus", "16", "--top", "3")
    assert done.returncode == 0, done.stderr
    assert "run it with: parallel.tp=" in done.stdout
    done = _cli("plan", str(EXAMPLES / "8b.yaml"), "--gpus", "16", "--top", "3", "--json")
    rows = json.loads(done.stdout)["layouts"]
    assert len(rows) == 3 and all(r["memory_bytes"]["total"] <= json.loads(done.stdout)["usable_bytes"] for r in rows)


def test_offloaded_plans_keep_the_state_in_host_memory() -> None:
    """70B on one node of 8 H100s fits only with FSDP2's CPU offload: the device then holds the activations and
    the gathered blocks, each node's host the ranks' exact state; offload costs time where the state fits."""
    cfg, h100 = load_config(EXAMPLES / "70b.yaml"), load_device("h100")
    with pytest.raises(ConfigError):
        plan(cfg, 8, 8, h100, top=3)
    chosen = plan(cfg, 8, 8, h100, top=3, offloads=["cpu"])
    for c in chosen:
        validate_for_world(c.layout.apply(cfg), 8)
        assert c.layout.fsdp_offload == "cpu" and "parallel.fsdp_offload=cpu" in c.layout.overrides()
        stages = [static_bytes(cfg, c.layout, s).total for s in range(c.layout.pp)]
        assert c.memory.host in stages
        assert c.memory.total == c.memory.activations + c.memory.logits + c.memory.buffers <= h100.usable_bytes
        assert c.host_per_node == sum(stages) * (8 // c.layout.pp) <= h100.host_usable_bytes  # one node
    cfg8 = load_config(EXAMPLES / "8b.yaml")
    on_device = plan(cfg8, 16, 8, h100, top=1, offloads=["none"])[0]
    offloaded = evaluate(on_device.layout.apply(cfg8), replace(on_device.layout, fsdp_offload="cpu"), h100, 8)
    assert offloaded.step.total > on_device.step.total and offloaded.step.optimizer > on_device.step.optimizer


# ZeRO-3 in bf16 peaks with or without a float32 copy of the gradient bucket, run to run (measured 7.47 and
# 5.95 MB on the same rank: 4 bytes per parameter of this small model); the plan counts the copy, so it is
# within 20% above the larger peak and up to 25% above the smaller one
ZERO3_BF16_PEAK_BOUNDS = (0.8, 1.25)
ZERO_LAYOUTS = {  # 2 ranks; vocabulary 2002: ZeRO pads each flat group to a multiple of 2 x dp
    "zero1_offload_optimizer": ["deepspeed.zero_stage=1", "deepspeed.offload_optimizer=cpu"],
    "zero2_bf16": ["deepspeed.zero_stage=2", "train.precision=bf16"],
    "zero3_bf16": ["deepspeed.zero_stage=3", "train.precision=bf16"],
    "zero3_offload_optimizer_and_params": ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu",
                                           "deepspeed.offload_params=cpu"],
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(ZERO_LAYOUTS))
def test_deepspeed_predicted_bytes_match_a_built_engine(name: str, tmp_path: Path) -> None:
    """The module's parameters (whole padded flat groups at stages 1-2, each rank's slices at stage 3) and the
    float32 master partitions with AdamW's state are exact; the step's peak within the same 20% (on CPU the
    offloaded state shares the one memory). ZeRO's gradients are checked through the peak only: it hands
    AdamW one group's gradient at a time."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    overrides = ["engine=deepspeed", "parallel.dp_shard=2", "model.vocab_size=2002", *ZERO_LAYOUTS[name]]
    launch_local(2, [WORKER, str(tmp_path), *overrides])
    cfg = validate_for_world(config_from_dict(apply_overrides(json.loads(json.dumps(BASE)), overrides)), 2)
    est = estimate_memory(cfg, Layout.of(cfg))
    assert est.offloaded == ("deepspeed.offload_optimizer=cpu" in overrides)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["parameters"] == est.parameters + est.host_parameters, (rank, got, est)
        assert got["optimizer"] == est.optimizer + est.host_optimizer, (rank, got, est)
        low, high = ZERO3_BF16_PEAK_BOUNDS if name == "zero3_bf16" else (1 - PEAK_TOLERANCE, 1 + PEAK_TOLERANCE)
        assert low <= (est.total + est.host) / got["step_peak"] <= high, (rank, est, got["step_peak"])


def test_deepspeed_plans_weigh_zero_stages_and_offload() -> None:
    """70B on 8 H100s under DeepSpeed: only ZeRO-3 with the optimizer state offloaded fits; for 8B on 8,
    offload trades step time for device memory."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    h100 = load_device("h100")
    cfg = load_config(EXAMPLES / "70b.yaml", ["engine=deepspeed", "train.compile=false"])
    chosen = plan(cfg, 8, 8, h100, top=5)
    for c in chosen:
        assert c.layout.zero_stage == 3 and c.layout.offload_optimizer == "cpu", c.layout
        assert c.layout.overrides()[:5] == ["parallel.tp=1", "parallel.pp=1", "parallel.dp_replicate=1",
                                            "parallel.dp_shard=8", "deepspeed.zero_stage=3"]
        assert c.memory.total <= h100.usable_bytes and c.host_per_node == 8 * c.memory.host <= h100.host_usable_bytes
        validate_for_world(c.layout.apply(cfg), 8)
    cfg8 = load_config(EXAMPLES / "8b.yaml", ["engine=deepspeed", "train.compile=false"])
    assert plan(cfg8, 8, 8, h100, top=1)[0].fits
    on_device = Layout(1, 1, 1, 1, 8, 1, "full", "bf16", sequence_parallel=False, zero_stage=3)
    offloaded = evaluate(cfg8, replace(on_device, offload_optimizer="cpu"), h100, 8)
    on_device = evaluate(cfg8, on_device, h100, 8)
    assert on_device.fits and not on_device.memory.offloaded and offloaded.memory.offloaded
    assert offloaded.step.total > on_device.step.total and offloaded.memory.total < on_device.memory.total


@pytest.mark.parametrize("args, needle", [
    (["70b.yaml", "--gpus", "8", "--gpu", "a100"], "its largest term is parameters + gradients + optimizer state"),
    (["8b.yaml", "--gpus", "8", "--gpu", "x100"], "known: h100"),
    (["8b.yaml", "--gpus", "8", "--gpu", "a100", "--precision", "fp8"], "no FP8 tensor cores"),
    (["8b.yaml", "--gpus", "12", "--gpus-per-node", "8"], "whole number of nodes"),
    (["8b.yaml", "--gpus", "1000000000"], "plan up to 10,000,000 GPUs"),  # at once, not in minutes
    (["8b.yaml", "--gpus", "1000000000000000000"], "plan up to 10,000,000 GPUs"),  # (this one hung)
    (["8b.yaml", "--gpus", "9999992"], "no layout of 8b divides 9999992 GPUs"),
    (["8b.yaml", "--gpus", "8", "engine=megatron"], "not planned yet"),
    (["8b.yaml", "--gpus", "8", "engine=deepspeed"], "train.compile applies to engine: native"),
    (["8b.yaml", "--gpus", "8", "engine=deepspeed", "train.compile=false", "--precision", "fp8"],
     "not deepspeed"),
    (["8b.yaml", "--gpus", "8", "engine=deepspeed", "train.compile=false", "--fsdp-offload", "cpu"],
     "--fsdp-offload is the native engine's"),
    (["8b.yaml", "--gpus", "8", "engine=deepspeed", "train.compile=false", "parallel.fsdp_offload=cpu"],
     "parallel.fsdp_offload 'cpu' is the native engine's"),
    (["70b.yaml", "--gpus", "8"], "it fits with parameters, gradients and optimizer state in host memory: add "
                                  "--fsdp-offload cpu"),
    (["70b.yaml", "--gpus", "8", "--fsdp-offload", "cpu", "model.n_layers=200"], "GiB usable host memory"),
])
def test_impossible_plans_are_one_line_errors(args: list[str], needle: str) -> None:
    done = _cli("plan", str(EXAMPLES / args[0]), *args[1:])
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
