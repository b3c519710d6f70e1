"""Unit tests: parameter count, FLOPs, device peaks (table, CPU probe + cache, override), MFU, metrics logger."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch

from triarch.config import ModelConfig
from triarch.models.llama import Llama, LlamaArgs
from triarch.training import mfu as mfu_mod
from triarch.training.loggers import MetricsLogger, summary_line
from triarch.training.metrics import StepTimer, ThroughputMeter, peak_memory_bytes
from triarch.training.mfu import (
    CPU_PEAK_ENV,
    PeakFlops,
    cpu_cache_path,
    device_peak_flops,
    flops_per_token,
    mfu,
    parameter_count,
)

SHAPES = [
    dict(vocab_size=1000, dim=64, n_layers=2, n_heads=4, n_kv_heads=None, ffn_hidden=128, tie_embeddings=False),
    dict(vocab_size=1000, dim=64, n_layers=2, n_heads=4, n_kv_heads=None, ffn_hidden=128, tie_embeddings=True),
    dict(vocab_size=32000, dim=512, n_layers=3, n_heads=8, n_kv_heads=2, ffn_hidden=1376, tie_embeddings=False),
    dict(vocab_size=50304, dim=768, n_layers=2, n_heads=12, n_kv_heads=4, ffn_hidden=2048, tie_embeddings=True),
]


def _meta_model(cfg: ModelConfig) -> Llama:
    args = LlamaArgs(
        vocab_size=cfg.vocab_size,
        dim=cfg.dim,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.kv_heads,
        ffn_hidden=cfg.ffn_hidden,
        max_seq_len=cfg.max_seq_len,
        tie_embeddings=cfg.tie_embeddings,
    )
    with torch.device("meta"):
        return Llama(args)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s['dim']}-kv{s['n_kv_heads']}-tie{s['tie_embeddings']}")
def test_parameter_count_matches_meta_model(shape):
    cfg = ModelConfig(**shape)
    model = _meta_model(cfg)
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())


def test_flops_per_token_by_hand():
    cfg = ModelConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, seq_len=32)
    # per layer: wq 64*64 + wo 64*64 + wk, wv 64*(2*16) each + 3*64*128 + two norms 2*64 = 36992
    n = 1000 * 64 + 2 * 36992 + 64 + 1000 * 64
    assert n == 202048 == parameter_count(cfg)
    assert flops_per_token(cfg) == 6 * 202048 + 12 * 2 * 64 * 32 == 1261440
    assert flops_per_token(cfg, n_params=10) == 60 + 12 * 2 * 64 * 32


def test_mfu_known_case():
    assert mfu(1000.0, 1e9, 1e12, 2) == pytest.approx(0.5)
    assert mfu(1000.0, 1e9, PeakFlops(4e12, "x"), 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0, 1)


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(CPU_PEAK_ENV, raising=False)
    monkeypatch.setattr(mfu_mod, "_process_cache", {})
    return tmp_path


def test_cpu_probe_measures_and_caches(fresh_home, monkeypatch):
    start = time.perf_counter()
    peak = device_peak_flops(torch.device("cpu"), "fp32")
    assert time.perf_counter() - start < 3.0
    assert peak.flops > 0 and peak.source == "cpu-matmul-probe"
    path = cpu_cache_path()
    assert path == fresh_home / ".cache" / "triarch" / "cpu_peak.json"
    entries = json.loads(path.read_text())
    (key,) = entries
    assert key.endswith(f"threads={torch.get_num_threads()}")
    assert entries[key]["flops"] == peak.flops

    def no_probe(*args, **kwargs):
        raise AssertionError("probed again")

    monkeypatch.setattr(mfu_mod, "_probe_matmul", no_probe)
    assert device_peak_flops("cpu", "bf16") == peak  # same process: memo
    monkeypatch.setattr(mfu_mod, "_process_cache", {})
    assert device_peak_flops("cpu", "fp32") == peak  # a "new process": read from the file


def test_cpu_peak_env_override(fresh_home, monkeypatch):
    monkeypatch.setenv(CPU_PEAK_ENV, "1.5e11")
    peak = device_peak_flops("cpu", "fp32")
    assert peak == PeakFlops(1.5e11, f"env:{CPU_PEAK_ENV}")
    assert not cpu_cache_path().exists()
    monkeypatch.setenv(CPU_PEAK_ENV, "fast")
    with pytest.raises(ValueError, match=CPU_PEAK_ENV):
        device_peak_flops("cpu", "fp32")


@pytest.mark.parametrize(
    "name, precision, flops, source",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12, "table:H100 bf16"),
        ("NVIDIA H100 80GB HBM3", "fp8", 1979e12, "table:H100 fp8"),
        ("NVIDIA H100 80GB HBM3", "fp32", 494.5e12, "table:H100 fp32"),
        ("NVIDIA H200", "bf16", 989e12, "table:H200 bf16"),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12, "table:A100 bf16"),
        ("NVIDIA A100-SXM4-80GB", "fp32", 156e12, "table:A100 fp32"),
        ("NVIDIA A100-SXM4-80GB", "fp8", 312e12, "table:A100 bf16 (no fp8)"),
    ],
)
def test_gpu_peak_table(monkeypatch, name, precision, flops, source):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_flops(torch.device("cuda", 0), precision) == PeakFlops(flops, source)


def test_unknown_gpu_is_probed(monkeypatch):
    monkeypatch.setattr(mfu_mod, "_process_cache", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU 9000")
    monkeypatch.setattr(mfu_mod, "_probe_matmul", lambda device, dtype, sizes, budget: 1e14)
    peak = device_peak_flops(torch.device("cuda", 0), "bf16")
    assert peak == PeakFlops(1e14, "cuda-matmul-probe:Mystery GPU 9000 bf16")


def test_throughput_meter_and_timer():
    meter = ThroughputMeter(flops_per_token=1e6, peak=PeakFlops(1e10, "test"), n_devices=2)
    meter.update(tokens=1000, seconds=0.5)
    meter.update(tokens=1000, seconds=1.5)
    window = meter.window()
    assert window.tokens_per_s == pytest.approx(1000.0)
    assert window.step_time_s == pytest.approx(1.0)
    assert window.mfu == pytest.approx(1000 * 1e6 / 2e10)
    assert window.as_metrics()["mfu_source"] == "test"
    assert meter.window().steps == 0  # the window was reset
    with StepTimer("cpu") as timer:
        time.sleep(0.01)
    assert timer.elapsed_s >= 0.01
    assert peak_memory_bytes("cpu") > 10 * 1024**2  # a Python process with torch has > 10 MiB peak RSS


def _lines(run_dir: Path) -> list[dict]:
    def reject(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return [json.loads(line, parse_constant=reject) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _values(step: int, loss: float = 5.0) -> dict:
    return {
        "loss": torch.tensor(loss),
        "lr": 3e-4,
        "grad_norm": 1.23,
        "tokens_per_s": 12345.6,
        "mfu": 0.041,
        "mfu_source": "cpu-matmul-probe",
        "step_time_s": 0.52,
        "peak_mem_bytes": 3 * 1024**3,
    }


def test_metrics_logger_jsonl_tensorboard_and_summary(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="triarch.train")
    with MetricsLogger(tmp_path, enabled=True, total_steps=100, tensorboard=True, progress="off") as logger:
        logger.log(1, _values(1))
        logger.log(2, _values(2, loss=float("nan")))
        logger.log_eval(2, {"loss": 4.5})
    logger.close()  # idempotent
    records = _lines(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 2]
    required = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "peak_mem_bytes"}
    for r in records[:2]:
        assert next(iter(r)) == "step" and required <= r.keys()
    assert records[0]["loss"] == 5.0 and records[1]["loss"] is None
    assert records[2] == {"step": 2, "eval_loss": 4.5}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    messages = [r.getMessage() for r in caplog.records if r.name == "triarch.train"]
    assert messages[0] == (
        "step 1/100 | loss 5.0000 | lr 3.0e-04 | gnorm 1.23 | 12,346 tok/s | mfu 4.1% (cpu-matmul-probe) "
        "| 0.52 s | mem 3.00 GiB"
    )
    assert "loss nan" in messages[1]
    assert "eval_loss 4.5000" in messages[2]


def test_metrics_logger_progress_on_does_not_log_lines(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="triarch.train")
    with MetricsLogger(tmp_path, enabled=True, total_steps=3, tensorboard=False, progress="on") as logger:
        for step in (1, 2, 3):
            logger.log(step, _values(step))
    assert not [r for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(_lines(tmp_path)) == 3
    assert not (tmp_path / "tensorboard").exists()


def test_metrics_logger_disabled_is_noop(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False, total_steps=3, tensorboard=True, progress="on")
    logger.log(1, _values(1))
    logger.log_eval(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_metrics_logger_resume_drops_later_steps(tmp_path):
    with MetricsLogger(tmp_path, enabled=True, total_steps=10, tensorboard=False, progress="off") as logger:
        for step in range(1, 6):
            logger.log(step, _values(step))
        logger.log_eval(4, {"loss": 4.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line torn by the crash
    with MetricsLogger(tmp_path, enabled=True, total_steps=10, tensorboard=False, progress="off", start_step=3) as logger:
        logger.log(4, _values(4))
    assert [r["step"] for r in _lines(tmp_path)] == [1, 2, 3, 4]
    assert not list(tmp_path.glob("*.tmp"))


def test_summary_line_skips_missing_keys():
    assert summary_line(3, 10, {"loss": 2.0}) == "step 3/10 | loss 2.0000"


def test_metrics_logger_fresh_restart_clears_old_lines(tmp_path):
    with MetricsLogger(tmp_path, enabled=True, total_steps=10, tensorboard=False, progress="off") as logger:
        logger.log(1, _values(1))
        logger.log(2, _values(2))
    with MetricsLogger(tmp_path, enabled=True, total_steps=10, tensorboard=False, progress="off") as logger:
        logger.log(1, _values(1))
    assert [r["step"] for r in _lines(tmp_path)] == [1]
