"""Process faults and misuse of `triarch train`, injected for real: signals, a killed launcher, refused
resumes, changed batch sizes and schedules, unusable run directories and config files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from triarch.config import load_config
from triarch.data_pipeline import prepare_pydocs
from triarch.engine.lr_schedule import lr_factor

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
         "model.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4", "train.warmup_steps=1",
         "train.eval_interval=0", "logging.log_interval=1", "logging.progress=off", "logging.tensorboard=false"]
STOPPED = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_pydocs(tmp_path_factory.mktemp("data") / "pydocs", 2048, max_documents=600)


def command(run_dir: Path, data: Path, *overrides: str, nproc: int = 1) -> list[str]:
    return [sys.executable, "-m", "triarch.cli", "train", str(EXAMPLES / "tiny.yaml"), "--nproc", str(nproc),
            "--run-dir", str(run_dir), f"data.path={data}", *SMALL, *overrides]


def train(run_dir: Path, data: Path, *overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, data, *overrides, nproc=nproc), capture_output=True, text=True,
                          timeout=600)


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def start(run_dir: Path, data: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    """A long run in its own session (so a signal to its process group is like Ctrl-C in a terminal)."""
    return subprocess.Popen(command(run_dir, data, "train.steps=100000", *overrides, nproc=nproc),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout_s} s")


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*/COMMITTED.json"))


# ------------------------------------------------------------------------------------------------
# signals


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
@pytest.mark.parametrize("how", ["ctrl_c_to_group", "term_to_launcher", "hup_to_launcher"])
def test_signal_stops_every_rank_at_one_step_saves_and_resumes(how: str, data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start(run, data)
    wait_for_step(run, 3, proc)
    if how == "ctrl_c_to_group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM if how == "term_to_launcher" else signal.SIGHUP)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == STOPPED, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.splitlines() if ln.startswith("stopped at step")]
    assert len(lines) == 1 and "run the same command to resume" in lines[0], err[-3000:]
    step = int(lines[0].split()[3])
    assert committed_steps(run) == [step]
    sent = {"ctrl_c_to_group": "SIGINT", "term_to_launcher": "SIGTERM", "hup_to_launcher": "SIGHUP"}[how]
    assert f"{sent}: asking every rank to stop after the same step and save" in err, err[-3000:]
    if how != "ctrl_c_to_group":
        return  # resuming after a stop is the same for every signal: checked once
    resumed = train(run, data, f"train.steps={step + 2}", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{step}'}" in resumed.stderr
    assert sorted(metrics(run))[-1] == step + 2


@pytest.mark.timeout(300)
def test_ctrl_c_on_one_rank_in_process(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start(run, data, nproc=1)
    wait_for_step(run, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == STOPPED and "Traceback" not in err, err[-3000:]
    assert len(committed_steps(run)) == 1


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_second_ctrl_c_exits_at_once(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start(run, data, "checkpoint.interval=1000")
    wait_for_step(run, 2, proc)
    ranks = children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    started = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 10
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err
    time.sleep(1)
    assert not any(alive(r) for r in ranks)


# ------------------------------------------------------------------------------------------------
# a killed launcher


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_ranks_die_with_a_killed_launcher_and_hold_the_lock_meanwhile(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start(run, data)
    wait_for_step(run, 2, proc)
    ranks = children(proc.pid)
    assert len(ranks) == 2
    lock = str((run / ".triarch.lock").resolve())
    for rank in ranks:  # every rank holds the launcher's lock (the same open file: the same flock)
        fds = [os.readlink(f) for f in Path(f"/proc/{rank}/fd").iterdir() if f.is_symlink()]
        assert lock in fds
    busy = train(run, data, "train.steps=5", nproc=2)
    assert busy.returncode == 2 and busy.stderr.strip().startswith("error: run directory") and "in use" in busy.stderr
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    deadline = time.monotonic() + 5
    while any(alive(r) for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(r) for r in ranks), "ranks outlived their launcher"
    again = train(run, data, "train.steps=3", nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# resume with another config


@pytest.mark.timeout(400)
def test_refused_resume_keeps_the_run_config_and_records_the_attempt(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = train(run, data, "train.steps=2", "checkpoint.interval=2")
    assert first.returncode == 0, first.stderr[-3000:]
    before = (run / "config.yaml").read_text()
    refused = train(run, data, "train.steps=4", "checkpoint.interval=2", "model.dim=128")
    assert refused.returncode != 0
    assert (run / "config.yaml").read_text() == before
    attempts = sorted((run / "attempts").glob("*.yaml"))
    assert [a.name for a in attempts] == ["0001.yaml", "0002.yaml"]
    assert yaml.safe_load(attempts[1].read_text())["model"]["dim"] == 128


@pytest.mark.timeout(400)
def test_resume_with_a_larger_batch_and_a_longer_schedule(data: Path, tmp_path: Path) -> None:
    """A run extended on resume with another global batch size and more steps: the data position counts the
    sequences consumed with each batch size (none skipped or repeated), and the learning rate from the
    resumed step on is the new config's schedule at that step (never the old schedule's)."""
    common = ["train.warmup_steps=2", "train.lr=1e-3"]
    run = tmp_path / "run"
    assert train(run, data, "train.steps=4", "checkpoint.interval=4", *common).returncode == 0
    longer = train(run, data, "train.steps=8", "checkpoint.interval=2", "train.global_batch_size=16", *common)
    assert longer.returncode == 0, longer.stderr[-3000:]
    import torch

    state = torch.load(run / "checkpoints" / "step_8" / "trainer_state.pt", weights_only=True)
    consumed = 4 * 8 + 4 * 16  # not 8 x 16
    assert state["data"]["consumed_sequences"] == consumed
    logged = metrics(run)
    assert logged[8]["consumed_tokens"] == consumed * 32
    cfg = load_config(EXAMPLES / "tiny.yaml", [*SMALL, "train.steps=8", "train.global_batch_size=16", *common]).train
    for step in range(5, 9):  # the LR of step s is lr x factor(s - 1) of the new config
        assert logged[step]["lr"] == pytest.approx(cfg.lr * lr_factor(step - 1, cfg), rel=1e-12), step


# ------------------------------------------------------------------------------------------------
# unusable run directories and config files


def _one_error(run_cli, *args: str, needles: tuple[str, ...]) -> None:
    """The CLI ends with exactly one ``error:`` line holding every needle, and exit code 2 (these errors come
    before any rank starts, so the CLI's entry point runs in this process)."""
    code, stderr = run_cli(*args)
    lines = stderr.strip().splitlines()
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


def _train_args(run_dir: Path, data: Path) -> list[str]:
    return command(run_dir, data, "train.steps=3")[3:]  # without "python -m triarch.cli"


def test_deepspeed_keys_on_another_engine_are_named_in_a_warning(data: Path, tmp_path: Path, run_cli) -> None:
    """A config moved off engine deepspeed keeps its section (it may resume elsewhere): a warning names what is
    ignored; the run is not refused for it (here it stops at the run directory, a file)."""
    blocker = tmp_path / "run"
    blocker.write_text("")
    code, stderr = run_cli(*_train_args(blocker, data), "deepspeed.zero_stage=3", "deepspeed.overlap_comm=true")
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 2, stderr
    assert lines[0] == ("warning: deepspeed.zero_stage=3, deepspeed.overlap_comm=True applies to engine: deepspeed "
                        "and is ignored on engine native")
    assert lines[1].startswith(f"error: run directory {blocker} is a file")
    _one_error(run_cli, *_train_args(blocker, data), needles=("is a file",))


def test_a_model_too_large_for_memory_is_one_line(data: Path, tmp_path: Path) -> None:
    """An allocation that cannot succeed (a rotary table for 1e13 positions) is the allocator's size in one line,
    exit 2, not a traceback."""
    result = train(tmp_path / "run", data, "model.max_seq_len=10000000000000")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: rank 0 ran out of memory (tried to allocate ") and "bytes)" in lines[0]


def test_a_folder_that_is_not_a_run_is_refused_as_run_directory(data: Path, tmp_path: Path, run_cli) -> None:
    """``--run-dir`` pointing at a data folder or any folder with other content writes nothing into it."""
    before = sorted(p.name for p in data.iterdir())
    _one_error(run_cli, *_train_args(data, data), needles=(str(data), "manifest.json", "new or empty --run-dir"))
    assert sorted(p.name for p in data.iterdir()) == before
    home = tmp_path / "home"
    home.mkdir()
    for n in range(5):
        (home / f"notes{n}.txt").write_text("mine")
    _one_error(run_cli, *_train_args(home, data), needles=("notes0.txt, notes1.txt, notes2.txt, ...",))
    assert len(list(home.iterdir())) == 5


def test_run_directory_may_hold_job_logs_or_a_run(tmp_path: Path) -> None:
    """Job logs a user's sbatch script wrote there, or anything beside a run's own entries, are accepted."""
    from triarch.launcher import rank_main, watchdog
    from triarch.launcher.run_dir import OTHER_RUN_ENTRIES, usable_run_dir
    from triarch.profiling.session import PROFILE_DIR
    from triarch.rlhf.reference import REFERENCE_DIR
    from triarch.slurm.submit import LOG_DIR

    assert {LOG_DIR, PROFILE_DIR, REFERENCE_DIR, rank_main.FLIGHT_RECORDER_DIR, watchdog.REPORT_NAME} \
        == OTHER_RUN_ENTRIES
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    (logs / "slurm-42.out").write_text("")
    (logs / ".hidden").write_text("")
    assert usable_run_dir(logs) == logs
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True, mode=0o700)
    run.chmod(0o700)
    (run / "my-notes.txt").write_text("")
    assert usable_run_dir(run) == run


