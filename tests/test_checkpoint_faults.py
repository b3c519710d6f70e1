"""Checkpoint faults done for real: a rank killed mid-save, and a disk that fills up while saving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from processes import rank_pids
from triarch.checkpointing.commit import verify
from triarch.checkpointing.manager import list_steps
from triarch.data_pipeline import prepare_pydocs
from triarch.data_pipeline.fileio import file_sha256

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
         "model.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=2",
         "train.eval_interval=0", "logging.log_interval=1", "logging.progress=off", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_pydocs(tmp_path_factory.mktemp("data") / "pydocs", 2048, max_documents=800)


def command(run_dir: Path, data: Path, nproc: int, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "triarch.cli", "train", str(EXAMPLES / "tiny.yaml"), "--nproc", str(nproc),
            "--run-dir", str(run_dir), f"data.path={data}", *SMALL, *overrides]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_rank_killed_during_async_save(data: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    subprocess.run(command(reference, data, 2, "train.steps=8"), check=True, capture_output=True, timeout=300)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(run_dir, data, 2, "train.steps=8", "checkpoint.interval=3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    target = run_dir / "checkpoints" / "step_6"
    deadline = time.time() + 240
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    victims = rank_pids(1, proc.pid)
    assert target.exists() and victims, "the run never reached the step-6 save"
    for pid in victims:
        os.kill(pid, signal.SIGSTOP)  # freeze rank 1 inside the save, then kill it for real
    committed_before_kill = (target / "COMMITTED.json").exists()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    steps = {s.step: s for s in list_steps(run_dir / "checkpoints")}
    verify(steps[3].path)  # the previous checkpoint is intact
    if not committed_before_kill:
        assert not steps[6].committed
        listing = subprocess.run([sys.executable, "-m", "triarch.cli", "ckpt", "list", str(run_dir)],
                                 capture_output=True, text=True, timeout=60)
        assert "UNCOMMITTED" in listing.stdout
    resumed = subprocess.run(command(run_dir, data, 2, "train.steps=8", "checkpoint.interval=3"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected_from = 6 if committed_before_kill else 3
    assert f"step {expected_from}, saved with layout" in resumed.stderr + resumed.stdout
    assert losses(run_dir) == losses(reference)


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_disk_full_while_saving(data: Path, small_disk: Path, async_save: bool) -> None:
    """~5 MB per checkpoint on a 7 MB disk: step 3 commits, step 6 runs out of space."""
    run_dir = small_disk / "run"
    result = subprocess.run(command(run_dir, data, 1, "train.steps=8", "checkpoint.interval=3",
                                    f"checkpoint.async_save={str(async_save).lower()}"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 4, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: saving ") and "No space left on device" in last, last
    steps = {s.step: s for s in list_steps(run_dir / "checkpoints")}
    assert steps[3].committed and 6 not in steps  # the failed step's partial folder no longer holds the disk
    verify(steps[3].path)


@pytest.fixture()
def immutable():
    """``chattr +i`` on a folder: nothing can be created in it, even by root (real EPERM, unlike chmod)."""
    marked: list[Path] = []

    def mark(folder: Path) -> None:
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"chattr +i is not available here: {done.stderr.strip()}")
        marked.append(folder)

    yield mark
    for folder in marked:
        subprocess.run(["chattr", "-i", str(folder)], check=False)


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("nproc", [1, 2])
def test_save_without_write_permission_is_one_line_and_exit_4(nproc: int, data: Path, tmp_path: Path,
                                                              immutable) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True, mode=0o700)
    run_dir.chmod(0o700)
    immutable(run_dir / "checkpoints")
    result = subprocess.run(command(run_dir, data, nproc, "train.steps=4", "checkpoint.interval=2"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 4, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Operation not permitted" in errors[0] and "step_2" in errors[0], result.stderr[-2000:]


@pytest.mark.parametrize("target", ["trainer_state.pt", ".metadata"])
def test_pickled_code_in_a_checkpoint_is_refused(target: str, data: Path, tmp_path: Path) -> None:
    """The small pickles of a checkpoint (trainer state, RNG) are unpickled as plain data only, and DCP's
    ``.metadata`` (which DCP itself unpickles unrestricted) is checked first: a checkpoint that would run
    code on load is refused in one line, and nothing runs. Whoever crafted it rewrote the commit file too."""
    run_dir = tmp_path / "run"
    first = subprocess.run(command(run_dir, data, 1, "train.steps=2", "checkpoint.interval=2"),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    import pickle

    import torch

    marker = tmp_path / "pwned"
    victim = run_dir / "checkpoints" / "step_2" / target
    if target == "trainer_state.pt":
        state = torch.load(victim, weights_only=True)
        state["evil"] = _RunsCode(f"touch {marker}")
        torch.save(state, victim)
    else:
        victim.write_bytes(pickle.dumps(_RunsCode(f"touch {marker}")))
    commit_file = victim.parent / "COMMITTED.json"
    commit = json.loads(commit_file.read_text())
    commit["files"][target] = {"bytes": victim.stat().st_size, "sha256": file_sha256(victim)}
    commit_file.write_text(json.dumps(commit))
    resumed = subprocess.run(command(run_dir, data, 1, "train.steps=4", "checkpoint.interval=2"),
                             capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert resumed.returncode == 4, resumed.stderr[-2000:]
    errors = [ln for ln in resumed.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "refusing" in errors[0] and target in errors[0], errors
    assert "Traceback" not in resumed.stderr


@pytest.mark.parametrize("content, needle", [
    (b"garbage bytes that are no pickle", "is damaged (UnpicklingError)"),  # pickle: "could not find MARK"
    (b"\x80\x04", "is damaged (EOFError)"),
    (None, "asks to import posix.system"),
])
def test_damaged_or_crafted_dcp_metadata_is_named_as_such(content: bytes | None, needle: str,
                                                           tmp_path: Path) -> None:
    import pickle

    from triarch.checkpointing.commit import CheckpointError
    from triarch.checkpointing.safe_load import check_dcp_metadata

    (tmp_path / ".metadata").write_bytes(content if content is not None else pickle.dumps(_RunsCode("true")))
    with pytest.raises(CheckpointError) as err:
        check_dcp_metadata(tmp_path)
    assert needle in str(err.value) and len(str(err.value).splitlines()) == 1, err.value


class _RunsCode:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (self.command,))


def test_run_directory_writable_by_others_is_refused(data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "shared_run"
    run_dir.mkdir()
    run_dir.chmod(0o777)
    result = subprocess.run(command(run_dir, data, 1, "train.steps=3"), capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "can be written by other users" in lines[0] and f"chmod go-w {run_dir}" in lines[0]
    fresh = tmp_path / "fresh" / "run"
    created = subprocess.run(command(fresh, data, 1, "train.steps=3"), capture_output=True, text=True, timeout=300)
    assert created.returncode == 0, created.stderr[-2000:]
    assert fresh.stat().st_mode & 0o777 == 0o700


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_a_run_whose_every_checkpoint_is_damaged_refuses_to_start_over(data: Path, tmp_path: Path) -> None:
    """Resuming must not fall back to step 0 over committed checkpoints it cannot use: retention would delete
    them as the new run saves. Exit 4, one line, every file as it was."""
    run_dir = tmp_path / "run"
    first = subprocess.run(command(run_dir, data, 1, "train.steps=4", "checkpoint.interval=2"), capture_output=True,
                           text=True, timeout=240)
    assert first.returncode == 0, first.stderr
    steps = [s.path for s in list_steps(run_dir / "checkpoints") if s.committed]
    assert [p.name for p in steps] == ["step_2", "step_4"]
    for step_dir in steps:
        shard = next(step_dir.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:10])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "checkpoints" in p.parts}
    metrics = (run_dir / "metrics.jsonl").read_text()
    again = subprocess.run(command(run_dir, data, 1, "train.steps=6", "checkpoint.interval=2"), capture_output=True,
                           text=True, timeout=240)
    assert again.returncode == 4, again.stderr
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 committed checkpoint(s) and none is usable" in errors[0], again.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "checkpoints" in p.parts} == before
    assert (run_dir / "metrics.jsonl").read_text() == metrics


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_resuming_a_finished_run_says_there_is_nothing_to_train(data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = subprocess.run(command(run_dir, data, 1, "train.steps=3", "checkpoint.interval=3"), capture_output=True,
                           text=True, timeout=240)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(command(run_dir, data, 1, "train.steps=2", "checkpoint.interval=3"), capture_output=True,
                           text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert "nothing to train: the run is at step 3 and train.steps is 2" in again.stdout, again.stdout
    assert "trained " not in again.stdout, again.stdout
