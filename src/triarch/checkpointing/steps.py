"""The step folders of a run: ``RUN_DIR/checkpoints/step_<N>/``, and whether each is committed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from triarch.checkpointing.commit import read_commit

STEP_PATTERN = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class StepInfo:
    """One step folder and whether it counts."""

    step: int
    path: Path
    committed: bool


def list_steps(ckpt_dir: Path) -> list[StepInfo]:
    """Every ``step_<N>`` folder, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for path in ckpt_dir.iterdir():
        match = STEP_PATTERN.match(path.name)
        if match and path.is_dir():
            steps.append(StepInfo(int(match.group(1)), path, read_commit(path) is not None))
    return sorted(steps, key=lambda s: s.step)
