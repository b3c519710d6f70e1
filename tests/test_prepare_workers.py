"""prepare's worker processes from a caller whose ``__main__`` cannot be re-imported (a script on stdin):
it works, and a worker that dies is a prompt one-line error, not a respawn loop that never returns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT_S = 120

PREPARE = """
import sys
from triarch.data_pipeline.prepare import prepare_pydocs
from triarch.data_pipeline.manifest import read_manifest
out = prepare_pydocs(sys.argv[1], 300, max_documents=400, workers=2, progress=False)
print("documents", read_manifest(out)["totals"]["documents"])
"""

# die_with_parent exits a worker whose parent is not the pid it was given: every worker dies at start
WORKERS_DIE = """
import os, types
from triarch.data_pipeline.prepare import pydocs
pydocs.os = types.SimpleNamespace(walk=os.walk, getpid=lambda: 1)
pydocs.docstrings_under(pydocs.stdlib_root(), workers=2)
"""


def _stdin_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-", *args], input=script, capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=cwd)


def test_prepare_from_a_script_on_stdin(tmp_path: Path) -> None:
    result = _stdin_script(PREPARE, str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["documents", "400"]


@pytest.mark.skipif(sys.platform != "linux", reason="die_with_parent is Linux-only")
def test_dead_worker_is_a_one_line_error_not_a_hang(tmp_path: Path) -> None:
    result = _stdin_script(WORKERS_DIE, cwd=tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "DataError: a docstring parser process died" in last and "workers=1" in last, result.stderr[-3000:]
