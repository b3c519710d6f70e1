"""The deepspeed engine (DeepSpeed ZeRO 1/2/3 with and without offload, on CPU over gloo) against the native
engine: same initial weights, same losses, gradient norms and weights after 3 steps; the alignment objectives
unchanged; checkpoints that resume at another data-parallel size and on the native engine (and the reverse);
a ZeRO checkpoint written by DeepSpeed itself around a transformers Llama imported with transformers' logits;
one-line errors for what it cannot run. Nothing here JIT-compiles a DeepSpeed op (client torch AdamW)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'triarch[deepspeed]')")

from layout_worker import BASE  # noqa: E402
from processes import rank_pids  # noqa: E402
from test_checkpoint_hf import triarch_logits  # noqa: E402
from test_layout_parity import assert_initial_weights_exact, run_layout  # noqa: E402
from test_megatron_engine import _objectives, _train, _train_command, assert_objectives_match  # noqa: E402

from triarch.checkpointing.offline import read_full_tensors  # noqa: E402
from triarch.config import ConfigError, TriarchConfig, validate_for_world  # noqa: E402
from triarch.data_pipeline import prepare_pydocs  # noqa: E402
from triarch.launcher.local import launch_local  # noqa: E402
from triarch.models.hf_llama import from_hf_state_dict  # noqa: E402

TESTS = Path(__file__).resolve().parent
EXAMPLES = TESTS.parent / "examples"
REL_TOL = 1e-5
DS = ["engine=deepspeed", "parallel.dp_shard=2"]
LAYERS = BASE["model"]["n_layers"]
LAYOUTS = {  # name: overrides on 2 ranks
    "zero1": ["deepspeed.zero_stage=1"],
    "zero2": ["deepspeed.zero_stage=2"],
    "zero3": ["deepspeed.zero_stage=3"],
    "zero1_offload_optimizer": ["deepspeed.zero_stage=1", "deepspeed.offload_optimizer=cpu"],
    "zero2_offload_optimizer": ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu"],
    "zero3_offload_optimizer_and_params": ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu",
                                           "deepspeed.offload_params=cpu"],
    # recomputation changes memory, not numbers: ZeRO-3 gathers each block's partitions again for it
    "zero3_full_recompute": ["deepspeed.zero_stage=3", "train.activation_checkpoint=full"],
    "zero2_selective_recompute": ["deepspeed.zero_stage=2", "train.activation_checkpoint=selective"],
}
OPTIMIZERS = {1: "DeepSpeedZeroOptimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    return run_layout(tmp_path_factory.mktemp("native_single"), 1, [])


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_deepspeed_engine_equals_native_engine(name: str, native, tmp_path: Path) -> None:
    want, want_params = native
    overrides = [*DS, *LAYOUTS[name]]
    got, params = run_layout(tmp_path, 2, overrides)
    stage = int(LAYOUTS[name][0].rsplit("=", 1)[1])
    assert got["engine"]["engine"] == "deepspeed" and got["engine"]["zero_stage"] == stage
    assert got["engine"]["optimizer"] == OPTIMIZERS[stage], got["engine"]
    assert got["engine"]["built_partitioned"] == (stage == 3)  # ZeRO-3: under deepspeed.zero.Init
    recompute = "train.activation_checkpoint=none" not in overrides and any("checkpoint=" in o for o in overrides)
    assert got["engine"]["checkpointed_blocks"] == (LAYERS if recompute else 0), got["engine"]
    assert_initial_weights_exact(tmp_path, overrides)  # the native engine's initial weights, bit for bit
    assert all(g > 0.5 for g in want["grad_norm"]), "clipping must be active in every step"
    for key in ("loss", "grad_norm"):
        for step, (a, b) in enumerate(zip(got[key], want[key], strict=True), start=1):
            assert abs(a - b) <= REL_TOL * abs(b), f"{name} step {step}: {key} {a} vs native {b}"
    assert set(params) == set(want_params)
    for key, ref in want_params.items():
        rel = float((params[key] - ref).norm() / ref.norm())
        assert rel <= REL_TOL, f"{name}: {key} differs from the native engine by {rel:.2e} after 3 steps"
    assert abs(sum(float(v.norm()) for v in params.values()) - want["init_norm"]) > 1e-3  # weights moved


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_sft_rm_and_dpo_steps_equal_the_native_engines(tmp_path: Path) -> None:
    """SFT, reward-model and DPO steps at ZeRO-3 on 2 ranks (DPO's reference a frozen engine of the same kind)
    equal one native process. SFT's weights are compared within 5e-5: one element of one matrix
    (layers.1.feed_forward.w2) has a gradient near AdamW's eps, where the order of DeepSpeed's gradient
    accumulation (summed locally over micro-batches, then reduced) moves its update by 9e-6; every other
    parameter, and every loss and gradient norm, is within 1e-5."""
    got, want = _objectives(tmp_path / "deepspeed", 2, [*DS, "deepspeed.zero_stage=3"]), _objectives(
        tmp_path / "native", 1, [])
    assert_objectives_match(got, want, weight_tol={"sft": 5e-5})
    dpo = got[0]["dpo"]  # the reference is partitioned like the policy: each rank holds half of it
    assert dpo["reference"]["built_partitioned"] and dpo["reference"]["zero_stage"] == 3, dpo["reference"]
    whole = sum(v.numel() for v in want[1]["dpo"].values())
    assert dpo["reference_local_parameters"] == dpo["local_parameters"] <= whole // 2 + 64


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides", [["deepspeed.zero_stage=3", "train.precision=bf16"], ["deepspeed.zero_stage=2"]],
                         ids=["zero3_bf16", "zero2"])
def test_weights_loaded_after_a_forward_are_the_ones_the_next_forward_uses(overrides: list[str],
                                                                           tmp_path: Path) -> None:
    """ZeRO-3 keeps small parameters gathered between forwards; a load into an engine that already ran one (a
    trainable engine through its checkpoint state, a frozen one through its model state, as ``init.from`` loads
    a reference) must release and regather them: the next forward gives the source engine's loss exactly."""
    launch_local(2, [str(TESTS / "deepspeed_load_worker.py"), str(tmp_path), *DS, *overrides])
    got = json.loads((tmp_path / "losses.json").read_text())
    assert got["before"] != got["trained"]  # the fresh engine's own weights differ
    assert got["loaded"] == got["trained"] == got["frozen_loaded"], got
    assert got["frozen"]["built_partitioned"] == ("deepspeed.zero_stage=3" in overrides), got["frozen"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_pydocs(tmp_path_factory.mktemp("data") / "pydocs", 2048, max_documents=800)


ZERO3_DP2 = (2, [*DS, "deepspeed.zero_stage=3"])


@pytest.fixture(scope="module")
def zero3_run(data: Path, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """5 uninterrupted steps at ZeRO-3 on 2 ranks, checkpointed at step 3."""
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    done = subprocess.run(_train_command(run_dir, data, ZERO3_DP2[0], *ZERO3_DP2[1]), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FutureWarning" not in done.stderr, done.stderr[-3000:]  # DeepSpeed's deprecated collectives, per step
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def zero3_killed(data: Path, tmp_path_factory) -> Path:
    """The run of ``zero3_run`` with rank 1 SIGKILLed right after the step-3 checkpoint committed (saved
    synchronously, so the kill lands in step 4): the run directory a dead node leaves."""
    run_dir = tmp_path_factory.mktemp("zero3_killed") / "run"
    proc = subprocess.Popen(_train_command(run_dir, data, ZERO3_DP2[0], *ZERO3_DP2[1], "checkpoint.async_save=false"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    committed = run_dir / "checkpoints" / "step_3" / "COMMITTED.json"
    deadline = time.monotonic() + 400
    while not committed.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.005)
    victims = rank_pids(1, proc.pid)  # this run's rank 1 only
    assert victims, "rank 1 is not running"
    for pid in victims:
        os.kill(pid, signal.SIGSTOP)  # frozen at once, then killed for real
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0, stderr[-3000:]
    assert max(logged) < 5, f"the run ended before the kill: steps {logged}"
    return run_dir


def _resume(source: Path, run_dir: Path, data: Path, nproc: int, overrides: list[str]) -> dict[int, float]:
    """Resume a copy of ``source`` (a killed run, or a finished one cut back to its step-3 checkpoint) on
    ``nproc`` ranks; the losses this resumed process logs."""
    shutil.copytree(source, run_dir)
    (run_dir / "metrics.jsonl").unlink()
    for later in (run_dir / "checkpoints").glob("step_*"):
        if int(later.name.split("_")[1]) > 3:
            shutil.rmtree(later)
    return _train(run_dir, data, nproc, *overrides)


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("resumed_by", [
    ZERO3_DP2,
    (1, ["engine=deepspeed", "deepspeed.zero_stage=3"]),  # a lone ZeRO-3 process (no LOCAL_RANK: a crash before)
    (2, ["parallel.dp_shard=2"]),
    (2, ["engine=megatron", "parallel.tp=2"]),
], ids=["zero3_dp2_same", "zero3_one_rank", "native_fsdp_dp2", "megatron_tp2"])
def test_a_zero3_run_resumes_at_another_size_and_on_the_other_engines(resumed_by, zero3_run, zero3_killed,
                                                                       data: Path, tmp_path: Path) -> None:
    """Killed in step 4 (rank 1 SIGKILLed) and resumed from the step-3 checkpoint: steps 4 and 5 give the
    uninterrupted run's losses (weights, AdamW moments and step, schedule)."""
    if "engine=megatron" in resumed_by[1]:
        pytest.importorskip("megatron.core")
    _, reference = zero3_run
    assert sorted(reference) == [1, 2, 3, 4, 5]
    got = _resume(zero3_killed, tmp_path / "resumed", data, resumed_by[0], resumed_by[1])
    assert sorted(got) == [4, 5]
    for step in (4, 5):
        assert got[step] == pytest.approx(reference[step], rel=REL_TOL), step


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_a_native_tp2_checkpoint_resumes_on_zero2_with_offload(data: Path, tmp_path: Path) -> None:
    reference = _train(tmp_path / "saved", data, 2, "parallel.tp=2")
    got = _resume(tmp_path / "saved", tmp_path / "resumed", data, 2,
                  [*DS, "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu"])
    assert sorted(got) == [4, 5]
    for step in (4, 5):
        assert got[step] == pytest.approx(reference[step], rel=REL_TOL), step


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_a_bf16_zero3_checkpoint_resumes_from_the_fp32_master_weights(data: Path, tmp_path: Path) -> None:
    """bf16 (DeepSpeed's own scheme: a bf16 model, fp32 master weights and AdamW state, fp32 gradient
    accumulation and reduction): the checkpoint holds the fp32 master weights, so a resume on ZeRO-3 loses
    nothing (1e-5). On ZeRO-2 the bf16 arithmetic of a step differs from ZeRO-3's by itself (uninterrupted runs
    of the two stages read 7.3908 and 7.3914 at step 5 here), so that resume is held to 1e-4."""
    saved = [*DS, "deepspeed.zero_stage=3", "train.precision=bf16"]
    reference = _train(tmp_path / "saved", data, 2, *saved)
    same = _resume(tmp_path / "saved", tmp_path / "zero3", data, 2, saved)
    other = _resume(tmp_path / "saved", tmp_path / "zero2", data, 2,
                    [*DS, "deepspeed.zero_stage=2", "train.precision=bf16"])
    for step in (4, 5):
        assert same[step] == pytest.approx(reference[step], rel=REL_TOL), step
        assert other[step] == pytest.approx(reference[step], rel=1e-4), step


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage", [2, 3])
def test_a_deepspeed_checkpoint_of_a_transformers_llama_imports_with_its_logits_and_adam_state(
        stage: int, data: Path, tmp_path: Path) -> None:
    """DeepSpeed itself (ZeRO-2 or 3 on 2 ranks, two AdamW steps, its own save_checkpoint) writes the folder, as
    HF Trainer does. The import gives transformers' logits, and each parameter's Adam moments equal what
    DeepSpeed's live engine reported for it (bit for bit); a run started from the import continues that AdamW
    (its step count goes on from 2)."""
    pytest.importorskip("transformers")
    folder = tmp_path / "checkpoint-2"
    launch_local(2, [str(TESTS / "deepspeed_hf_worker.py"), str(folder), str(stage)])
    assert len(list((folder / "global_step2").glob("*optim_states.pt"))) == 2  # one partition per rank
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "triarch.cli", "ckpt", "import", "--deepspeed", str(folder),
                           "--run-dir", str(run)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "optimizer state imported: AdamW moments and step (2)" in done.stdout, done.stdout
    expected = torch.load(folder / "expected.pt")
    step0 = run / "checkpoints" / "step_0"
    ours = triarch_logits(read_full_tensors(step0), json.loads((folder / "config.json").read_text()),
                          expected["tokens"])
    assert (ours - expected["logits"]).abs().max().item() <= 1e-5
    optim = read_full_tensors(step0, "optim.")
    for moment in ("exp_avg", "exp_avg_sq"):
        hf = {k.removesuffix(f".{moment}"): v for k, v in expected["moments"].items() if k.endswith(f".{moment}")}
        want = from_hf_state_dict(hf, 2)
        assert len(want) == 3 + 9 * 2  # embedding, head, final norm; 9 per layer
        for name, value in want.items():
            assert torch.equal(optim[f"{name}.{moment}"], value), (name, moment)
        assert any(float(v.abs().max()) > 0 for v in want.values())
    assert {float(v) for k, v in optim.items() if k.endswith(".step")} == {2.0}

    resumed = subprocess.run([sys.executable, "-m", "triarch.cli", "train", str(run / "config.yaml"), "--run-dir",
                              str(run), f"data.path={data}", "train.steps=1", "train.warmup_steps=0",
                              "train.global_batch_size=2", "train.micro_batch_size=2", "checkpoint.interval=1",
                              "logging.progress=off", "logging.tensorboard=false", "train.eval_interval=0"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = read_full_tensors(run / "checkpoints" / "step_1", "optim.")
    assert {float(v) for k, v in after.items() if k.endswith(".step")} == {3.0}


def _cli_error(*argv: str, timeout: int = 120) -> str:
    result = subprocess.run([sys.executable, "-m", "triarch.cli", *argv], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


HF_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
             "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def test_import_refuses_what_is_not_a_deepspeed_checkpoint_in_one_line(tmp_path: Path) -> None:
    from triarch.checkpointing.deepspeed_import import import_deepspeed
    from triarch.checkpointing.errors import CheckpointError

    not_ds = tmp_path / "plain"
    not_ds.mkdir()
    (not_ds / "config.json").write_text(json.dumps(HF_CONFIG))
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint folder: no 'latest' file and no global_step"):
        import_deepspeed(not_ds, tmp_path / "a")
    no_config = tmp_path / "noconf"
    (no_config / "global_step3").mkdir(parents=True)
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (no_config / "global_step3" / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match="has no config.json"):
        import_deepspeed(no_config, tmp_path / "b")
    only_model = tmp_path / "nozero"
    (only_model / "global_step3").mkdir(parents=True)
    (only_model / "latest").write_text("global_step3")
    (only_model / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="holds no \\*optim_states.pt"):
        import_deepspeed(only_model, tmp_path / "c")
    (only_model / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"truncated")
    (only_model / "config.json").write_text(json.dumps(HF_CONFIG))
    assert "DeepSpeed could not assemble the checkpoint" in _cli_error("ckpt", "import", "--deepspeed", str(only_model),
                                                                    "--run-dir", str(tmp_path / "c"))
    assert not any((tmp_path / name).exists() for name in "abc")


def _config(**sections) -> TriarchConfig:
    base = {"engine": "deepspeed", "model": {"vocab_size": 256, "dim": 64, "n_layers": 2, "n_heads": 4,
                                               "n_kv_heads": 2, "ffn_hidden": 128, "seq_len": 16}}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value) if isinstance(value, dict) else base.update({key: value})
    return TriarchConfig.model_validate(base)


def _json_file(tmp_path: Path, content: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return str(path)


@pytest.mark.parametrize("sections, world, message", [
    ({"parallel": {"tp": 2}}, 2, "ZeRO data parallelism only .* engine native or megatron"),
    ({"parallel": {"pp": 2}}, 2, "ZeRO data parallelism only"),
    ({"parallel": {"dp_replicate": 2, "dp_shard": 1}}, 2, "parallel.dp_replicate \\(2\\) must be 1"),
    ({"train": {"precision": "fp8"}}, 1, "fp8.* not deepspeed"),
    ({"deepspeed": {"zero_stage": 2, "offload_params": "cpu"}}, 1, "only ZeRO stage 3 does"),
    ({"deepspeed": {"zero_stage": 3, "offload_params": "nvme"}}, 1, "needs deepspeed.nvme_path"),
    ({"deepspeed": {"optimizer": "deepspeed_cpu_adam"}}, 1, "set deepspeed.offload_optimizer=cpu"),
    ({"deepspeed": {"zero_stage": 3, "offload_optimizer": "nvme", "nvme_path": "/no/such/nvme"}}, 1,
     "deepspeed.nvme_path '/no/such/nvme' is not an existing folder"),
    ({"parallel": {"fsdp_offload": "cpu"}}, 1, "FSDP2's CPU offload, run by engine native only.*deepspeed.offload_"),
    ({"deepspeed": {"zero_stage": 3}, "train": {"activation_checkpoint": "selective"}}, 2,
     "'selective' does not run under deepspeed.zero_stage 3"),
])
def test_what_deepspeed_cannot_run_is_one_config_error(sections: dict, world: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_for_world(_config(**sections), world)


@pytest.mark.parametrize("content, message", [
    ({"zero_optimisation": {"stage": 3}}, "unknown DeepSpeed key\\(s\\) zero_optimisation"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, "unknown zero_optimization key\\(s\\) overlap_com"),
    ({"zero_optimization": {"offload_optimizer": "cpu"}}, "zero_optimization.offload_optimizer must be an object"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
     "offload_param.device 'nvme' but deepspeed.offload_params is 'none': set deepspeed.offload_params=nvme"),
    ({"fp16": {"enabled": True}}, "enables fp16.*refuses fp16 on CPU"),
    ({"optimizer": {"type": "AdamW"}}, "has 'optimizer': triarch runs its own AdamW"),
    ({"train_micro_batch_size_per_gpu": 4}, "sets train_micro_batch_size_per_gpu to 4 but this run's config makes "
                                            "it 2"),
    ({"zero_optimization": {"stage": 3}}, "sets zero_optimization.stage to 3 but this run's config makes it 2"),
    ({"train_batch_size": 64}, "train_batch_size to 64 but this run's train.global_batch_size is 8"),
])
def test_a_deepspeed_json_that_conflicts_is_one_config_error(content: dict, message: str, tmp_path: Path) -> None:
    cfg = _config(deepspeed={"config_file": _json_file(tmp_path, content)},
                  train={"micro_batch_size": 2, "global_batch_size": 8})
    with pytest.raises(ConfigError, match=message):
        validate_for_world(cfg, 1)


def test_a_deepspeed_json_merges_under_the_runs_keys(tmp_path: Path) -> None:
    from triarch.config import load_config
    from triarch.engine.deepspeed_config import deepspeed_json
    from triarch.training.model_flops import parameter_count

    content = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
               "zero_optimization": {"stage": 2, "contiguous_gradients": True, "reduce_bucket_size": "auto"},
               "comms_logger": {"enabled": False}}
    cfg = validate_for_world(_config(deepspeed={"config_file": _json_file(tmp_path, content)},
                                     train={"micro_batch_size": 2, "global_batch_size": 8, "grad_clip": 0.5}), 2)
    merged = deepspeed_json(cfg, n_microbatches=2)
    assert merged["train_micro_batch_size_per_gpu"] == 2 and merged["gradient_clipping"] == 0.5
    assert merged["gradient_accumulation_steps"] == 2
    assert merged["zero_optimization"]["contiguous_gradients"] is True  # theirs, which the run does not set
    n = parameter_count(cfg.model)  # "auto": the run's, capped at the model's size (a bigger one never fills)
    assert merged["zero_optimization"]["reduce_bucket_size"] == n + n % 2 < 500_000_000
    large = validate_for_world(load_config(EXAMPLES / "8b.yaml", ["engine=deepspeed", "parallel.tp=1",
                                                                "train.compile=false"]), 8)
    assert deepspeed_json(large, n_microbatches=1)["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert merged["comms_logger"] == {"enabled": False}


def test_the_cli_refuses_bad_deepspeed_input_in_one_line(tmp_path: Path) -> None:
    base = ["train", str(EXAMPLES / "tiny.yaml"), "--nproc", "2", "--run-dir", str(tmp_path / "run"),
            "engine=deepspeed"]
    assert "unknown DeepSpeed key(s) zero_optimisation" in _cli_error(
        *base, f"deepspeed.config_file={_json_file(tmp_path, {'zero_optimisation': {}})}")
    fp16 = _json_file(tmp_path, {"fp16": {"enabled": True}})
    assert "enables fp16" in _cli_error(*base, f"deepspeed.config_file={fp16}")
    assert "is not an existing folder" in _cli_error(*base, "deepspeed.zero_stage=3", "deepspeed.offload_params=nvme",
                                                     f"deepspeed.nvme_path={tmp_path / 'missing'}")
    assert "deepspeed.zero_stg" in _cli_error(*base, "deepspeed.zero_stg=3")
    assert not (tmp_path / "run" / "checkpoints").exists()
