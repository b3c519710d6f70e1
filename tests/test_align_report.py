"""`triarch align-report` on tiny runs made here (a two-step DPO run: two language models; a one-step reward
model): the report's tables, figures and files, the judge column equal to judge() on the written completions,
the KL to the base of the base (and of its own weights loaded again) exactly 0, and bad input one line, exit 2."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from triarch.data_pipeline.prepare.pydocs import stdlib_docstrings
from triarch.data_pipeline.prepare.synthetic_preferences import make_synthetic_preferences
from triarch.rlhf.judge import judge

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COMMON = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
          "model.seq_len=128", "model.max_seq_len=256", "train.warmup_steps=0", "train.micro_batch_size=2",
          "train.global_batch_size=4", "train.eval_interval=0", "logging.progress=off", "logging.tensorboard=false",
          "fault.hang_timeout_s=0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("align_report")
    prefs = root / "prefs"
    make_synthetic_preferences(prefs, seed=0, pairs=120, eval_fraction=0.15, max_len=96,
                               docs=stdlib_docstrings(1500, workers=1))
    lm, rm = root / "lm", root / "rm"
    cli = [sys.executable, "-m", "triarch.cli"]
    jobs = [subprocess.Popen([*cli, "dpo", str(EXAMPLES / "tiny_dpo.yaml"), "--run-dir", str(lm), f"data.path={prefs}",
                              *COMMON, "objective.reference=online", "train.lr=1e-3", "train.steps=2",
                              "checkpoint.interval=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            subprocess.Popen([*cli, "rm", str(EXAMPLES / "tiny_rm.yaml"), "--run-dir", str(rm), f"data.path={prefs}",
                              *COMMON, "train.steps=1", "checkpoint.interval=1"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-3000:]
    rl = root / "rl"  # an RL run's metrics only, for the curves
    rl.mkdir()
    (rl / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward_mean": 1.0 + 0.1 * s, "reward_std": 0.5, "kl": 0.05 * s,
                    "response_length": 20 - s, "loss": 0.1}) + "\n" for s in range(1, 6)))
    return {"prefs": prefs, "lm": lm, "rm": rm, "rl": rl, "root": root}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_report_tables_figures_and_scores(runs, run_cli) -> None:
    out = runs["root"] / "report"
    base = runs["lm"] / "checkpoints" / "step_1"
    code, err = run_cli("align-report", "--base", base, "--model", f"dpo={runs['lm']}", "--model", f"same={base}",
                        "--reward", runs["rm"], "--data", runs["prefs"], "--prompts", "6", "--max-new-tokens", "8",
                        "--temperature", "0", "--temperature", "1", "--examples", "2",
                        "--rl-metrics", f"rl={runs['rl']}", "--out", out)
    assert code == 0, err
    report = (out / "report.md").read_text()
    for row in ("| base | dpo |", "| dpo | dpo |", "| same | dpo |"):
        assert report.count(row) == 2, row  # one table per decoding
    assert "## Greedy\n" in report and "## Sampled (temperature 1)\n" in report
    for name in ("rm_scores_greedy.png", "rm_scores_t1.png", "rl_curves.png"):
        assert f"]({name})" in report
        width, height = _png_size(out / name)
        assert width > 100 and height > 100

    records = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 3 * 6  # decodings x models x prompts
    summary = json.loads((out / "summary.json").read_text())
    for slug in ("greedy", "t1"):
        rows = {m["name"]: m for m in summary["decodings"][slug]["models"]}
        for name, row in rows.items():
            mine = [r for r in records if r["decoding"] == slug and r["model"] == name]
            for r in mine:  # the judge column is judge() of the written prompt and completion
                assert r["judge"] == judge(r["prompt"], r["completion"])
                assert r["tokens"] == len(r["completion_ids"]) and r["words"] == len(r["completion"].split())
            assert row["judge"] == pytest.approx(sum(r["judge"] for r in mine) / len(mine), abs=1e-12)
            assert f"| {name} | dpo | {row['judge']:.3f} |" in report
        base_rows = [r for r in records if r["decoding"] == slug and r["model"] == "base"]
        same_rows = [r for r in records if r["decoding"] == slug and r["model"] == "same"]
        assert all(r["kl"] == 0.0 for r in base_rows)  # the base against itself
        assert [r["completion_ids"] for r in same_rows] == [r["completion_ids"] for r in base_rows]
        for a, b in zip(same_rows, base_rows):  # its weights loaded again into another engine
            assert a["kl"] == pytest.approx(0.0, abs=1e-9) and a["rm"] == pytest.approx(b["rm"], abs=1e-9)
        assert rows["base"]["kl"] == 0.0
    assert summary["rl_runs"]["rl"]["iterations"] == 5


def _one_line(result: tuple[int, str], *needles: str) -> None:
    code, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_input_is_one_line_and_exit_2(runs, run_cli, tmp_path) -> None:
    good = {"--base": runs["lm"], "--reward": runs["rm"], "--data": runs["prefs"], "--out": tmp_path / "out"}

    def call(*extra, **changes):
        flags = {**good, **changes}
        args = [x for k, v in flags.items() for x in (k, v)]
        return run_cli("align-report", *args, *extra)

    _one_line(call("--model", f"x={tmp_path / 'missing'}"), "--model x=", "does not exist")
    _one_line(call("--model", f"x={runs['lm']}", **{"--base": tmp_path / "nothing"}), "--base", "does not exist")
    _one_line(call("--model", f"rm={runs['rm']}"), "--model rm=", "reward model")
    _one_line(call("--model", f"x={runs['lm']}", **{"--reward": runs["lm"]}), "--reward", "not a reward model")
    _one_line(call("--model", f"x={runs['lm']}", "--split", "nosuch"), "nosuch")
    _one_line(call("--model", str(runs["lm"])), "NAME=PATH")
    _one_line(call("--model", f"base={runs['lm']}"), "base")
    _one_line(call("--model", f"x={runs['lm']}", "--rl-metrics", f"r={tmp_path}"), "metrics.jsonl")
    _one_line(call("--model", f"x={runs['lm']}", "--max-new-tokens", "4000"), "max_seq_len")
    _one_line(call(), "--model")  # required
    assert not (tmp_path / "out").exists()
