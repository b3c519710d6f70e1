"""megatron-core on CPU: the few places where megatron-core 0.16 reaches for CUDA, redirected to the CPU.

Applied by the megatron engine only when its device is the CPU (never on CUDA), once per process, and
scoped: each megatron module listed below sees a ``torch`` whose ``cuda`` namespace and tensor factories
send CUDA requests to the CPU; ``torch`` itself and every other module are untouched. Each entry names the
megatron-core call it serves (measured facts: shared/notes/megatron-core-on-cpu.md).
``tests/test_megatron_cpu.py`` checks that each redirect is still needed (the call still fails without it)
and sufficient, so a megatron-core upgrade that makes one obsolete or insufficient fails loudly there.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from typing import Any

import torch

# megatron module -> (what in it reaches for CUDA, the text in its source that does so: while that text is
# there the redirect is needed; tests/test_megatron_cpu.py checks it)
SCOPED_MODULES: dict[str, tuple[str, str]] = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding": (
        "torch.cuda.current_device() for the rotary frequencies (first failure of any forward)",
        "torch.cuda.current_device()"),
    "megatron.core.utils": ("device='cuda' in local_multi_tensor_l2_norm (the gradient norm without apex)",
                            'device="cuda"'),
    "megatron.core.tensor_parallel.layers": ("torch.cuda.current_device() for weights and SP gather buffers",
                                             "torch.cuda.current_device()"),
    "megatron.core.tensor_parallel.mappings": ("torch.cuda.current_device() for gather/scatter buffers",
                                               "torch.cuda.current_device()"),
    "megatron.core.tensor_parallel.random": ("torch.cuda.get_rng_state/manual_seed in CudaRNGStatesTracker.add",
                                             "torch.cuda.manual_seed(seed)"),
    "megatron.core.distributed.param_and_grad_buffer": ("torch.cuda.current_device() for the gradient buffers",
                                                        "torch.cuda.current_device()"),
    "megatron.core.pipeline_parallel.schedules": ("device='cuda' for the token counter of every schedule",
                                                  'device="cuda"'),
    "megatron.core.pipeline_parallel.p2p_communication": (
        "torch.cuda.current_device() for receive buffers; torch.cuda.synchronize() after batched p2p",
        "torch.cuda.current_device()"),
    "megatron.core.optimizer.optimizer": ("device='cuda' for the unit loss scale and the overflow buffer",
                                          "device='cuda'"),
    "megatron.core.optimizer.clip_grads": ("device='cuda' for the norm buffers", "device='cuda'"),
    "megatron.core.transformer.utils": ("device='cuda' in the default causal mask", 'device="cuda"'),
    "megatron.core.optimizer.distrib_optimizer": (
        "torch.cuda.current_device() for the parameter-state buffers of DistributedOptimizer",
        "torch.cuda.current_device()"),
}


def _cpu_device(device: Any) -> Any:
    """``device`` with CUDA replaced by the CPU."""
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def made_on_cpu(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return made_on_cpu


class _CpuCuda(types.SimpleNamespace):
    """``torch.cuda`` as the scoped modules see it: the current device is the CPU, its RNG is the CPU's."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


_CUDA = _CpuCuda(
    current_device=lambda: torch.device("cpu"),
    synchronize=lambda *args, **kwargs: None,
    get_rng_state=lambda *args, **kwargs: torch.get_rng_state(),
    set_rng_state=lambda state, *args, **kwargs: torch.set_rng_state(state),
    manual_seed=lambda seed: torch.manual_seed(seed),
    FloatTensor=torch.FloatTensor,
)
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like")


class _CpuTorch(types.ModuleType):
    """``torch`` for a scoped module: ``cuda`` is ``_CUDA``, factories move CUDA requests to the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CUDA
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cpu_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(state)


def _scale_grads(parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False) -> None:
    """``clip_grad_by_total_norm_fp32`` without its ``'torch.cuda.FloatTensor'`` type check and apex kernel."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else parameters
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in params if getattr(p, attr, None) is not None]
    if grads:
        torch._foreach_mul_(grads, clip_coeff)


