"""The megatron engine (megatron-core GPTModel, DDP, optimizer and schedule on CPU over gloo) against the native
engine: same initial weights, same losses, gradient norms and weights after 3 steps at every layout it runs;
the alignment objectives unchanged; Hugging Face weights in with transformers' logits; checkpoints that move
between the engines at other layouts; one-line errors for what it cannot run."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'triarch[megatron]')")

from test_layout_parity import assert_initial_weights_exact, run_layout  # noqa: E402

from triarch.config import ConfigError, TriarchConfig, validate_for_world  # noqa: E402
from triarch.data_pipeline import prepare_pydocs  # noqa: E402
from triarch.launcher.local import launch_local  # noqa: E402

TESTS = Path(__file__).resolve().parent
EXAMPLES = TESTS.parent / "examples"
REL_TOL = 1e-5
MEGATRON = ["engine=megatron"]
LAYOUTS = {  # name: (ranks, overrides, what megatron must run there)
    "one_rank": (1, [], {"optimizers": ["FP32Optimizer"]}),
    "tp2": (2, ["parallel.tp=2", "parallel.sequence_parallel=false"], {"sequence_parallel": False}),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"], {"sequence_parallel": True}),
    "dp_shard2_distributed_optimizer": (2, ["parallel.dp_shard=2"], {"optimizers": ["DistributedOptimizer"]}),
    "dp_replicate2": (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"], {"optimizers": ["FP32Optimizer"]}),
    "tp2_dp2": (4, ["parallel.tp=2", "parallel.dp_shard=2"],
                {"sequence_parallel": True, "optimizers": ["DistributedOptimizer"]}),
    "pp2_1f1b": (2, ["parallel.pp=2", "parallel.schedule=1f1b"], {"chunks": 1}),
    "pp2_interleaved": (2, ["parallel.pp=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved_1f1b"],
                        {"chunks": 2}),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"], {"sequence_parallel": True, "chunks": 1}),
}


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    return run_layout(tmp_path_factory.mktemp("native_single"), 1, [])


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_megatron_engine_equals_native_engine(name: str, native, tmp_path: Path) -> None:
    want_losses, want_params = native
    nproc, overrides, runs = LAYOUTS[name]
    got, params = run_layout(tmp_path, nproc, [*MEGATRON, *overrides])
    assert got["engine"]["engine"] == "megatron"
    for key, value in runs.items():
        assert got["engine"][key] == value, (name, key, got["engine"])
    assert_initial_weights_exact(tmp_path, overrides)  # the native engine's initial weights, bit for bit
    assert all(g > 0.5 for g in want_losses["grad_norm"]), "clipping must be active in every step"
    for key in ("loss", "grad_norm"):
        for step, (a, b) in enumerate(zip(got[key], want_losses[key], strict=True), start=1):
            assert _rel(a, b) <= REL_TOL, f"{name} step {step}: {key} {a} vs native {b}"
    assert set(params) == set(want_params)
    for key, want in want_params.items():
        rel = float((params[key] - want).norm() / want.norm())
        assert rel <= REL_TOL, f"{name}: {key} differs from the native engine by {rel:.2e} after 3 steps"
    assert abs(sum(float(v.norm()) for v in params.values()) - want_losses["init_norm"]) > 1e-3  # weights moved


OBJECTIVES = ("sft", "rm", "dpo")


def _objectives(out: Path, nproc: int, overrides: list[str]) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    out.mkdir(parents=True, exist_ok=True)
    launch_local(nproc, [str(TESTS / "objective_worker.py"), str(out), ",".join(OBJECTIVES), *overrides])
    params: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in OBJECTIVES}
    for kind in OBJECTIVES:
        for f in sorted(out.glob(f"{kind}_params_pp*.pt")):
            params[kind].update(torch.load(f))
    return json.loads((out / "results.json").read_text()), params


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_sft_rm_and_dpo_steps_equal_the_native_engines(tmp_path: Path) -> None:
    """The alignment objectives run unchanged on megatron (tp2 with sequence parallelism x pp2: the
    vocabulary-parallel logits as a DTensor, the reward model's scalar head replicated, the pair fields reaching
    the last stage through megatron's schedule): SFT, reward-model and DPO steps (DPO's reference a frozen
    megatron engine) equal one native process."""
    want = _objectives(tmp_path / "native", 1, [])
    assert_objectives_match(_objectives(tmp_path / "megatron", 4, [*MEGATRON, "parallel.tp=2", "parallel.pp=2"]),
                            want)


def assert_objectives_match(got_run: tuple[dict, dict], want_run: tuple[dict, dict],
                            weight_tol: dict[str, float] | None = None) -> None:
    """Two ``_objectives`` runs agree: losses, gradient norms and statistics of every step within REL_TOL,
    each objective's final weights within ``weight_tol[kind]`` (default REL_TOL); DPO starts at log 2."""
    (got, got_params), (want, want_params) = got_run, want_run
    assert abs(got["dpo"]["loss"][0] - math.log(2)) < 1e-6  # the policy starts at its reference
    for kind in OBJECTIVES:
        for key in ("loss", "grad_norm"):
            for a, b in zip(got[kind][key], want[kind][key], strict=True):
                assert abs(a - b) <= REL_TOL * max(abs(b), 1.0), f"{kind} {key}: {got[kind][key]} vs {want[kind][key]}"
        for got_stats, want_stats in zip(got[kind]["stats"], want[kind]["stats"], strict=True):
            for stat, value in want_stats.items():
                assert abs(got_stats[stat] - value) <= REL_TOL * max(abs(value), 1.0), (kind, stat)
        assert got_params[kind].keys() == want_params[kind].keys()
        bound = (weight_tol or {}).get(kind, REL_TOL)
        for key, ref in want_params[kind].items():
            assert float((got_params[kind][key] - ref).norm() / ref.norm()) <= bound, (kind, key)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_hugging_face_llama_into_megatron_gives_transformers_logits(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    launch_local(2, [str(TESTS / "megatron_worker.py"), str(out), str(tmp_path / "hf"), "parallel.tp=2"])
    saved = torch.load(out / "logits.pt")
    with torch.no_grad():
        want = hf(saved["tokens"]).logits
    assert (saved["logits"] - want).abs().max().item() <= 1e-5
    from triarch.models.hf_llama import from_hf_state_dict

    expected = from_hf_state_dict({k: v.detach() for k, v in hf.state_dict().items()}, 2)
    params = torch.load(out / "params.pt")
    assert params.keys() == expected.keys()
    assert all(torch.equal(params[k], expected[k]) for k in expected)  # what export writes back out


SMALL = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
         "model.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=5",
         "train.warmup_steps=2", "train.eval_interval=0", "logging.log_interval=1", "logging.progress=off",
         "logging.tensorboard=false", "checkpoint.interval=3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_pydocs(tmp_path_factory.mktemp("data") / "pydocs", 2048, max_documents=800)


def _train_command(run_dir: Path, data: Path, nproc: int, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "triarch.cli", "train", str(EXAMPLES / "tiny.yaml"), "--nproc", str(nproc),
            "--run-dir", str(run_dir), f"data.path={data}", *SMALL, *overrides]


def _train(run_dir: Path, data: Path, nproc: int, *overrides: str) -> dict[int, float]:
    result = subprocess.run(_train_command(run_dir, data, nproc, *overrides), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Setting up DistributedDataParallel" not in result.stdout + result.stderr  # megatron-core's INFO dump
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("saved_by, resumed_by", [
    ((2, ["engine=megatron", "parallel.tp=2"]), (2, ["parallel.dp_shard=2"])),
    ((2, ["parallel.dp_shard=2"]), (2, ["engine=megatron", "parallel.dp_shard=2"])),
    ((2, ["engine=megatron", "parallel.dp_shard=2", "train.precision=bf16"]),
     (2, ["engine=megatron", "parallel.dp_replicate=2", "parallel.dp_shard=1", "train.precision=bf16"])),
    ((2, ["parallel.tp=2"]), (2, ["engine=megatron", "parallel.pp=2"])),
], ids=["megatron_tp2_to_native_dp2", "native_dp2_to_megatron_distributed_optimizer",
        "megatron_bf16_distributed_to_replicated_optimizer", "native_tp2_to_megatron_pp2"])
def test_a_checkpoint_moves_between_the_engines(saved_by, resumed_by, data: Path, tmp_path: Path) -> None:
    """Saved at step 3 by one engine, resumed by the other at another layout: steps 4 and 5 give the losses
    of the uninterrupted run (model, AdamW moments and schedule under canonical names; in bf16 the
    checkpoint holds megatron's fp32 main weights, so a resume loses nothing to bf16 rounding)."""
    reference = _train(tmp_path / "saved", data, saved_by[0], *saved_by[1])
    assert sorted(reference) == [1, 2, 3, 4, 5]
    run_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "saved" / "checkpoints" / "step_3", run_dir / "checkpoints" / "step_3")
    got = _train(run_dir, data, resumed_by[0], *resumed_by[1])
    assert sorted(got) == [4, 5]
    for step in (4, 5):
        assert got[step] == pytest.approx(reference[step], rel=REL_TOL), step
    if saved_by[1] == ["engine=megatron", "parallel.tp=2"]:  # export of a megatron checkpoint: its exact weights
        transformers = pytest.importorskip("transformers")
        from triarch.checkpointing.offline import read_full_tensors
        from triarch.models.hf_llama import from_hf_state_dict

        done = subprocess.run([sys.executable, "-m", "triarch.cli", "ckpt", "export", str(tmp_path / "saved"),
                               "--hf", str(tmp_path / "hf"), "--dtype", "fp32"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
        exported = from_hf_state_dict(dict(hf.state_dict()), hf.config.num_hidden_layers)
        saved = read_full_tensors(tmp_path / "saved" / "checkpoints" / "step_5")
        assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)


def _config(**sections) -> TriarchConfig:
    base = {"engine": "megatron", "model": {"vocab_size": 256, "dim": 64, "n_layers": 4, "n_heads": 4,
                                              "n_kv_heads": 2, "ffn_hidden": 128, "seq_len": 16}}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value) if isinstance(value, dict) else base.update({key: value})
    return TriarchConfig.model_validate(base)


@pytest.mark.parametrize("sections, world, message", [
    ({"parallel": {"tp": 4}}, 4, "model.n_kv_heads \\(2\\) must be divisible by parallel.tp \\(4\\)"),
    ({"model": {"vocab_size": 255}, "parallel": {"tp": 2}}, 2, "model.vocab_size \\(255\\) must be divisible"),
    ({"parallel": {"pp": 2, "schedule": "gpipe"}}, 2, "not parallel.schedule gpipe"),
    ({"parallel": {"pp": 2, "virtual_stages": 2, "schedule": "zero_bubble"}}, 2, "not parallel.schedule zero_bubble"),
    ({"data": {"document_masks": True}}, 1, "data.document_masks=false or engine: native"),
    ({"parallel": {"dp_replicate": 2, "dp_shard": 2}, "train": {"global_batch_size": 16}}, 4, "not both"),
    ({"train": {"precision": "fp8"}}, 1, "fp8"),
])
def test_what_megatron_cannot_run_is_one_config_error(sections: dict, world: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_for_world(_config(**sections), world)


def test_megatron_missing_is_a_one_line_error_naming_the_install(monkeypatch) -> None:
    from triarch.engine import megatron_model

    monkeypatch.setattr(megatron_model, "megatron_available", lambda: False)
    install = r"needs megatron-core, which is not installed: pip install 'triarch\[megatron\]'"
    with pytest.raises(ConfigError, match=install):
        validate_for_world(_config(), 1)


def test_the_cli_refuses_a_bad_megatron_layout_in_one_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "triarch.cli", "train", str(EXAMPLES / "tiny.yaml"), "--nproc", "2",
           "--run-dir", str(tmp_path / "run"), "engine=megatron", "parallel.tp=2", "model.vocab_size=2047"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.vocab_size (2047) must be divisible by parallel.tp (2)" in lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()
