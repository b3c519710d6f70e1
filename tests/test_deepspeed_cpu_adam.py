"""The slow tier (``make test-slow``; CI's ``make test`` skips it): ZeRO with offloaded optimizer state stepped by
DeepSpeed's own CPU Adam (``deepspeed.optimizer=deepspeed_cpu_adam``), JIT-compiled with ``-march=native`` into
a cache folder per CPU model, against the native engine on the same initial weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'triarch[deepspeed]')")

from test_layout_parity import run_layout  # noqa: E402

REL_TOL = 1e-5


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_cpu_adam_with_offload_equals_the_native_engine(stage: int, tmp_path: Path) -> None:
    want, want_params = run_layout(tmp_path / "native", 1, [])
    got, params = run_layout(tmp_path / "ds", 2, ["engine=deepspeed", "parallel.dp_shard=2",
                                                  f"deepspeed.zero_stage={stage}", "deepspeed.offload_optimizer=cpu",
                                                  "deepspeed.optimizer=deepspeed_cpu_adam"])
    assert got["engine"]["client_optimizer"] == "DeepSpeedCPUAdam", got["engine"]
    for key in ("loss", "grad_norm"):
        for a, b in zip(got[key], want[key], strict=True):
            assert abs(a - b) <= REL_TOL * abs(b), (key, got[key], want[key])
    for key, ref in want_params.items():
        assert float((params[key] - ref).norm() / ref.norm()) <= REL_TOL, key


def test_the_op_cache_is_keyed_by_cpu_model() -> None:
    from triarch.engine.deepspeed import extension_cache_dir

    folder = extension_cache_dir()
    assert folder.parts[-4:-2] == ("triarch", "deepspeed-ops")
    assert folder.parts[-2] not in ("", "cpu") and folder.parts[-1].startswith("py3")
    assert torch.__version__.split("+")[0] in folder.parts[-1]
