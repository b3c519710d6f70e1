"""train.precision=fp8 on the native engine (torchao float8 training; ``torch._scaled_mm`` runs on CPU too).

- the block linears really compute in float8: a converted layer's output equals a hand-made per-tensor e4m3
  quantization of its input and weight (and differs from the bf16 matmul by more than bf16 rounding);
- only the block linears whose dimensions are multiples of 16 are converted (never embeddings or heads);
- layouts: fp8 at tp2(SP) x dp2 (FSDP) and at pp2 equal fp8 on one process to the bf16 layout tolerance, and
  fp8 is not bf16 (its losses differ from a bf16 run's), with the same canonical parameter names;
- the recipes the native engine cannot run, and fp8 on megatron without Transformer Engine, are one-line errors.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_layout_parity import run_layout

from triarch.config import ConfigError, load_config, validate_for_world
from triarch.engine.model_args import llama_args
from triarch.engine.native import NativeEngine
from triarch.launcher.distributed import init_distributed, shutdown_distributed
from triarch.models.llama import Llama
from triarch.parallel.float8 import apply_float8
from triarch.parallel.topology import Topology

pytest.importorskip("torchao")

SMALL = ["model.vocab_size=128", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_hidden=128", "model.seq_len=16", "train.global_batch_size=4", "train.micro_batch_size=2",
         "train.warmup_steps=1", "train.steps=4", "train.precision=fp8"]
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _tensorwise_fp8(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded through e4m3 with one scale from its own absolute maximum, back in float32."""
    scale = E4M3_MAX / t.float().abs().max().clamp(min=1e-12)
    return (t.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() / scale


def test_block_linears_compute_in_float8() -> None:
    device = torch.device("cpu")
    init_distributed(device)
    try:
        cfg = validate_for_world(load_config(None, SMALL), 1)
        engine = NativeEngine(cfg, Topology.build(device, pp=1, dp_replicate=1, dp_shard=1, tp=1))
        layer = engine.chunks[0].layers["0"].feed_forward.w1
        assert type(layer).__name__ == "Float8Linear"
        seen: dict[str, torch.Tensor] = {}

        def capture(module, inputs, output):  # inside FSDP's forward: the weight is the unsharded bf16 one
            weight = module.weight.full_tensor() if hasattr(module.weight, "full_tensor") else module.weight
            seen.update(x=inputs[0].detach(), w=weight.detach().clone(), y=output.detach())

        layer.register_forward_hook(capture)
        batch = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(0))
        result = engine.train_step(batch[:, :-1], batch[:, 1:], step=1)
    finally:
        shutdown_distributed()
    assert torch.isfinite(torch.tensor(result.loss))
    x, w, y = seen["x"], seen["w"], seen["y"]
    assert y.dtype == torch.bfloat16
    emulated = _tensorwise_fp8(x) @ _tensorwise_fp8(w).t()
    plain = x.float() @ w.float().t()
    assert _rel(y, emulated) < 5e-3, "the fp8 layer's output is not the e4m3 tensorwise product"
    assert _rel(y, plain) > 1e-2, "the fp8 layer's output is the plain bf16 product: nothing ran in float8"


def test_only_block_linears_with_dimensions_in_16s_are_converted() -> None:
    cfg = load_config(None, ["model.dim=48", "model.n_heads=4", "model.n_kv_heads=1", "model.ffn_hidden=128",
                             "model.vocab_size=128", "model.n_layers=1"])
    with torch.device("meta"):
        model = Llama(llama_args(cfg))
    converted = apply_float8(model, "rowwise")
    # head_dim 12: wk / wv have 12 output features (not a multiple of 16) and stay bf16
    assert sorted(converted) == ["layers.0.attention.wo", "layers.0.attention.wq", "layers.0.feed_forward.w1",
                                 "layers.0.feed_forward.w2", "layers.0.feed_forward.w3"]
    assert type(model.output).__name__ == "Linear" and type(model.layers["0"].attention.wk).__name__ == "Linear"


FP8 = ["train.precision=fp8"]
FP8_LAYOUTS = {  # name: (ranks, overrides); bf16 matmul outputs split over TP round differently: 2e-3 as for bf16
    "tp2_sp_dp2": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.dp_shard=2"]),
    "pp2": (2, ["parallel.pp=2"]),
}


@pytest.fixture(scope="module")
def fp8_reference(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    return run_layout(tmp_path_factory.mktemp("single_fp8"), 1, FP8)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(FP8_LAYOUTS))
def test_fp8_layouts_match_one_process(name: str, fp8_reference, tmp_path: Path) -> None:
    reference, ref_params = fp8_reference
    nproc, overrides = FP8_LAYOUTS[name]
    got, params = run_layout(tmp_path, nproc, [*FP8, *overrides])
    assert got["hidden_dtypes"] == ["torch.bfloat16"]
    for key in ("loss", "grad_norm"):
        for step, (a, b) in enumerate(zip(got[key], reference[key])):
            assert abs(a - b) <= 2e-3 * abs(b), f"{name} {key} step {step}: {a} vs {b}"
    assert params.keys() == ref_params.keys()  # (values: steps 2 and 3's losses follow from the updated weights)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_fp8_is_not_bf16(fp8_reference, tmp_path: Path) -> None:
    """Same canonical parameter names (a fp8 checkpoint resumes in bf16), different arithmetic."""
    reference, ref_params = fp8_reference
    bf16, bf16_params = run_layout(tmp_path, 1, ["train.precision=bf16"])
    assert bf16_params.keys() == ref_params.keys()
    assert all(a != b for a, b in zip(bf16["loss"][1:], reference["loss"][1:])), (bf16["loss"], reference["loss"])
    for key in ("loss", "grad_norm"):  # ... but close: the fp8 rounding is small at this scale
        for a, b in zip(bf16[key], reference[key]):
            assert abs(a - b) <= 1e-2 * abs(b)


@pytest.mark.parametrize("overrides, engine, message", [
    (["train.fp8_recipe=delayed"], "native", "train.fp8_recipe 'delayed' is a Transformer Engine recipe"),
    (["train.fp8_recipe=mxfp8"], "native", "train.fp8_recipe 'mxfp8' is a Transformer Engine recipe"),
    (["train.fp8_recipe=rowwise"], "megatron", "train.fp8_recipe 'rowwise' is torchao's (engine: native)"),
    ([], "megatron", "needs Transformer Engine on a CUDA GPU (not installed here)"),
])
def test_fp8_rules_are_config_errors(overrides: list[str], engine: str, message: str) -> None:
    if engine == "megatron":
        pytest.importorskip("megatron.core")
    cfg = load_config(None, [*SMALL, f"engine={engine}", *overrides])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_for_world(cfg, 1)


def test_fp8_recipe_error_is_one_line_from_the_cli(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "triarch.cli", "train", "examples/tiny.yaml", "--run-dir",
                           str(tmp_path / "run"), "train.precision=fp8", "train.fp8_recipe=delayed"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "fp8_recipe 'delayed'" in lines[0], done.stderr
