"""The engine interface: what the training loop, the evaluator, the checkpoint manager, ``init.from``, the
planner and the alignment stages may ask of an engine, whichever one runs the model.

An engine owns this rank's share of one model (its chunks as sharded by the run's Topology), its optimizer
and learning-rate schedule, and the step. It takes the caller's objective (``objectives.base``) over
micro-batch bundles, the way a megatron ``forward_step``/``loss_func`` pair or a pipeline schedule's loss
works, and it speaks canonical parameter names (``parallel.init.canonical_name``: the names of the unsharded
model and of Hugging Face's Llama mapping) in everything it hands out, so a checkpoint written by one engine
loads into another at any layout.

Which engine runs is ``engine`` in the config; ``engine.build.build_engine`` makes one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from triarch.objectives.rows import RowFn

if TYPE_CHECKING:
    from triarch.config import TriarchConfig
    from triarch.engine.generation import Generation, SamplingParams
    from triarch.models.llama import LlamaArgs
    from triarch.objectives.base import Fields, Objective
    from triarch.objectives.token_loss import TokenLossFn
    from triarch.parallel.topology import Topology



class NonFiniteLossError(RuntimeError):
    """The loss of a step was NaN or infinite; raised before the optimizer step."""


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports (identical on every rank)."""

    loss: float
    grad_norm: float
    lr: float
    tokens: int
    stop: bool = False
    data_error: bool = False  # some rank's batch or shards failed a check: no optimizer step was taken
    stats: dict[str, float] = field(default_factory=dict)  # the objective's statistics, means over its units


class Engine(Protocol):
    """One model on one rank of the run's Topology (see the module docstring)."""

    cfg: TriarchConfig
    topo: Topology
    args: LlamaArgs  # the model's shape and head ("lm" or "score")
    trainable: bool  # False: a frozen model (reference, reward model): forward and generate only
    # True when ``generate``'s log-probs are the training forward's own (the RL loop then takes the PPO ratio's
    # old log-probs from the rollout); False when rollouts run on another implementation (recomputed)
    rollout_logprobs_exact: bool

    @property
    def n_microbatches(self) -> int:
        """Micro-batches per optimizer step on this data-parallel rank."""

    def local_parameter_count(self) -> int:
        """Elements of parameters stored on this rank (its shards only)."""

    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor | None = None,
                   loss_fn: TokenLossFn | None = None, *, step: int, position_ids: torch.Tensor | None = None,
                   stop_requested: bool = False, data_error: bool = False, objective: Objective | None = None,
                   fields: Fields | None = None) -> StepResult:
        """One optimizer step over this data-parallel rank's rows, the loss normalised by the objective's
        units over the global batch; stop and data-error flags agreed over all ranks."""

    def eval_step(self, inputs: torch.Tensor, fields: Fields, objective: Objective, *,
                  position_ids: torch.Tensor | None = None) -> tuple[float, dict[str, float]]:
        """Mean unit loss and statistics over the global batch whose slice is given (forward only)."""

    def forward_rows(self, inputs: torch.Tensor, fields: Fields, row_fn: RowFn, *,
                     position_ids: torch.Tensor | None = None, width: int | None = None) -> torch.Tensor | None:
        """Forward only: ``row_fn``'s value(s) per row, on the last pipeline stage (None elsewhere)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 prompt_index: torch.Tensor | None = None) -> Generation:
        """Continue this data-parallel rank's prompts with a KV cache on the weights as sharded."""

    def model_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters by canonical name, as tensors (DTensors where sharded) that a load may
        write into in place; call ``state_loaded`` after writing."""

    def checkpoint_state(self, prefix: str = "") -> dict[str, Any]:
        """Model and optimizer state to save, or to load in place: ``model.<name>``, ``optim.<name>.<slot>``
        under canonical names, each behind ``prefix``; call ``state_loaded`` after a load."""

    def state_loaded(self) -> None:
        """Take in what a load wrote into ``model_state`` / ``checkpoint_state`` tensors."""

    def schedule_state(self) -> dict[str, Any]:
        """The learning-rate schedule's position (plain values)."""

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        """Restore ``schedule_state``: the next step uses the learning rate it implies."""

    def set_schedule_step(self, step: int) -> None:
        """Put the schedule at ``step`` optimizer steps done, under the current config."""

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Full (gathered) parameters of this rank's chunks by canonical name (collective)."""

    def close(self) -> None:
        """Drop the model, schedule and optimizer state."""
