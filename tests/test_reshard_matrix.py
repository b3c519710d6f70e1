"""Reshard matrix: a checkpoint saved at each 4-rank layout loads at one rank and at the next layout of the
cycle tp2_dp2 -> pp2_dp2 -> tp2_pp2 -> dp4_fsdp -> tp2_dp2, so every layout is both saved and loaded at a
different split of TP, PP and FSDP; the losses after the load equal those the saving layout computed for the
same steps. (The full 4 x 4 matrix passed too; the cycle keeps every layout on both sides at half the
launches. tests/test_resume.py and tests/test_megatron_engine.py reshard across other pairs.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from triarch.data_pipeline import prepare_pydocs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
         "model.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=5",
         "train.warmup_steps=2", "train.eval_interval=0", "logging.log_interval=1", "logging.progress=off",
         "logging.tensorboard=false", "checkpoint.interval=3"]
LAYOUTS = {
    "tp2_dp2": (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
    "pp2_dp2": (4, ["parallel.pp=2", "parallel.dp_shard=2"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "dp4_fsdp": (4, ["parallel.dp_shard=4"]),
    "one_rank": (1, []),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_pydocs(tmp_path_factory.mktemp("data") / "pydocs", 2048, max_documents=800)


def train(run_dir: Path, data: Path, layout: str) -> dict[int, float]:
    nproc, overrides = LAYOUTS[layout]
    cmd = [sys.executable, "-m", "triarch.cli", "train", str(EXAMPLES / "tiny.yaml"), "--nproc", str(nproc),
           "--run-dir", str(run_dir), f"data.path={data}", *SMALL, *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("source", [name for name in LAYOUTS if name != "one_rank"])
def test_saved_layout_loads_everywhere(source: str, data: Path, tmp_path: Path) -> None:
    saved = tmp_path / source
    reference = train(saved, data, source)
    assert sorted(reference) == [1, 2, 3, 4, 5]
    sources = [name for name in LAYOUTS if name != "one_rank"]
    following = sources[(sources.index(source) + 1) % len(sources)]
    for target in (following, "one_rank"):
        run_dir = tmp_path / f"to_{target}"
        shutil.copytree(saved / "checkpoints" / "step_3", run_dir / "checkpoints" / "step_3")
        got = train(run_dir, data, target)
        assert sorted(got) == [4, 5], target
        for step in (4, 5):
            assert got[step] == pytest.approx(reference[step], rel=1e-5), (source, target, step)
