"""Checkpoint + resume through the CLI: bit-exact continuation, reshard on load, commit protocol."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from triarch.checkpointing.manager import list_steps
from triarch.data_pipeline import prepare_pydocs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
         "model.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=6",
         "train.warmup_steps=2", "train.eval_interval=0", "logging.log_interval=1", "logging.progress=off",
         "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_pydocs(tmp_path_factory.mktemp("data") / "pydocs", 2048, max_documents=800)


def train(run_dir: Path, data: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "triarch.cli", "train", str(EXAMPLES / "tiny.yaml"), "--nproc", str(nproc),
           "--run-dir", str(run_dir), f"data.path={data}", *SMALL, *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("nproc", "layout"), [(1, []), (4, ["parallel.tp=2", "parallel.pp=2"])], ids=["single", "tp2xpp2"])
def test_bit_exact_resume(nproc: int, layout: list[str], data: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(straight, data, nproc, *layout)
    resumed = tmp_path / "resumed"
    # a save every step: async saves reuse their staging buffers, so step 3's must hold step 3's values
    train(resumed, data, nproc, *layout, "checkpoint.interval=1", "train.exit_at_step=3")
    assert sorted(losses(resumed)) == [1, 2, 3]
    second = train(resumed, data, nproc, *layout, "checkpoint.interval=1")
    assert "resumed from" in second.stderr + second.stdout and "step 3," in second.stderr + second.stdout
    assert losses(resumed) == losses(straight)  # every logged loss identical, bit for bit
    assert [s.step for s in list_steps(resumed / "checkpoints") if s.committed] == [5, 6]  # keep = 2


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_reshard_on_load_and_fallback(data: Path, tmp_path: Path) -> None:
    """Saved at tp2 x dp2, loaded at pp2 x dp2 and at one rank: the next loss equals the saving layout's."""
    source = tmp_path / "source"
    train(source, data, 4, "parallel.tp=2", "parallel.dp_shard=2", "checkpoint.interval=3")
    reference = losses(source)
    for name, nproc, layout in [("pp2dp2", 4, ["parallel.pp=2", "parallel.dp_shard=2"]), ("one", 1, [])]:
        target = tmp_path / name
        shutil.copytree(source / "checkpoints", target / "checkpoints")
        shutil.rmtree(target / "checkpoints" / "step_6")
        train(target, data, nproc, *layout, "checkpoint.interval=3")
        got = losses(target)
        assert sorted(got) == [4, 5, 6]
        for step in (4, 5, 6):
            assert got[step] == pytest.approx(reference[step], rel=1e-5), (name, step)
    # an uncommitted newest step is ignored: resume falls back to step 3
    broken = tmp_path / "broken"
    shutil.copytree(source / "checkpoints", broken / "checkpoints")
    (broken / "checkpoints" / "step_6" / "COMMITTED.json").unlink()
    result = train(broken, data, 1, "checkpoint.interval=3")
    assert "is not committed" in result.stderr and sorted(losses(broken)) == [4, 5, 6]
    # a flipped byte in a shard fails verification: resume falls back to step 3
    corrupt = tmp_path / "corrupt"
    shutil.copytree(source / "checkpoints", corrupt / "checkpoints")
    shard = next((corrupt / "checkpoints" / "step_6").glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    result = train(corrupt, data, 1, "checkpoint.interval=3")
    assert "does not match its sha256" in result.stderr and sorted(losses(corrupt)) == [4, 5, 6]


def test_second_run_on_same_directory_is_refused(data: Path, tmp_path: Path) -> None:
    from triarch.launcher.run_lock import run_dir_lock

    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    with run_dir_lock(run_dir):  # as a live run would hold it
        cmd = [sys.executable, "-m", "triarch.cli", "train", str(EXAMPLES / "tiny.yaml"), "--run-dir", str(run_dir),
               f"data.path={data}", *SMALL]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: run directory {run_dir} is in use by another triarch run (started by pid ")
    assert not (run_dir / "metrics.jsonl").exists()


def test_foreign_or_mismatched_checkpoints_are_one_line_errors(data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(run_dir, data, 1, "checkpoint.interval=3", "train.exit_at_step=3")
    # the same run directory with a wider model: the saved weights do not fit
    cmd = [sys.executable, "-m", "triarch.cli", "train", str(EXAMPLES / "tiny.yaml"), "--run-dir", str(run_dir),
           f"data.path={data}", *SMALL, "model.dim=128"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 4, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "does not fit this model" in last, last
    # a folder that is not a checkpoint
    junk = tmp_path / "junk" / "checkpoints" / "step_1"
    junk.mkdir(parents=True)
    (junk / "COMMITTED.json").write_text('{"files": {}}')
    (junk / "trainer_state.pt").write_text("not a checkpoint")
    inspect = subprocess.run([sys.executable, "-m", "triarch.cli", "ckpt", "inspect", str(tmp_path / "junk")],
                             capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 2 and len(inspect.stderr.strip().splitlines()) == 1
    assert "is not a readable distributed checkpoint" in inspect.stderr
