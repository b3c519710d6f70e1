"""The CPU compatibility layer of the megatron engine (``engine/megatron_cpu.py``) is needed and sufficient.

Needed: every redirect names the text in megatron-core's source that reaches for CUDA; while that text is
there the redirect serves it, and when an upgrade removes it this test fails, so the redirect is dropped
rather than kept by habit. Without the layer a megatron-core forward on CPU fails at its first CUDA call.
Sufficient: with the layer, a step runs (the parity tests in test_megatron_engine.py run every path on CPU).
The layer is never applied on CUDA and leaves ``torch`` itself untouched.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'triarch[megatron]')")

from triarch.engine import megatron_cpu  # noqa: E402


def _source(module: str) -> str:
    return inspect.getsource(importlib.import_module(module))


@pytest.mark.parametrize("module", list(megatron_cpu.SCOPED_MODULES))
def test_each_scoped_module_still_reaches_for_cuda(module: str) -> None:
    serves, evidence = megatron_cpu.SCOPED_MODULES[module]
    assert evidence in _source(module), (f"{module} no longer contains {evidence!r} ({serves}): megatron-core "
                                         f"changed; drop or update this redirect in engine/megatron_cpu.py")


def _function_cases() -> list[tuple[str, str]]:
    return [(m, a) for m, redirects in megatron_cpu.FUNCTION_REDIRECTS.items() for a in redirects]


@pytest.mark.parametrize("module, attribute", _function_cases())
def test_each_replaced_function_still_needs_replacing(module: str, attribute: str) -> None:
    _, serves, evidence = megatron_cpu.FUNCTION_REDIRECTS[module][attribute]
    import megatron.core.optimizer.clip_grads  # noqa: F401 (where clip_grad_by_total_norm_fp32 is defined)
    original = getattr(importlib.import_module(module), attribute)
    defined_in = original.__module__ if original.__module__.startswith("megatron") else module
    assert evidence in _source(defined_in), f"{module}.{attribute}: {evidence!r} is gone ({serves})"


@pytest.mark.parametrize("key", list(megatron_cpu.METHOD_WRAPS))
def test_each_wrapped_method_still_needs_wrapping(key: tuple[str, str, str]) -> None:
    module, cls, method = key
    _, serves, evidence = megatron_cpu.METHOD_WRAPS[key]
    assert hasattr(getattr(importlib.import_module(module), cls), method)
    assert evidence in _source(module), f"{module}.{cls}.{method}: {evidence!r} is gone ({serves})"


GPT_FORWARD = """
import os, torch, torch.distributed as dist, torch.nn.functional as F, warnings
warnings.filterwarnings("ignore")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
if os.environ["COMPAT"] == "1":
    from triarch.engine.megatron_cpu import apply_cpu_compat
    apply_cpu_compat()
    apply_cpu_compat()  # idempotent
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig
parallel_state.initialize_model_parallel(1, 1)
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
model_parallel_cuda_manual_seed(0)
cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                        use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
                        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False)
model = GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=64, max_sequence_length=16,
                 position_embedding_type="rope")
mask = torch.ones(8, 8, dtype=torch.bool).triu(1)[None, None]
print("logits", tuple(model(torch.randint(0, 64, (2, 8)), None, mask).shape))
assert torch.cuda.current_device is not None and torch.zeros(1).device.type == "cpu"
"""


@pytest.mark.parametrize("compat", [False, True], ids=["without_layer", "with_layer"])
def test_a_megatron_forward_on_cpu_needs_the_layer(compat: bool) -> None:
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PORT": str(port), "COMPAT": "1" if compat else "0", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", GPT_FORWARD], capture_output=True, text=True, timeout=180, env=env)
    if compat:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "logits (2, 8, 64)" in result.stdout
    else:
        assert result.returncode != 0
        assert "cuda" in result.stderr.lower() or "CUDA" in result.stderr, result.stderr[-2000:]


def test_torch_itself_is_left_alone() -> None:
    megatron_cpu.apply_cpu_compat()
    assert torch.cuda.current_device is not megatron_cpu._CUDA.current_device  # noqa: SLF001
    assert importlib.import_module("megatron.core.tensor_parallel.layers").torch is not torch
    assert torch.Tensor.type(torch.zeros(1)) == "torch.FloatTensor"  # the type-name redirect is scoped in time
