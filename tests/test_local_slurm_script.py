"""scripts/local_slurm.sh touches only the daemons it started, and will not start beside a SLURM it did
not start (a real cluster's node, or another test cluster)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from slurm_cluster import SCRIPT, slurm, start_cluster

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster() -> None:
    start_cluster()


def _script(action: str, state: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRIARCH_SLURM_DIR": str(state)}
    env.pop("SLURM_CONF", None)
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=120, env=env)


def test_stop_leaves_daemons_it_did_not_start(cluster, tmp_path: Path) -> None:
    impostor = tmp_path / "slurmd"  # a process named slurmd that no cluster of this script started
    shutil.copy("/bin/sleep", impostor)
    proc = subprocess.Popen([str(impostor), "300"])
    try:
        done = _script("stop", tmp_path / "other_state")  # another cluster's state folder: no pid files
        assert done.returncode == 0, done.stderr
        assert proc.poll() is None, "stop killed a slurmd it did not start"
        assert "idle" in slurm("sinfo", "-h", "-o", "%t")  # and the running test cluster is untouched
    finally:
        proc.kill()


def test_start_refuses_beside_a_slurm_it_did_not_start(cluster, tmp_path: Path) -> None:
    done = _script("start", tmp_path / "other_state")
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not start is running" in lines[0], done.stderr
    assert not (tmp_path / "other_state" / "slurm.conf").exists()
    assert "idle" in slurm("sinfo", "-h", "-o", "%t")
