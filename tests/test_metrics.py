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
    matmul_parameter_count,
    mfu,
    parameter_count,
)
from triarch.training.gpu_peaks import GPU_PEAK_TABLE, matmul_precision, table_peak

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
    # N leaves out the input embedding (a lookup, not a matmul)
    assert matmul_parameter_count(cfg) == n - 1000 * 64
    assert flops_per_token(cfg) == 6 * (n - 1000 * 64) + 12 * 2 * 64 * 32 == 877440
    assert flops_per_token(cfg, n_params=10) == 60 + 12 * 2 * 64 * 32


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_of_the_886m_shape(tied):
    """PaLM's 6N + 12·L·d·T with N = the parameters in matmuls, written out for the benchmark shape."""
    V, d, L, heads, kv_heads, ffn, T = 32000, 2048, 16, 16, 8, 5632, 2048
    cfg = ModelConfig(vocab_size=V, dim=d, n_layers=L, n_heads=heads, n_kv_heads=kv_heads, ffn_hidden=ffn,
                      seq_len=T, max_seq_len=T, tie_embeddings=tied)
    kv_dim = kv_heads * (d // heads)
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * ffn + 2 * d  # wq, wo; wk, wv; w1, w2, w3; two norms
    output = V * d  # the head; a tied embedding is this same matrix, counted once
    n = L * per_layer + d + output  # + the final norm; the input embedding is a lookup and is left out
    assert parameter_count(cfg) == n + (0 if tied else V * d)
    assert flops_per_token(cfg) == 6 * n + 12 * L * d * T
    # the embedding no longer inflates the figure (it added ~7% on this shape)
    inflated = 6 * (n + V * d) + 12 * L * d * T
    assert inflated / flops_per_token(cfg) == pytest.approx(1.0686, abs=1e-4)


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
    assert key.endswith(f"threads={torch.get_num_threads()} | fp32")
    assert entries[key]["flops"] == peak.flops
    bf16 = device_peak_flops("cpu", "bf16")  # bf16 and fp8 runs: a bf16 probe (AMX makes it several times fp32's)
    assert bf16.source == "cpu-matmul-probe:bf16" and device_peak_flops("cpu", "fp8") == bf16
    assert len(json.loads(path.read_text())) == 2

    def no_probe(*args, **kwargs):
        raise AssertionError("probed again")

    monkeypatch.setattr(mfu_mod, "_probe_matmul", no_probe)
    assert device_peak_flops("cpu", "fp32") == peak  # same process: memo
    monkeypatch.setattr(mfu_mod, "_process_cache", {})
    assert device_peak_flops("cpu", "fp32") == peak  # a "new process": read from the file
    assert device_peak_flops("cpu", "bf16") == bf16


def test_a_cpu_peak_that_a_run_beats_is_probed_again_and_raised(fresh_home, monkeypatch):
    """A probe taken while other work held the cores is too low: the first window that beats it re-probes and
    keeps the larger figure (cached for the next run), so MFU never reads above 100%."""
    path = cpu_cache_path()
    path.parent.mkdir(parents=True)
    low = 1e6  # what a probe under heavy load might have cached
    path.write_text(json.dumps({mfu_mod._cpu_key("fp32"): {"flops": low}}))
    peak = device_peak_flops("cpu", "fp32")
    assert peak.flops == low
    meter = ThroughputMeter(flops_per_token=1e6, peak=peak, n_devices=1)
    meter.update(tokens=100, seconds=0.01)  # 1e10 model FLOP/s, far above the cached 1e6
    window = meter.window()
    assert 0 < window.mfu <= 1.0 and window.mfu_source == "cpu-matmul-probe"
    raised = json.loads(path.read_text())[mfu_mod._cpu_key("fp32")]["flops"]
    assert raised >= 1e10 and device_peak_flops("cpu", "fp32").flops == raised
    monkeypatch.setattr(mfu_mod, "_process_cache", {})
    assert device_peak_flops("cpu", "fp32").flops == raised  # the next run reads the raised figure
    table = PeakFlops(989e12, "table:H100 SXM bf16")
    assert mfu_mod.raise_cpu_peak(table, 2e15) == table  # a datasheet figure is never changed


def test_hfu_counts_the_recomputed_forward():
    from triarch.config import load_config
    from triarch.training.mfu import recompute_flops_per_token

    model = load_config(None, []).model
    assert recompute_flops_per_token(model, "none") == recompute_flops_per_token(model, "selective") == 0
    extra = recompute_flops_per_token(model, "full")
    blocks = model.n_layers * (2 * model.dim ** 2 + 2 * model.dim * model.kv_heads * (model.dim // model.n_heads)
                               + 3 * model.dim * model.ffn_hidden + 2 * model.dim)
    assert extra == 2 * blocks + 4 * model.n_layers * model.dim * model.seq_len  # one more forward of every block
    meter = ThroughputMeter(flops_per_token(model), PeakFlops(1e15, "test"), 2, recompute_flops_per_token=extra)
    meter.update(tokens=1000, seconds=1.0)
    window = meter.window()
    assert window.hfu / window.mfu == pytest.approx((flops_per_token(model) + extra) / flops_per_token(model))
    assert window.as_metrics()["hfu"] == window.hfu


def test_cpu_peak_env_override(fresh_home, monkeypatch):
    monkeypatch.setenv(CPU_PEAK_ENV, "1.5e11")
    peak = device_peak_flops("cpu", "fp32")
    assert peak == PeakFlops(1.5e11, f"env:{CPU_PEAK_ENV}")
    assert not cpu_cache_path().exists()
    monkeypatch.setenv(CPU_PEAK_ENV, "fast")
    with pytest.raises(ValueError, match=CPU_PEAK_ENV):
        device_peak_flops("cpu", "fp32")


# (name as torch.cuda.get_device_name reports it, table row, dense bf16, fp8, tf32, plain fp32)
GPU_NAMES = [
    ("NVIDIA H100 80GB HBM3", "H100", 989e12, 1979e12, 494.5e12, 67e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756e12, 1513e12, 378e12, 51e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5e12, 1670.5e12, 417.5e12, 60e12),
    ("NVIDIA H200", "H200", 989e12, 1979e12, 494.5e12, 67e12),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5e12, 1670.5e12, 417.5e12, 60e12),
    ("NVIDIA GH200 480GB", "GH200", 989e12, 1979e12, 494.5e12, 67e12),
    ("NVIDIA H800", "H800", 989e12, 1979e12, 494.5e12, 67e12),
    ("NVIDIA H800 PCIe", "H800 PCIe", 756e12, 1513e12, 378e12, 51e12),
    ("NVIDIA H20", "H20", 148e12, 296e12, 74e12, 44e12),
    ("NVIDIA B200", "B200", 2.25e15, 4.5e15, 1.125e15, 75e12),
    ("NVIDIA GB200", "GB200", 2.5e15, 5e15, 1.25e15, 80e12),
    ("NVIDIA A100-SXM4-80GB", "A100", 312e12, None, 156e12, 19.5e12),
    ("NVIDIA A100-PCIE-40GB", "A100", 312e12, None, 156e12, 19.5e12),
    ("NVIDIA A800-SXM4-80GB", "A800", 312e12, None, 156e12, 19.5e12),
]


@pytest.mark.parametrize(("name", "row", "bf16", "fp8", "tf32", "fp32"), GPU_NAMES, ids=[g[0] for g in GPU_NAMES])
def test_gpu_peak_table(name, row, bf16, fp8, tf32, fp32):
    assert table_peak(name, "bf16") == (bf16, f"table:{row} bf16")
    assert table_peak(name, "fp8") == ((fp8, f"table:{row} fp8") if fp8 else (bf16, f"table:{row} bf16 (no fp8)"))
    # fp32 runs: the TF32 tensor-core peak with train.tf32 on, the plain FP32 peak with it off
    assert table_peak(name, matmul_precision("fp32", tf32=True)) == (tf32, f"table:{row} tf32")
    assert table_peak(name, matmul_precision("fp32", tf32=False)) == (fp32, f"table:{row} fp32")


def test_every_table_row_is_reached_and_complete():
    reached = {table_peak(f"NVIDIA {key}", "bf16")[1].removeprefix("table:").removesuffix(" bf16")
               for key, _ in GPU_PEAK_TABLE}
    assert reached == {key for key, _ in GPU_PEAK_TABLE}  # no row hidden behind an earlier, shorter name
    assert {g[1] for g in GPU_NAMES} == reached
    for key, peaks in GPU_PEAK_TABLE:
        assert {"bf16", "tf32", "fp32"} <= set(peaks), key
        assert peaks["fp32"] < peaks["tf32"] < peaks["bf16"] <= peaks.get("fp8", peaks["bf16"]), key
    assert table_peak("Mystery GPU 9000", "bf16") is None


def test_matmul_precision():
    assert [matmul_precision(p, True) for p in ("fp32", "bf16", "fp16", "fp8")] == ["tf32", "bf16", "bf16", "fp8"]
    assert matmul_precision("fp32", False) == "fp32"
    assert matmul_precision("bf16", False) == "bf16"
    with pytest.raises(ValueError, match="int4"):
        matmul_precision("int4", True)


def test_gpu_peak_through_device_peak_flops(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak_flops(torch.device("cuda", 0), "fp32") == PeakFlops(494.5e12, "table:H100 tf32")
    assert device_peak_flops(torch.device("cuda", 0), "fp32", tf32=False) == PeakFlops(67e12, "table:H100 fp32")
    assert device_peak_flops(torch.device("cuda", 0), "bf16", tf32=False) == PeakFlops(989e12, "table:H100 bf16")


def test_unknown_gpu_is_probed(monkeypatch):
    monkeypatch.setattr(mfu_mod, "_process_cache", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU 9000")
    monkeypatch.setattr(mfu_mod, "_probe_matmul", lambda device, dtype, sizes, budget: {torch.bfloat16: 1e14}.get(dtype, 1e13))
    peak = device_peak_flops(torch.device("cuda", 0), "bf16")
    assert peak == PeakFlops(1e14, "cuda-matmul-probe:Mystery GPU 9000 bf16")
    # an fp32 run is measured with float32 matmuls (under the process's TF32 setting), not against bf16
    assert device_peak_flops(torch.device("cuda", 0), "fp32") == PeakFlops(1e13, "cuda-matmul-probe:Mystery GPU 9000 tf32")


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
