"""The demo path end to end through the CLI: prepare the stdlib corpus, train on 2 ranks, loss falls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
REQUIRED = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "hfu", "mfu_source", "step_time_s",
            "peak_mem_bytes"}


def triarch(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "triarch.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "pydocs"
    result = triarch("prepare", "--out", str(out), "--vocab-size", "2048", cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_demo_trains_and_loss_falls(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = triarch("train", str(EXAMPLES / "tiny.yaml"), "--nproc", "2", "--run-dir", str(run_dir),
                     f"data.path={data_dir}", "train.steps=60", "train.warmup_steps=10", "train.eval_interval=60",
                     "logging.log_interval=5", "logging.progress=off", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run directory: {run_dir}" in result.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(5, 61, 5))
    for r in train:
        assert REQUIRED <= set(r), set(r)
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mem_bytes"] > 0
        assert r["hfu"] == r["mfu"]  # no activation checkpointing: nothing recomputed
    assert [r["step"] for r in evals] == [0, 60]
    assert evals[1]["eval_loss"] < 0.85 * evals[0]["eval_loss"]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["parallel"]["dp_shard"] == 2 and resolved["train"]["steps"] == 60
    assert any((run_dir / "tensorboard").iterdir())


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_tensor_parallel_demo_matches_data_parallel_loss(data_dir: Path, tmp_path: Path) -> None:
    """Layouts compared from the command line: tp2 and dp2 give the same losses on real data."""
    losses = {}
    for name, layout in {"dp": "parallel.dp_shard=2", "tp": "parallel.tp=2"}.items():
        run_dir = tmp_path / name
        result = triarch("train", str(EXAMPLES / "tiny.yaml"), "--nproc", "2", "--run-dir", str(run_dir), layout,
                         f"data.path={data_dir}", "train.steps=4", "train.warmup_steps=1", "train.eval_interval=0", "logging.log_interval=1",
                         "logging.progress=off", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["dp"]) == 4
    assert losses["tp"] == pytest.approx(losses["dp"], rel=1e-5)