# module -> {attribute: (replacement, the megatron call it serves, the text in the source of the original
# (where it is defined) that needs it)}
FUNCTION_REDIRECTS: dict[str, dict[str, tuple[Callable[..., Any], str, str]]] = {
    "megatron.core.tensor_parallel.random": {
        "_get_cuda_rng_state": (_cpu_rng_state, "CudaRNGStatesTracker.fork() reads the CUDA generator",
                                "torch.cuda.default_generators[idx]"),
        "_set_cuda_rng_state": (_set_cpu_rng_state, "CudaRNGStatesTracker.fork()/add() set the CUDA generator",
                                "_C._cuda_setRNGState"),
    },
    "megatron.core.optimizer.optimizer": {
        "clip_grad_by_total_norm_fp32": (_scale_grads, "MegatronOptimizer.clip_grad_norm asserts "
                                                       "param.grad.type() == 'torch.cuda.FloatTensor'",
                                         "assert param.grad.type() == 'torch.cuda.FloatTensor'"),
    },
}



def _with_cuda_type_names(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` during which ``Tensor.type()`` names a CPU tensor as its CUDA counterpart
    ('torch.FloatTensor' -> 'torch.cuda.FloatTensor'): the distributed optimizer sorts parameters into fp32
    and 16-bit groups by that string and refuses any other."""
    import functools

    @functools.wraps(method)
    def redirected(*args: Any, **kwargs: Any) -> Any:
        original = torch.Tensor.type

        def cuda_name(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **more: Any) -> Any:
            if dtype is None and not more and self.device.type == "cpu":
                return original(self).replace("torch.", "torch.cuda.", 1)
            return original(self, dtype, non_blocking, **more)

        torch.Tensor.type = cuda_name
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.type = original

    return redirected


# (module, class, method) -> (wrapper, the megatron call it serves, the source text that needs it)
METHOD_WRAPS: dict[tuple[str, str, str], tuple[Callable[..., Any], str, str]] = {
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "__init__"): (
        _with_cuda_type_names, "DistributedOptimizer.__init__ / _build_model_and_main_param_groups check "
                               "param.type() against 'torch.cuda.FloatTensor' and the 16-bit CUDA names",
        "model_param.type() == 'torch.cuda.FloatTensor'"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"): (
        _with_cuda_type_names, "Float16OptimizerWithFloat16Params.__init__ (bf16) sorts parameters by param.type() "
                               "into 'torch.cuda.BFloat16Tensor' and 'torch.cuda.FloatTensor' groups",
        "param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']"),
}

_applied: list[bool] = []


def apply_cpu_compat() -> None:
    """Redirect megatron-core's CUDA calls to the CPU (idempotent; call before building a megatron model)."""
    if _applied:
        return
    proxy = _CpuTorch()
    for name in SCOPED_MODULES:
        importlib.import_module(name).torch = proxy
    for name, redirects in FUNCTION_REDIRECTS.items():
        module = importlib.import_module(name)
        for attribute, (replacement, _, _) in redirects.items():
            if not hasattr(module, attribute):
                raise RuntimeError(f"megatron-core changed: {name}.{attribute} is gone; update engine/megatron_cpu.py")
            setattr(module, attribute, replacement)
    for (name, cls, method), (wrap, _, _) in METHOD_WRAPS.items():
        owner = getattr(importlib.import_module(name), cls)
        setattr(owner, method, wrap(getattr(owner, method)))
    _applied.append(True)


# megatron-core's notices that are expected here and say nothing to a user (no apex, no TE on CPU, its own
# use of torch's renamed collectives, a CUDA-only tuning hint)
_EXPECTED_NOTICES = (
    ".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
    ".*full scope is deprecated.*", ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
    ".*torch.distributed.reduce_scatter_tensor` is deprecated.*",
    ".*torch.distributed.all_gather_into_tensor` is deprecated.*",
)


def silence_expected_notices() -> None:
    """Filter megatron-core's expected warnings (``_EXPECTED_NOTICES``) for the rest of the process."""
    import warnings

    for pattern in _EXPECTED_NOTICES:
        warnings.filterwarnings("ignore", message=pattern)
    # the distributed optimizer's zero_grad reads .grad of its fp32 shard views (non-leaf tensors): harmless
    warnings.filterwarnings("ignore", message=".*grad attribute of a Tensor that is not a leaf.*",
                            module="megatron.core.optimizer.optimizer")
