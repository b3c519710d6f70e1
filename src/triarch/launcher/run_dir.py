"""The run directory before any rank starts: a usable folder, and each attempt's resolved config.

Every ``triarch train`` (or ``submit``) of a run writes its resolved config to
``RUN_DIR/attempts/NNNN.yaml`` (kept: the run's history). The ranks read that file; rank 0 makes it the
run's ``config.yaml`` only once the run is accepted (a resume whose config does not fit the checkpoints is
refused before), so a refused attempt never replaces the config the run was trained with.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from triarch.config import ConfigError, TriarchConfig, dump_config

ATTEMPTS_DIR = "attempts"
# the entries a run writes in its directory: name -> is a folder
RUN_ENTRIES = {"config.yaml": False, "metrics.jsonl": False, ".triarch.lock": False, ATTEMPTS_DIR: True,
               "checkpoints": True, "tensorboard": True, "heartbeats": True}
# what else runs write there (slurm.submit.LOG_DIR, profiling.session.PROFILE_DIR, rlhf.reference.REFERENCE_DIR,
# launcher.rank_main.FLIGHT_RECORDER_DIR, launcher.watchdog.REPORT_NAME): a folder holding any of these is a run
OTHER_RUN_ENTRIES = frozenset({"slurm", "profile", "reference", "flight_recorder", "hang_report.txt"})
# what may sit in a new run directory before its first run: job logs a user's own sbatch script points there
_LOG_SUFFIXES = (".out", ".err", ".log")


class RunDirError(ConfigError):
    """The run directory cannot be used (one line naming it and why)."""


def usable_run_dir(run_dir: Path) -> Path:
    """Create ``run_dir`` if needed (owner-only permissions: 0700) and check it is a folder this user can
    write and no other user can (it holds what every rank loads, and under SLURM the pickles submitit runs)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} is a file, not a folder; choose another --run-dir")
    foreign = _foreign_entries(run_dir)
    if foreign:
        raise RunDirError(f"run directory {run_dir} is a folder with other content ({', '.join(foreign)}) and no "
                          "run of triarch: a run writes its config, metrics and checkpoints there, so choose a new "
                          "or empty --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise RunDirError(f"cannot create run directory {run_dir}: {err.strerror or err}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunDirError(f"run directory {run_dir} is not writable")
    for name, folder in RUN_ENTRIES.items():  # what the run writes must be of the kind it writes
        path = run_dir / name
        if path.exists() and path.is_dir() != folder:
            kind = "a folder" if folder else "a file"
            raise RunDirError(f"{path} is not {kind}, which the run writes there: move it out of the run directory")
    mode = stat.S_IMODE(run_dir.stat().st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RunDirError(f"run directory {run_dir} can be written by other users (mode {mode:o}): they could "
                          f"replace the config, checkpoints or job files a run loads; fix it with: chmod go-w {run_dir}")
    return run_dir


def _foreign_entries(run_dir: Path) -> list[str]:
    """The first few entries of an existing folder that is not a run directory (none for a run's or an empty
    folder): it must not become one by accident (``--run-dir .``, a data folder, ``/``)."""
    try:
        names = sorted(os.listdir(run_dir)) if run_dir.is_dir() else []
    except OSError:
        return []  # unreadable: the writability check below names it
    if any(name in RUN_ENTRIES or name in OTHER_RUN_ENTRIES for name in names):
        return []
    foreign = [name for name in names if not name.startswith(".") and not name.endswith(_LOG_SUFFIXES)]
    return foreign[:3] + (["..."] if len(foreign) > 3 else [])


def write_attempt_config(cfg: TriarchConfig, run_dir: Path) -> Path:
    """Write this attempt's resolved config as the next ``RUN_DIR/attempts/NNNN.yaml`` and return its path."""
    folder = run_dir / ATTEMPTS_DIR
    try:
        folder.mkdir(exist_ok=True)
        number = 1 + max((int(p.stem) for p in folder.glob("*.yaml") if p.stem.isdigit()), default=0)
        path = folder / f"{number:04d}.yaml"
        dump_config(cfg, path)
    except OSError as err:
        raise RunDirError(f"cannot write to run directory {run_dir}: {err.strerror or err}") from None
    return path
