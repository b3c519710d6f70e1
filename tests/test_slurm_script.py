"""The sbatch script triarch submit generates for a fixed config and options matches a reviewed golden file;
the SLURM environment parsing and requeue decisions behave on the formats SLURM produces."""

from __future__ import annotations

from pathlib import Path

import pytest

from triarch.slurm.commands import parse_duration_s
from triarch.slurm.environment import (
    EPHEMERAL_PORT_START,
    PORT_BASE,
    SlurmTask,
    master_port,
    rendezvous_env,
    tasks_on_this_node,
)
from triarch.slurm.requeue import classify_stop
from triarch.slurm.resources import smallest_cpus_per_node, task_resources
from triarch.slurm.submit import SubmitOptions, log_folder, plan_runs, render_sbatch, with_node_cpus

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
OPTIONS = dict(gpus_per_node=8, partition="gpu", time="04:00:00", account="llm", qos="high", exclusive=True,
               constraint="h100", mem="0", max_retries=3, job_name="tiny-8x8")


def render(options: SubmitOptions, run_dir: str, config: str) -> str:
    runs = plan_runs(str(ROOT / "examples" / config), [], Path(run_dir), options)
    return render_sbatch(options, runs, log_folder(runs), "/opt/venv/bin/python")


CASES = [
    ("submit_8b_8x8_gpu.sbatch", "8b.yaml", SubmitOptions(nodes=8, **OPTIONS)),
    # GPU defaults: sinfo reported 112 CPUs per node -> 14 per rank, all of the node's memory, 14 threads
    ("submit_8b_gpu_known_cpus.sbatch", "8b.yaml",
     SubmitOptions(nodes=2, gpus_per_node=8, partition="gpu", time="2:00:00", cpus_per_node=112)),
    # GPU defaults without SLURM at submission: whole nodes, CPUs divided in the batch script
    ("submit_8b_gpu_unknown_cpus.sbatch", "8b.yaml",
     SubmitOptions(nodes=2, gpus_per_node=8, partition="gpu", time="2:00:00")),
    ("submit_tiny_elastic_cpu.sbatch", "tiny.yaml", SubmitOptions(nodes=2, elastic=True, max_retries=1, time="30")),
    ("submit_tiny_sweep.sbatch", "tiny.yaml", SubmitOptions(nodes=1, sweep={"train.lr": ["1e-3", "3e-4"]})),
]


@pytest.mark.parametrize(("name", "config", "options"), CASES, ids=[c[0] for c in CASES])
def test_sbatch_script_matches_golden_file(name: str, config: str, options: SubmitOptions) -> None:
    text = render(options, "/shared/runs/demo", config)
    golden = GOLDEN / name
    assert text == golden.read_text(), f"sbatch script changed; review and update {golden}:\n{text}"


def test_explicit_cpus_and_memory_win_over_the_gpu_defaults() -> None:
    given = task_resources(8, 8, cpus_per_node=112, cpus_per_task=6, mem="400G", exclusive=False)
    assert given.sbatch == {"cpus_per_task": 6, "mem": "400G"}
    assert given.srun_args == ["--gpu-bind=none", "--cpus-per-task=6"]
    assert given.setup == ["export OMP_NUM_THREADS=6"]
    # explicit --cpus-per-task needs no CPU count from SLURM, and nothing is asked
    options = SubmitOptions(nodes=1, gpus_per_node=8, cpus_per_task=6)
    assert with_node_cpus(options) is options


def test_cpu_jobs_get_what_was_asked() -> None:
    assert task_resources(0, 4, cpus_per_node=None, cpus_per_task=None, mem=None, exclusive=False).sbatch == {}
    asked = task_resources(0, 4, cpus_per_node=64, cpus_per_task=16, mem="64G", exclusive=True)
    assert asked.sbatch == {"cpus_per_task": 16, "mem": "64G", "exclusive": True}
    assert asked.srun_args == ["--cpus-per-task=16"] and asked.setup == []  # srun >= 22.05 does not inherit -c
    assert with_node_cpus(SubmitOptions(nodes=2)).cpus_per_node is None  # no sinfo for CPU jobs


def test_cpus_per_node_from_sinfo() -> None:
    text = "gpu* 112\ngpu* 96\ncpu 64\ncpu 128\nbig 224+\n"
    assert smallest_cpus_per_node(text, "gpu") == 96
    assert smallest_cpus_per_node(text, None) == 96  # the default partition, marked *
    assert smallest_cpus_per_node(text, "cpu") == 64
    assert smallest_cpus_per_node(text, "big") == 224
    assert smallest_cpus_per_node(text, "missing") is None
    assert smallest_cpus_per_node("cpu 64\n", None) is None  # no default partition


def test_slurm_durations() -> None:
    assert parse_duration_s("30") == 1800
    assert parse_duration_s("05:30") == 330
    assert parse_duration_s("1:00:00") == 3600
    assert parse_duration_s("2-03:04:05") == 2 * 86400 + 3 * 3600 + 4 * 60 + 5
    assert parse_duration_s("1-02") == 86400 + 2 * 3600
    assert parse_duration_s("UNLIMITED") is None


def test_task_environment_and_rendezvous() -> None:
    env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_RESTART_COUNT": "2"}
    task = SlurmTask.from_environ(env)
    assert (task.rank, task.world_size, task.local_rank, task.local_world_size, task.node_index) == (9, 16, 1, 8, 1)
    rdzv = rendezvous_env(task, "gpu07")
    assert rdzv["RANK"] == "9" and rdzv["WORLD_SIZE"] == "16" and rdzv["MASTER_ADDR"] == "gpu07"
    # every task of an attempt agrees on the port; a requeued attempt moves to another one
    assert rdzv["MASTER_PORT"] == str(master_port("4242", 2)) != str(master_port("4242", 3))
    assert tasks_on_this_node({"SLURM_TASKS_PER_NODE": "4,2(x2)", "SLURM_NODEID": "2"}, 8, 3) == 2


def test_rendezvous_port_stays_below_the_ephemeral_range_and_moves_on_restart() -> None:
    for job in [*range(0, 200_000, 997), 4242, 99_999_999, 2**40 + 3]:
        ports = [master_port(str(job), restart) for restart in range(12)]
        assert all(PORT_BASE <= port < EPHEMERAL_PORT_START for port in ports), (job, ports)
        assert all(a != b for a, b in zip(ports, ports[1:])), (job, ports)
    assert master_port("123_4", 0) == master_port("1234", 0)  # array tasks: the digits of their id
    # consecutive job ids land on distinct ports
    assert len({master_port(str(job), 0) for job in range(5000, 6000)}) == 1000


def test_stop_signal_near_the_time_limit_counts_as_timeout() -> None:
    assert classify_stop(100.0, signal_delay_s=120) == "timeout"
    assert classify_stop(3600.0, signal_delay_s=120) == "preemption"
    assert classify_stop(None, signal_delay_s=120) == "preemption"


@pytest.mark.parametrize("items, message", [
    (["train.lr=1e-3,1e-3"], "repeats 1e-3: each value must appear once"),
    (["train.lr=1e-3", "train.lr=3e-4"], "--sweep train.lr is given twice"),
    (["train.lr"], "must look like key=v1,v2"),
])
def test_a_sweep_whose_tasks_would_share_a_run_directory_is_refused(items: list[str], message: str) -> None:
    from triarch.config import ConfigError
    from triarch.slurm.submit import parse_sweep

    with pytest.raises(ConfigError, match=message):
        parse_sweep(items)
