"""Names of the profiler scopes the trainer and the engines open around each part of a step.

They are ``torch.profiler.record_function`` ranges: free when no profiler runs, and the anchors
``profiling.breakdown`` splits a step's time by (alongside torch's own ``Optimizer.step#...``,
``autograd::engine::evaluate_function: ...`` and FSDP2's ``FSDP::...`` ranges)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch.profiler import record_function

T = TypeVar("T")

STEP = "triarch.step"  # the whole loop body of one step: data, compute, logging, evaluation, checkpointing
DATA = "triarch.data"  # waiting for the next batch
FORWARD_BACKWARD = "triarch.forward_backward"  # the engine's forward and backward over every micro-batch
# an engine's own data-parallel gradient reduction (megatron's finalize_model_grads)
GRAD_SYNC = "triarch.grad_sync"
OPTIMIZER = "triarch.optimizer"  # gradient norm, clipping, the optimizer step and zero_grad
AGREE = "triarch.agree"  # the step's one world all-reduce (loss, gradient norm, flags): waits for the slowest
CHECKPOINT = "triarch.checkpoint"  # saving (the synchronous part) and waiting for an earlier save
EVALUATION = "triarch.eval"  # held-out evaluation


def scope(name: str) -> record_function:
    """A profiler range named ``name`` (a context manager)."""
    return record_function(name)


def scoped(name: str, fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` run inside the profiler range ``name`` (for callbacks a library calls)."""

    def run(*args: Any, **kwargs: Any) -> T:
        with record_function(name):
            return fn(*args, **kwargs)

    return run
