"""triarch submit on a real two-node SLURM cluster on loopback (started by scripts/local_slurm.sh):
losses equal a local run, USR2 -> save -> requeue -> resume, a killed rank or node -> retry / elastic
restart on fewer nodes, a stopped rank -> hang report, status/logs/cancel, sweeps, one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from processes import parent_pid
from slurm_cluster import (
    ROOT,
    SLURM_CONF,
    job_state,
    logged_steps,
    losses,
    rank_pid,
    slurm,
    slurm_env,
    start_cluster,
    submitted_job_id,
    triarch,
    wait_for_end,
    wait_for_step,
)
from triarch.checkpointing.manager import list_steps
from triarch.data_pipeline import prepare_pydocs

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

TINY = str(ROOT / "examples" / "tiny.yaml")
SMALL = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
         "model.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=2",
         "train.eval_interval=0", "logging.log_interval=1", "logging.progress=off", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def cluster() -> None:
    start_cluster()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_pydocs(tmp_path_factory.mktemp("slurm-data") / "pydocs", 2048, max_documents=800)


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    return tmp_path / "triarch-home"


def submit(home: Path, run_dir: Path, data: Path, steps: int, *extra: str) -> str:
    result = triarch(home, "submit", TINY, *SMALL, f"data.path={data}", f"train.steps={steps}",
                     "--run-dir", str(run_dir), "--time", "10", *extra)
    return submitted_job_id(result)


def local_losses(run_dir: Path, data: Path, steps: int, nproc: int = 2, *extra: str) -> dict[int, float]:
    cmd = [sys.executable, "-m", "triarch.cli", "train", TINY, *SMALL, f"data.path={data}", f"train.steps={steps}",
           "--nproc", str(nproc), "--run-dir", str(run_dir), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(run_dir)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Callable[[int], dict[int, float]]:
    """The losses of the uninterrupted local 2-rank run of N steps (computed once per N for the module's tests)."""
    cache: dict[int, dict[int, float]] = {}

    def losses_of(steps: int) -> dict[int, float]:
        if steps not in cache:
            cache[steps] = local_losses(tmp_path_factory.mktemp(f"local-{steps}"), data, steps)
        return cache[steps]
    return losses_of


def log_text(run_dir: Path, job: str, rank: int, stream: str) -> str:
    path = run_dir / "slurm" / f"{job}_{rank}_log.{stream}"
    return path.read_text(errors="replace") if path.exists() else ""


def ledger(run_dir: Path) -> dict:
    path = run_dir / "slurm" / "requeues.json"
    return json.loads(path.read_text())["counts"] if path.exists() else {}


def test_two_node_job_matches_local_run_and_status_logs(cluster, data, home, uninterrupted, tmp_path) -> None:
    run = tmp_path / "two-node"
    job = submit(home, run, data, 6, "--nodes", "2")
    assert wait_for_end(job, 180) == "COMPLETED", log_text(run, job, 0, "err")[-3000:]
    # one rank per node: rank 1 ran on the second node of the allocation
    assert f"job {job} attempt 0, rank 1 of 2 on node 1 of 2" in log_text(run, job, 1, "out")
    reference = uninterrupted(6)
    assert sorted(losses(run)) == list(range(1, 7))
    assert losses(run) == pytest.approx(reference, rel=1e-6)
    # the script SLURM ran is the one --dry-run renders for the same options
    dry = triarch(home, "submit", TINY, *SMALL, f"data.path={data}", "train.steps=6", "--run-dir", str(run),
                  "--time", "10", "--nodes", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert (run / "slurm" / f"{job}_submission.sh").read_text().strip() == dry.stdout.strip()

    status = triarch(home, "status", job)
    assert status.returncode == 0 and "COMPLETED" in status.stdout and "step 6" in status.stdout, status
    listing = triarch(home, "status")
    assert f"job {job}" in listing.stdout
    logs = triarch(home, "logs", job, "--rank", "1")
    assert logs.returncode == 0 and "rank 1 of 2" in logs.stdout
    bad_rank = triarch(home, "logs", job, "--rank", "5")
    assert bad_rank.returncode == 2 and bad_rank.stderr.count("\n") == 1 and "--rank 5" in bad_rank.stderr


def test_usr2_saves_requeues_and_resumes_to_the_uninterrupted_losses(cluster, data, home, uninterrupted,
                                                                    tmp_path) -> None:
    run = tmp_path / "preempted"
    steps = 80
    job = submit(home, run, data, steps, "--nodes", "2")
    wait_for_step(run, 5)
    slurm("scancel", "--signal=USR2", job)
    assert wait_for_end(job, 300) == "COMPLETED", log_text(run, job, 0, "err")[-3000:]
    assert ledger(run)["preemption"] == 1
    err = log_text(run, job, 0, "err")
    assert "preemption (SIGUSR2): saved step" in err and "resumed from" in err
    # every step trained once, and each loss equals the uninterrupted run's
    assert logged_steps(run) == list(range(1, steps + 1))
    assert losses(run) == pytest.approx(uninterrupted(steps), rel=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")
def test_megatron_engine_job_survives_usr2_requeue(cluster, data, home, tmp_path) -> None:
    """engine: megatron under SLURM (two nodes, megatron's distributed optimizer): USR2 -> save -> requeue ->
    resume, with the losses of an uninterrupted local megatron run."""
    run = tmp_path / "megatron-preempted"
    steps = 20
    job = submit(home, run, data, steps, "--nodes", "2", "engine=megatron")
    wait_for_step(run, 3)
    slurm("scancel", "--signal=USR2", job)
    assert wait_for_end(job, 300) == "COMPLETED", log_text(run, job, 0, "err")[-3000:]
    assert ledger(run)["preemption"] == 1
    assert "resumed from" in log_text(run, job, 0, "err")
    assert logged_steps(run) == list(range(1, steps + 1))
    reference = local_losses(tmp_path / "local", data, steps, 2, "engine=megatron")
    assert losses(run) == pytest.approx(reference, rel=1e-6)


GRPO = str(ROOT / "examples" / "tiny_grpo.yaml")
RL_SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
            "model.seq_len=128", "model.max_seq_len=256", "logging.progress=off", "logging.tensorboard=false",
            "logging.log_interval=1", "train.micro_batch_size=2", "train.global_batch_size=4",
            "rl.rollout.max_new_tokens=12", "train.lr=1e-4", "reward.kind=rule", "checkpoint.interval=0"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    from triarch.data_pipeline.prepare.pydocs import stdlib_docstrings
    from triarch.data_pipeline.prepare.synthetic_preferences import make_synthetic_preferences

    out = tmp_path_factory.mktemp("slurm-rl") / "prefs"
    make_synthetic_preferences(out, seed=0, pairs=120, eval_fraction=0.15, max_len=96,
                               docs=stdlib_docstrings(1500, workers=1))
    return out


def rl_metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "reward_mean" in r}


def test_grpo_usr2_saves_requeues_and_resumes_to_the_uninterrupted_trajectory(cluster, prompts, home,
                                                                              tmp_path) -> None:
    """An RL run under SLURM: USR2 -> the iteration finishes, actor, reference position, KL controller and
    prompt stream are saved -> requeue -> resume; every iteration's metrics equal an uninterrupted run's."""
    run = tmp_path / "grpo-preempted"
    iterations = 12
    result = triarch(home, "submit", GRPO, *RL_SMALL, f"data.path={prompts}", f"train.steps={iterations}",
                     "--run-dir", str(run), "--time", "10", "--nodes", "2")
    job = submitted_job_id(result)
    wait_for_step(run, 2)
    slurm("scancel", "--signal=USR2", job)
    assert wait_for_end(job, 400) == "COMPLETED", log_text(run, job, 0, "err")[-3000:]
    assert ledger(run)["preemption"] == 1
    err = log_text(run, job, 0, "err")
    assert "preemption (SIGUSR2): saved step" in err and "resumed from" in err
    got = rl_metrics(run)
    assert sorted(got) == list(range(1, iterations + 1))
    local = tmp_path / "grpo-local"
    cmd = [sys.executable, "-m", "triarch.cli", "grpo", GRPO, *RL_SMALL, f"data.path={prompts}",
           f"train.steps={iterations}", "--nproc", "2", "--run-dir", str(local)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    want = rl_metrics(local)
    for step in range(1, iterations + 1):
        for key in ("loss", "reward_mean", "kl", "response_length"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_time_limit_requeues_up_to_max_timeouts_then_saves_and_ends(cluster, data, home, tmp_path) -> None:
    """--time 1 with USR2 30 s before the end: the first warning requeues (a time-out), the second one finds
    --max-timeouts used up, saves and ends the job non-zero instead of letting SLURM kill it mid-step."""
    run = tmp_path / "time-limit"
    # submit() passes --time 10; the later --time 1 wins
    job = submit(home, run, data, 10**6, "--nodes", "2", "--time", "1", "--signal-delay", "30", "--max-timeouts", "1")
    assert wait_for_end(job, 400) == "FAILED", log_text(run, job, 0, "err")[-3000:]
    data_ = json.loads((run / "slurm" / "requeues.json").read_text())
    assert data_["counts"] == {"preemption": 0, "timeout": 1, "failure": 0}
    assert [e["kind"] for e in data_["events"]] == ["timeout", "stopped"]
    err = log_text(run, job, 0, "err")
    assert "reached its time limit 2 times (--max-timeouts 1)" in err
    committed = [s.step for s in list_steps(run / "checkpoints") if s.committed]
    assert len(committed) == 2 and max(logged_steps(run)) == committed[-1]
    assert logged_steps(run) == list(range(1, committed[-1] + 1))  # resumed once, no step twice


def test_killed_rank_is_retried_from_the_newest_checkpoint(cluster, data, home, uninterrupted, tmp_path) -> None:
    run = tmp_path / "retried"
    steps = 80
    job = submit(home, run, data, steps, "--nodes", "2", "--max-retries", "1", "checkpoint.interval=5")
    wait_for_step(run, 12)
    os.kill(rank_pid(run, 1), signal.SIGKILL)  # the rank on n2 dies
    assert wait_for_end(job, 300) == "COMPLETED", log_text(run, job, 0, "err")[-3000:]
    assert ledger(run)["failure"] == 1
    assert "retry 1 of 1: requeued" in log_text(run, job, 0, "err")
    assert max(logged_steps(run)) == steps
    assert losses(run) == pytest.approx(uninterrupted(steps), rel=1e-6)


def test_failure_without_retries_ends_the_job(cluster, data, home, tmp_path) -> None:
    run = tmp_path / "no-retry"
    job = submit(home, run, data, 400, "--nodes", "2")
    wait_for_step(run, 3)
    os.kill(rank_pid(run, 1), signal.SIGKILL)
    assert wait_for_end(job, 120) == "FAILED"
    assert "no retries left" in log_text(run, job, 0, "err")


@pytest.fixture()
def node_n2_restored(cluster):
    yield
    # a dead node comes back: its slurmd registers again and ReturnToService=2 returns it to service
    env = {**os.environ, "SLURM_CONF": str(SLURM_CONF)}
    subprocess.run(["slurmd", "-f", str(SLURM_CONF), "-N", "n2"], env=env, check=False)
    deadline = time.time() + 60
    while time.time() < deadline and "idle" not in slurm("sinfo", "-h", "-n", "n2", "-o", "%t"):
        time.sleep(1)


def kill_node(run: Path, node: str, rank: int) -> None:
    """The node dies: its slurmd, the job's step daemon there and the rank process go at once (the other
    node's daemons, on this same machine, are left alone)."""
    daemon = subprocess.run(["pgrep", "-f", f"slurmd -f .* -N {node}$"], capture_output=True, text=True).stdout.split()
    assert len(daemon) == 1, daemon
    rank_process = rank_pid(run, rank)
    step_daemon = parent_pid(rank_process)
    assert "slurmstepd" in Path(f"/proc/{step_daemon}/cmdline").read_text()
    for pid in (int(daemon[0]), step_daemon, rank_process):
        os.kill(pid, signal.SIGKILL)
    slurm("scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=killed-by-test")


def test_killed_node_requeues_and_the_job_finishes_when_the_node_returns(cluster, node_n2_restored, data, home,
                                                                         uninterrupted, tmp_path) -> None:
    run = tmp_path / "node-lost"
    steps = 80
    job = submit(home, run, data, steps, "--nodes", "2", "checkpoint.interval=5")
    wait_for_step(run, 12)
    kill_node(run, "n2", 1)
    deadline = time.time() + 120
    while job_state(job) != "PENDING" and time.time() < deadline:  # SLURM requeued it: NODE_FAIL
        time.sleep(1)
    assert job_state(job) == "PENDING"
    subprocess.run(["slurmd", "-f", str(SLURM_CONF), "-N", "n2"], check=True)  # the node reboots
    assert wait_for_end(job, 300) == "COMPLETED", log_text(run, job, 0, "err")[-3000:]
    assert f"job {job} attempt 1, rank 1 of 2" in log_text(run, job, 1, "out")
    assert "resumed from" in log_text(run, job, 0, "err")
    assert losses(run) == pytest.approx(uninterrupted(steps), rel=1e-6)


def test_elastic_job_finishes_on_the_surviving_node_with_dp1(cluster, node_n2_restored, data, home, uninterrupted,
                                                             tmp_path) -> None:
    run = tmp_path / "elastic"
    steps = 80
    job = submit(home, run, data, steps, "--nodes", "2", "--elastic", "checkpoint.interval=5")
    wait_for_step(run, 12)
    kill_node(run, "n2", 1)
    assert wait_for_end(job, 300) == "COMPLETED", log_text(run, job, 0, "err")[-3000:]
    out = log_text(run, job, 0, "out")
    assert f"job {job} attempt 0, rank 0 of 2" in out and f"job {job} attempt 1, rank 0 of 1 on node 0 of 1" in out
    err = log_text(run, job, 0, "err")
    assert "dp_shard1" in err and "saved with layout pp1 x dp_replicate1 x dp_shard2" in err
    # resumed from a committed step k: steps after k were trained once more at DP 1 on the same global
    # batches, so every final loss equals the uninterrupted DP-2 run's (no sequence repeated or skipped)
    assert max(logged_steps(run)) == steps
    assert losses(run) == pytest.approx(uninterrupted(steps), rel=1e-5)


def test_stopped_rank_ends_the_job_within_the_hang_timeout(cluster, data, home, tmp_path) -> None:
    run = tmp_path / "hang"
    timeout = 20
    job = submit(home, run, data, 5000, "--nodes", "2", f"fault.hang_timeout_s={timeout}")
    wait_for_step(run, 3)
    pid = rank_pid(run, 1)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        state = wait_for_end(job, 120)
        took = time.time() - stopped_at
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert state == "FAILED"
    assert took <= timeout + 3, f"the job ended {took:.1f} s after the stop (hang timeout {timeout} s)"
    err0 = log_text(run, job, 0, "err")
    report = [ln for ln in err0.splitlines() if ln.startswith("hang: ")]
    assert len(report) == 1 and "rank 1 (" in report[0] and "stopped responding during step" in report[0], err0[-3000:]
    # rank 0's stacks, waiting in the step loop (in the step's collectives, or the logging window's when the stop
    # lands between two steps)
    assert "Python stacks of this process" in err0 and "in _train" in err0, err0[-3000:]
    assert (run / "heartbeats" / "hang_report.txt").read_text().strip() == report[0]


def test_sweep_runs_a_job_array_with_one_run_directory_each(cluster, data, home, tmp_path) -> None:
    base = tmp_path / "sweep"
    result = triarch(home, "submit", TINY, *SMALL, f"data.path={data}", "train.steps=4", "--run-dir", str(base),
                     "--nodes", "1", "--time", "10", "--sweep", "train.lr=0.001,0.003")
    jobs = [ln.split()[2] for ln in result.stdout.splitlines() if ln.startswith("submitted job")]
    assert result.returncode == 0 and len(jobs) == 2 and all("_" in j for j in jobs), result.stdout + result.stderr
    for job in jobs:
        assert wait_for_end(job, 180) == "COMPLETED"
    lrs = {}
    for value in ("0.001", "0.003"):
        run = base / f"train.lr={value}"
        assert sorted(losses(run)) == [1, 2, 3, 4]
        lrs[value] = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["lr"]
    assert lrs["0.003"] > lrs["0.001"]


def test_follow_logs_then_cancel_a_running_job(cluster, data, home, tmp_path) -> None:
    run = tmp_path / "cancelled"
    job = submit(home, run, data, 5000, "--nodes", "1")
    wait_for_step(run, 2)
    follow = subprocess.Popen([sys.executable, "-m", "triarch.cli", "logs", job, "--follow", "--stderr"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=slurm_env(home))
    time.sleep(3)
    assert follow.poll() is None  # still following a running job
    twice = triarch(home, "submit", TINY, *SMALL, f"data.path={data}", "--run-dir", str(run), "--nodes", "1")
    assert twice.returncode == 2 and f"already belongs to job {job}" in twice.stderr, twice.stderr
    assert twice.stderr.count("\n") == 1
    result = triarch(home, "cancel", job)
    assert result.returncode == 0 and f"cancelled job {job}" in result.stdout
    assert wait_for_end(job, 60) == "CANCELLED"
    out, err = follow.communicate(timeout=30)  # follow ends by itself once the job has ended
    assert follow.returncode == 0, err
    assert "step 2/5000" in out


@pytest.mark.parametrize(("flags", "message"), [
    (["--nodes", "3", "parallel.tp=2"], "world size (3) is not divisible by parallel.tp*pp*dp_replicate"),
    (["--nodes", "2", "--partition", "nope"], "--partition nope): Batch job submission failed: Invalid partition name specified"),
    (["--nodes", "2", "--constraint", "nope"], "--constraint nope): Batch job submission failed: Invalid feature specification"),
    (["--nodes", "2", "--time", "soon"], "--time 'soon' is not a SLURM time limit"),
    (["--nodes", "2", "--mem", "lots"], "--mem 'lots' is not a SLURM memory size"),
    (["--nodes", "2", "--sweep", "train.lr"], "--sweep 'train.lr' must look like key=v1,v2"),
    (["--nodes", "2", "--elastic", "parallel.dp_replicate=2"], "--elastic resizes the data-parallel shard group"),
], ids=["layout", "partition", "constraint", "time", "mem", "sweep", "elastic-hsdp"])
def test_bad_submissions_are_one_line_errors_and_submit_nothing(cluster, data, home, tmp_path, flags, message) -> None:
    before = slurm("squeue", "-h", "-o", "%i").split()
    result = triarch(home, "submit", TINY, *SMALL, f"data.path={data}", "--run-dir", str(tmp_path / "bad"), *flags)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert slurm("squeue", "-h", "-o", "%i").split() == before
    assert not (home / "jobs.jsonl").exists()
    assert not (tmp_path / "bad").exists()  # a refused submission leaves no run directory, pickles or attempts


def test_unknown_job_is_a_one_line_error(cluster, home) -> None:
    for args in (["status", "999999"], ["logs", "999999"], ["cancel", "999999"]):
        result = triarch(home, *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "999999" in result.stderr, result
    assert job_state("999999") == "FINISHED"
