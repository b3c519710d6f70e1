"""Which CUDA device a rank takes, as a pure function of (LOCAL_RANK, visible devices, ranks on the node), and
how a rank that cannot place itself ends: one ``error:`` line, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triarch.config import ConfigError, dump_config, load_config
from triarch.launcher.distributed import cuda_index
from triarch.launcher.rank_main import EXIT_CONFIG


@pytest.mark.parametrize(
    ("local_rank", "visible", "local_world", "index"),
    [
        (3, 1, 8, 0),  # one GPU per task (--gpus-per-task 1, --gpu-bind): the visible one, whatever LOCAL_RANK
        (0, 1, 1, 0),
        (3, 8, 8, 3),  # every GPU of the node visible: LOCAL_RANK picks
        (7, 8, 8, 7),
        (1, 8, 2, 1),
        (None, 1, 8, 0),  # no LOCAL_RANK but only one device to take
        (None, 8, 1, 0),  # a lone process on a multi-GPU machine
    ],
)
def test_cuda_index(local_rank: int | None, visible: int, local_world: int, index: int) -> None:
    assert cuda_index(local_rank, visible, local_world) == index


def test_local_rank_beyond_the_visible_devices_is_one_line_naming_both() -> None:
    with pytest.raises(ConfigError) as info:
        cuda_index(5, 4, 8)
    message = str(info.value)
    assert "LOCAL_RANK 5" in message and "sees 4" in message and "\n" not in message


def test_missing_local_rank_with_several_devices_and_ranks_is_an_error() -> None:
    with pytest.raises(ConfigError, match="LOCAL_RANK is not set and 8 CUDA devices are visible to one of 16"):
        cuda_index(None, 8, 16)


def test_no_visible_device_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        cuda_index(0, 0, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_rank_without_a_device_exits_with_one_line(tmp_path: Path) -> None:
    dump_config(load_config(None, ["train.device=cuda", "train.steps=1", "train.warmup_steps=0"]),
                tmp_path / "config.yaml")
    env = {**os.environ, "LOCAL_RANK": "0"}
    done = subprocess.run([sys.executable, "-m", "triarch.launcher.rank_main", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_CONFIG
    assert done.stderr.strip().splitlines() == ["error: train.device is cuda but this process sees no CUDA device"]
