"""Alignment stages end to end through the CLI on the embedded synthetic preference set (small model, CPU):
the reward model and DPO learn the held-out preferences, a DPO run stopped and resumed equals the
uninterrupted one bit for bit (online and precomputed reference), and bad input is one line + exit 2 with
nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from triarch.config import dump_config, load_config
from triarch.data_pipeline.prepare.synthetic_preferences import make_synthetic_preferences

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
         "logging.progress=off", "logging.tensorboard=false", "logging.log_interval=1"]


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "preferences"
    make_synthetic_preferences(out, seed=0, pairs=400, eval_fraction=0.12, max_len=128)
    return out


def stage(kind: str, run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "triarch.cli", kind, str(EXAMPLES / f"tiny_{kind}.yaml"), "--run-dir", str(run_dir),
           *SMALL, *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last_eval(run_dir: Path) -> dict:
    return [m for m in metrics(run_dir) if "eval_loss" in m][-1]


@pytest.mark.timeout(300)
def test_reward_model_learns_the_held_out_preferences(prefs: Path, tmp_path: Path) -> None:
    run = tmp_path / "rm"
    # from random weights; the too-short rejected answers make length alone no guide (30 steps at the example's
    # lr 5e-4 reached 0.875, 60 steps at 2e-3 0.938)
    stage("rm", run, f"data.path={prefs}", "train.steps=60", "train.lr=2e-3", "train.eval_interval=60",
          "checkpoint.interval=0")
    first = [m for m in metrics(run) if "eval_loss" in m][0]
    final = last_eval(run)
    assert final["eval_accuracy"] >= 0.9 > first["eval_accuracy"], (first, final)
    train_rows = [m for m in metrics(run) if "accuracy" in m]
    assert {"loss", "accuracy", "margin"} <= train_rows[-1].keys()


@pytest.mark.timeout(300)
def test_dpo_learns_the_held_out_preferences(prefs: Path, tmp_path: Path) -> None:
    run = tmp_path / "dpo"
    stage("dpo", run, f"data.path={prefs}", "train.steps=30", "train.eval_interval=30", "checkpoint.interval=0")
    first = [m for m in metrics(run) if "eval_loss" in m][0]
    assert first["eval_loss"] == pytest.approx(0.6931472, abs=1e-6) and first["eval_rewards/margins"] == 0.0
    final = last_eval(run)
    assert final["eval_rewards/accuracies"] >= 0.8, final
    names = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"}
    assert names <= [m for m in metrics(run) if "loss" in m][0].keys()


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("reference", ["online", "precompute"])
def test_dpo_stopped_and_resumed_equals_the_uninterrupted_run(reference: str, prefs: Path, tmp_path: Path) -> None:
    common = [f"data.path={prefs}", "train.steps=6", "train.global_batch_size=8", "train.micro_batch_size=2",
              "train.eval_interval=3", "train.eval_batches=1", f"objective.reference={reference}",
              "checkpoint.interval=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    stage("dpo", straight, *common, "--nproc", "2", "parallel.pp=2")
    stage("dpo", resumed, *common, "--nproc", "2", "parallel.pp=2", "train.exit_at_step=3")
    second = stage("dpo", resumed, *common, "--nproc", "2", "parallel.pp=2")
    assert "resumed from" in second.stderr + second.stdout

    def key(rows: list[dict]) -> dict:
        return {(m["step"], k): v for m in rows for k, v in m.items()
                if k in ("loss", "grad_norm", "eval_loss", "rewards/chosen", "rewards/margins", "eval_rewards/accuracies")}
    assert key(metrics(resumed)) == key(metrics(straight))  # every value bit for bit, steps 1-6 and the evals
    if reference == "precompute":
        assert sorted(p.name for p in (resumed / "reference").iterdir()) == ["train.pt", "validation.pt"]


def test_bad_input_is_one_line_and_writes_nothing(prefs: Path, tmp_path: Path, run_cli) -> None:
    config = str(EXAMPLES / "tiny_dpo.yaml")
    token_folder = tmp_path / "tokens"
    token_folder.mkdir()
    (token_folder / "manifest.json").write_text(json.dumps({"format": "triarch.shards"}))
    cases = {
        "missing": ([f"data.path={tmp_path / 'nowhere'}"], "nowhere"),
        "not_pairs": ([f"data.path={token_folder}"], "manifest"),
        "longer_than_seq": ([f"data.path={prefs}", "model.seq_len=64"], "max_len 128, more than model.seq_len (64)"),
        "margin_without_column": ([f"data.path={prefs}", "objective.margin=true"], "objective.margin"),
        "bad_loss_type": ([f"data.path={prefs}", "objective.loss_type=kto"], "objective.loss_type"),
        "smoothing_range": ([f"data.path={prefs}", "objective.label_smoothing=0.7"], "objective.label_smoothing"),
        "smoothing_not_sigmoid": ([f"data.path={prefs}", "objective.loss_type=ipo", "objective.label_smoothing=0.1"],
                                  "applies to loss_type sigmoid only"),
    }
    for name, (overrides, needle) in cases.items():
        run = tmp_path / f"run_{name}"
        code, err = run_cli("dpo", config, "--run-dir", str(run), *overrides)
        assert code == 2 and err.strip().count("\n") == 0 and needle in err, (name, err)
        assert not (run / "checkpoints").exists(), name
    code, err = run_cli("rm", str(EXAMPLES / "tiny_dpo.yaml"), f"data.path={prefs}")
    assert code == 2 and "sets objective.kind=dpo, but this is 'triarch rm'" in err
    pretrained = tmp_path / "pretrained_run"  # a directory that holds a pretraining run is not resumed as DPO
    pretrained.mkdir()
    dump_config(load_config(EXAMPLES / "tiny.yaml"), pretrained / "config.yaml")
    code, err = run_cli("dpo", config, "--run-dir", str(pretrained), f"data.path={prefs}")
    assert code == 2 and err.strip().count("\n") == 0 and "holds a pretrain run" in err, err
    assert sorted(p.name for p in pretrained.iterdir()) == ["config.yaml"]


def test_a_damaged_reference_table_is_computed_again(prefs: Path, tmp_path: Path) -> None:
    from triarch.data_pipeline.stream.preferences import PreferenceStream
    from triarch.rlhf.reference import REFERENCE_DIR, stored_tables

    cfg = load_config(EXAMPLES / "tiny_dpo.yaml", [f"data.path={prefs}"])
    stream = PreferenceStream(prefs, "validation", 128, global_batch_size=8, seed=cfg.train.seed, dp_rank=0, dp_size=1)
    (tmp_path / REFERENCE_DIR).mkdir()
    (tmp_path / REFERENCE_DIR / "validation.pt").write_bytes(b"not a table")
    assert stored_tables({"validation": stream}, cfg, tmp_path, None) == {}
