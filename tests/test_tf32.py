"""``train.tf32``: float32 matmuls on CUDA use TF32 tensor cores unless switched off; CPU runs are untouched."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from triarch.config import load_config
from triarch.training.precision import configure_tf32


@pytest.fixture
def matmul_flag() -> Iterator[None]:
    """Restore torch's process-wide float32 matmul setting after the test."""
    before = torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision = before


def test_tf32_is_on_by_default_and_can_be_switched_off() -> None:
    assert load_config(None).train.tf32 is True
    assert load_config(None, ["train.tf32=false"]).train.tf32 is False


def test_cuda_ranks_get_the_switch(matmul_flag: None) -> None:
    configure_tf32(torch.device("cuda", 3), True)
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    configure_tf32(torch.device("cuda", 3), False)
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"


def test_cpu_runs_are_untouched(matmul_flag: None) -> None:
    before = (torch.backends.cuda.matmul.fp32_precision, torch.get_float32_matmul_precision(),
              torch.backends.mkldnn.matmul.fp32_precision)
    for enabled in (True, False):
        configure_tf32(torch.device("cpu"), enabled)
    assert (torch.backends.cuda.matmul.fp32_precision, torch.get_float32_matmul_precision(),
            torch.backends.mkldnn.matmul.fp32_precision) == before
