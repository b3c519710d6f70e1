"""`triarch ppo|grpo` through the CLI on the synthetic preference prompts: metrics per iteration, resume
after a rank is SIGKILLed mid-iteration (on another layout) equal to the uninterrupted run, and bad input
refused with one line and exit 2 before any rank starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from triarch.checkpointing.offline import read_full_tensors
from triarch.data_pipeline.prepare.pydocs import stdlib_docstrings
from triarch.data_pipeline.prepare.synthetic_preferences import make_synthetic_preferences

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STOPPED = 6  # exit code of a run that saved and stopped on request (launcher.exit_codes)
MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
         "model.seq_len=128", "model.max_seq_len=256"]
COMMON = [*MODEL, "logging.progress=off", "logging.tensorboard=false", "logging.log_interval=1",
          "train.micro_batch_size=2", "train.global_batch_size=4", "rl.rollout.max_new_tokens=12",
          "train.lr=1e-4", "fault.hang_timeout_s=0"]
METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "hfu", "mfu_source", "step_time_s", "peak_mem_bytes",
           "reward_mean",
           "reward_std", "kl", "kl_coef", "entropy", "clip_fraction", "approx_kl", "response_length",
           "generate_s", "score_s", "train_s", "generate_fraction")


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "triarch.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rl_data") / "prefs"
    make_synthetic_preferences(out, seed=0, pairs=120, eval_fraction=0.15, max_len=96,
                               docs=stdlib_docstrings(1500, workers=1))
    return out


@pytest.fixture(scope="module")
def reward_run(prefs, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("rl_rm") / "rm"
    done = cli("rm", str(EXAMPLES / "tiny_rm.yaml"), "--run-dir", str(run), f"data.path={prefs}", *MODEL,
               "train.steps=2", "train.warmup_steps=0", "train.micro_batch_size=2", "train.global_batch_size=4",
               "train.eval_interval=0", "checkpoint.interval=2", "logging.progress=off", "logging.tensorboard=false")
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


@pytest.fixture(scope="module")
def grpo_run(prefs, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("rl_grpo") / "grpo"
    done = cli("grpo", str(EXAMPLES / "tiny_grpo.yaml"), "--run-dir", str(run), f"data.path={prefs}", *COMMON,
               "reward.kind=rule", "train.steps=2", "checkpoint.interval=2")
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_grpo_with_the_rule_reward_logs_every_iteration(grpo_run) -> None:
    run = grpo_run
    rows = metrics(run)
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        missing = [k for k in METRICS if k not in row]
        assert not missing, missing
        assert 0 < row["response_length"] <= 12 and 0 <= row["eos_fraction"] <= 1
        assert 0 < row["generate_fraction"] < 1
    assert rows[1]["kl"] == pytest.approx(0.0, abs=1e-4)  # the actor starts as its reference
    assert (run / "checkpoints" / "step_2" / "COMMITTED.json").is_file()


def _ppo(run: Path, prefs: Path, reward_run: Path, *extra: str, nproc: int) -> list[str]:
    return [sys.executable, "-m", "triarch.cli", "ppo", str(EXAMPLES / "tiny_ppo.yaml"), "--run-dir", str(run),
            "--nproc", str(nproc), f"data.path={prefs}", f"reward.model={reward_run}", *COMMON,
            "rl.rollout.prompts=8", "train.steps=4", "checkpoint.interval=1", "rl.kl_target=0.05", *extra]


def test_ppo_killed_mid_iteration_resumes_on_another_layout_to_the_same_trajectory(prefs, reward_run,
                                                                                     tmp_path) -> None:
    whole = tmp_path / "whole"
    done = subprocess.run(_ppo(whole, prefs, reward_run, nproc=1), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    broken = tmp_path / "broken"
    proc = subprocess.Popen(_ppo(broken, prefs, reward_run, "parallel.tp=2", nproc=2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (broken / "checkpoints" / "step_2" / "COMMITTED.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                            text=True).stdout.split()]
    os.kill(ranks[-1], signal.SIGKILL)  # rank 1, during iteration 3
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    done = subprocess.run(_ppo(broken, prefs, reward_run, nproc=1), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr + done.stdout

    ours, theirs = metrics(broken), metrics(whole)
    for step in (3, 4):
        for key in ("reward_mean", "kl", "kl_coef", "loss", "value_loss", "response_length", "clip_fraction"):
            assert ours[step][key] == pytest.approx(theirs[step][key], rel=1e-4, abs=1e-5), (step, key)
    for prefix in ("model.", "critic.model."):  # the actor's and the critic's weights
        a = read_full_tensors(whole / "checkpoints" / "step_4", prefix)
        b = read_full_tensors(broken / "checkpoints" / "step_4", prefix)
        assert set(a) == set(b) and (prefix == "model." or "score.weight" in a)
        for name in a:
            assert (a[name] - b[name]).abs().max().item() <= 1e-5, (prefix, name)


def _one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_rl_input_is_one_line_and_exit_2(prefs, reward_run, grpo_run, tmp_path) -> None:
    base = ["ppo", str(EXAMPLES / "tiny_ppo.yaml"), "--run-dir", str(tmp_path / "bad"), f"data.path={prefs}",
            *COMMON]
    _one_line_error(cli(*base, f"reward.model={reward_run}", "model.seq_len=24"), "prompts of up to",
                    "model.seq_len")
    _one_line_error(cli(*base, "reward.model=null"), "reward.model")
    _one_line_error(cli(*base, f"reward.model={tmp_path / 'nothing'}"), f"reward.model {tmp_path / 'nothing'}: ")
    _one_line_error(cli(*base, f"reward.model={grpo_run}"), "not a reward model")  # a language model
    hf = tmp_path / "rm_hf"  # the reward model with another tokenizer beside it
    done = cli("ckpt", "export", str(reward_run), "--hf", str(hf), "--pad-id", "1", "--dtype", "fp32")
    assert done.returncode == 0, done.stderr[-3000:]
    tokenizer = json.loads((hf / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [*tokenizer.get("added_tokens", []),
                                 {"id": 2047, "content": "<other>", "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True}]
    (hf / "tokenizer.json").write_text(json.dumps(tokenizer))
    _one_line_error(cli(*base, f"reward.model=hf:{hf}"), "another tokenizer")
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_a_stop_signal_saves_after_the_iteration_and_the_run_resumes(prefs, tmp_path) -> None:
    run = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "triarch.cli", "grpo", str(EXAMPLES / "tiny_grpo.yaml"), "--run-dir", str(run),
           "--nproc", "2", f"data.path={prefs}", *COMMON, "reward.kind=rule", "checkpoint.interval=0"]
    proc = subprocess.Popen([*cmd, "train.steps=1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").is_file() and metrics(run)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)  # what SLURM's USR2 becomes under triarch submit: a stop request
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == STOPPED and "Traceback" not in err, err[-3000:]
    step = max(metrics(run))
    assert (run / "checkpoints" / f"step_{step}" / "COMMITTED.json").is_file()
    done = subprocess.run([*cmd, f"train.steps={step + 1}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "resumed from" in done.stderr, done.stderr[-3000:]
    assert max(metrics(run)) == step + 1


def test_train_with_objective_rloo_runs_leave_one_out(prefs, tmp_path) -> None:
    run = tmp_path / "rloo"
    done = cli("train", str(EXAMPLES / "tiny_grpo.yaml"), "objective.kind=rloo", "--run-dir", str(run),
               f"data.path={prefs}", *COMMON, "reward.kind=rule", "train.steps=1", "checkpoint.interval=0",
               "rl.rollout.samples=2", "rl.rollout.prompts=4")
    assert done.returncode == 0, done.stderr[-3000:]
    row = metrics(run)[1]
    assert row["clip_fraction"] >= 0 and 0 < row["response_length"] <= 12
    refused = cli("train", str(EXAMPLES / "tiny_grpo.yaml"), "objective.kind=rloo", "--run-dir", str(tmp_path / "one"),
                  f"data.path={prefs}", *COMMON, "reward.kind=rule", "rl.rollout.samples=1")
    _one_line_error(refused, "rl.rollout.samples must be >= 2")
