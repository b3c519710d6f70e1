"""The slow tier (``make test-slow``; CI's ``make test`` skips it): ZeRO-3 with optimizer state and parameters
offloaded to "NVMe" (a folder; DeepSpeed's async-IO op, JIT-compiled against libaio into the per-CPU-model
cache) against the native engine on the same initial weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'triarch[deepspeed]')")

from test_layout_parity import run_layout  # noqa: E402

REL_TOL = 1e-5


def _aio_available() -> bool:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return bool(AsyncIOBuilder().is_compatible())


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(1800)
def test_zero3_with_nvme_offload_equals_the_native_engine(tmp_path: Path, monkeypatch) -> None:
    if not _aio_available():
        pytest.skip("DeepSpeed's async-IO op needs libaio: apt-get install libaio-dev")
    from triarch.engine.deepspeed import extension_cache_dir

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extension_cache_dir()))
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    extra = tmp_path / "ds.json"  # small swap buffers for a small model (DeepSpeed's default is 1e8 elements x 5)
    extra.write_text(json.dumps({"zero_optimization": {"offload_param": {"buffer_size": 100_000, "buffer_count": 4}}}))
    want, want_params = run_layout(tmp_path / "native", 1, [])
    got, params = run_layout(tmp_path / "ds", 2, [
        "engine=deepspeed", "parallel.dp_shard=2", "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=nvme",
        "deepspeed.offload_params=nvme", f"deepspeed.nvme_path={nvme}", f"deepspeed.config_file={extra}"])
    assert got["engine"]["offload_params"] == "nvme" and got["engine"]["built_partitioned"]
    assert any(nvme.rglob("*")), "nothing was swapped to the nvme folder"
    for key in ("loss", "grad_norm"):
        for a, b in zip(got[key], want[key], strict=True):
            assert abs(a - b) <= REL_TOL * abs(b), (key, got[key], want[key])
    for key, ref in want_params.items():
        assert float((params[key] - ref).norm() / ref.norm()) <= REL_TOL, key