@pytest.fixture()
def read_only_dir(tmp_path: Path):
    """A real read-only file system (root ignores permission bits, not a read-only mount)."""
    target = tmp_path / "ro"
    target.mkdir()
    (target / "existing").mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    (target / "existing").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
    yield target
    subprocess.run(["umount", str(target)], check=False)


def test_run_directory_that_is_a_file(data: Path, tmp_path: Path, run_cli) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    _one_error(run_cli, *_train_args(blocker, data), needles=(str(blocker), "is a file"))
    _one_error(run_cli, *_train_args(blocker / "inner", data), needles=("cannot create run directory",))


def test_run_directory_on_a_read_only_file_system(data: Path, read_only_dir: Path, run_cli) -> None:
    _one_error(run_cli, *_train_args(read_only_dir / "new", data), needles=("Read-only file system",))
    _one_error(run_cli, *_train_args(read_only_dir / "existing", data), needles=("not writable",))


@pytest.mark.parametrize("content, needle", [
    (b"\x00\x01\x02binary\xff", "is binary"),
    ("model:\n  dim: 64 # caf\u00e9\n".encode("latin-1"), "not UTF-8"),
    (b"", "is empty"),
    (b"{}\n", "is empty"),
    (b"- a\n- b\n", "mapping"),
])
def test_bad_config_files(content: bytes, needle: str, tmp_path: Path, run_cli) -> None:
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    _one_error(run_cli, "train", str(config), "--run-dir", str(tmp_path / "run"), needles=(str(config), needle))
    assert not (tmp_path / "run").exists()


def test_config_that_is_a_folder(tmp_path: Path, run_cli) -> None:
    _one_error(run_cli, "train", str(tmp_path), "--run-dir", str(tmp_path / "run"), needles=("is a folder",))
