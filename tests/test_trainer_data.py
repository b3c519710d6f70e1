"""The trainer's data path: DALI stage gives the default path's losses; blends and s3 paths train."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from triarch.data_pipeline import prepare_pydocs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
         "model.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4", "train.steps=4",
         "train.warmup_steps=1", "train.eval_interval=0", "logging.log_interval=1", "logging.progress=off",
         "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_pydocs(tmp_path_factory.mktemp("data") / "pydocs", 2048, max_documents=600)


def train(run_dir: Path, *overrides: str, nproc: int = 1) -> dict[int, float]:
    cmd = [sys.executable, "-m", "triarch.cli", "train", str(EXAMPLES / "tiny.yaml"), "--nproc", str(nproc),
           "--run-dir", str(run_dir), *SMALL, *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.timeout(600)
def test_dali_loader_matches_default(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    default = train(tmp_path / "default", f"data.path={data}")
    dali = train(tmp_path / "dali", f"data.path={data}", "data.loader=dali")
    assert len(default) == 4 and dali == default


@pytest.mark.timeout(600)
def test_blend_of_two_datasets_trains(data: Path, tmp_path: Path) -> None:
    blend = json.dumps([{"path": str(data), "weight": 3.0}, {"path": str(data), "weight": 1.0}])
    losses = train(tmp_path / "blend", f"data.path={data}", f"data.blend={blend}", "data.num_workers=1", nproc=2)
    assert sorted(losses) == [1, 2, 3, 4]
