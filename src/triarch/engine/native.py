"""The native engine: torch.distributed TP/SP (DTensor), PP (pipelining), DP (FSDP2), on CPU or GPU.

Parallelism is applied from outside in a fixed order: build each pipeline chunk on the meta device,
tensor parallel, activation checkpointing, compile, data-parallel wrapping, then materialize with
layout-independent initial weights.

A training step takes this data-parallel rank's rows and a caller-supplied token loss that returns the
sum over counted tokens; the engine normalizes by the global token count, so pretraining, SFT (masked
labels) and later alignment losses share one step. Optional ``position_ids`` (per-document positions of
packed rows) reach every chunk: the model then keeps attention within each document (``models.llama``); with
pipeline parallelism they go to every stage as a keyword argument the schedule splits per micro-batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from triarch.config import ConfigError, TriarchConfig
from triarch.engine.adamw import build_optimizer
from triarch.engine.generation import Generation, SamplingParams, generate
from triarch.engine.interface import NonFiniteLossError, RowFn, StepResult
from triarch.engine.lr_schedule import build_scheduler, load_scheduler_state, scheduler_state
from triarch.engine.lr_schedule import set_schedule_step as put_schedule_at
from triarch.engine.model_args import llama_args
from triarch.engine.native_grad_norm import GradNormer, clip_factor, scale_gradients, settle_partial_grads
from triarch.engine.native_state import engine_state, named_parameters
from triarch.engine.step_inputs import inputs_on_device
from triarch.models.llama import Llama
from triarch.objectives.base import PRETRAIN, Fields, Objective
from triarch.objectives.rows import RowCollector, local_value, token_objective
from triarch.objectives.token_loss import TokenLossFn, cross_entropy_sum
from triarch.parallel.activation_checkpoint import apply_activation_checkpointing
from triarch.parallel.data_parallel import apply_data_parallel
from triarch.parallel.float8 import apply_float8
from triarch.parallel.init import full_parameters, materialize
from triarch.parallel.pipeline import build_chunk, build_schedule, chunk_specs
from triarch.parallel.tensor_parallel import apply_tensor_parallel
from triarch.parallel.topology import Topology
from triarch.profiling import scopes
from triarch.profiling.scopes import scope

log = logging.getLogger(__name__)
LOW_PRECISION = ("bf16", "fp8")  # bf16 parameters, activations and messages; fp8 adds float8 block matmuls


def parallelize_chunk(chunk: Llama, cfg: TriarchConfig, topo: Topology, *, trainable: bool = True) -> Llama:
    """Apply float8 (fp8 runs), TP/SP, activation checkpointing, compile and DP to one meta-device chunk (in
    place). Under PP a trainable chunk keeps its gathered weights from forward to backward; a frozen one (forward
    only) frees them after each forward."""
    if cfg.train.precision == "fp8":
        apply_float8(chunk, cfg.train.fp8_recipe)
    if topo.tp > 1:
        apply_tensor_parallel(chunk, topo.mesh["tp"], sequence_parallel=cfg.parallel.sequence_parallel)
    apply_activation_checkpointing(chunk, cfg.train.activation_checkpoint)
    if cfg.train.compile:
        for key, block in list(chunk.layers.items()):
            chunk.layers[key] = torch.compile(block)
    param_dtype = torch.bfloat16 if cfg.train.precision in LOW_PRECISION else None
    apply_data_parallel(chunk, topo, param_dtype=param_dtype, reshard_after_forward=topo.pp == 1 or not trainable,
                        offload=cfg.parallel.fsdp_offload == "cpu")
    return chunk


def check_fp8_device(device: torch.device) -> None:
    """FP8 matmuls need FP8 tensor cores (SM 8.9+: Ada, Hopper, Blackwell). On CPU torch's float8 matmul is a
    reference kernel (benchmarks/fp8_cpu.py: thousands of times slower than bf16): right for checking numerics,
    not for training, which a warning says."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ConfigError(f"train.precision 'fp8' needs FP8 tensor cores (compute capability 8.9+); "
                              f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use bf16")
    elif device.type == "cpu":
        log.warning("train.precision fp8 on CPU runs torch's reference float8 matmul, thousands of times slower "
                    "than bf16: use it to check numerics, train in bf16")


class NativeEngine:
    """Owns the model chunks of this rank, the optimizer, the LR schedule and the step (``engine.interface``)."""

    rollout_logprobs_exact = True  # generate's log-probs come from the chunks the training forward runs

    def __init__(self, cfg: TriarchConfig, topo: Topology, *, materialize_weights: bool = True,
                 trainable: bool = True, head: str | None = None) -> None:
        """``trainable=False`` builds a frozen instance (a DPO reference): same layout, no gradients, no
        optimizer state; it runs ``forward_rows``, ``eval_step`` and ``generate`` only. ``head`` overrides
        the objective's head (``llama_args``): a PPO critic or reward model is a "score" engine."""
        self.cfg, self.topo, self.trainable = cfg, topo, trainable
        if cfg.train.precision == "fp8":
            check_fp8_device(topo.device)
        args = self.args = llama_args(cfg, head)
        self.specs = chunk_specs(args.n_layers, topo.pp, cfg.parallel.virtual_stages, topo.pp_rank)
        with torch.device("meta"):
            chunks = [build_chunk(args, spec) for spec in self.specs]
        self.chunks: list[Llama] = [parallelize_chunk(c, cfg, topo, trainable=trainable) for c in chunks]
        if not materialize_weights:
            return
        # FSDP2's CPU offload keeps the parameter shards (so gradients and optimizer state) in host memory
        param_device = torch.device("cpu") if cfg.parallel.fsdp_offload == "cpu" else topo.device
        for chunk in self.chunks:
            materialize(chunk, param_device, seed=cfg.train.seed, std=cfg.model.init_std, buffer_device=topo.device)
        if trainable:
            self.optimizer = build_optimizer(self.chunks, cfg.train, topo.device)
            self.scheduler = build_scheduler(self.optimizer, cfg.train)
            self._grad_normer = GradNormer(self.chunks, topo)
        else:
            for chunk in self.chunks:
                chunk.requires_grad_(False)
        self._objective: Objective = PRETRAIN
        self._fields: Fields = {}
        self._stat_sums: list[torch.Tensor] = []
        self._pending_stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._loss_scale = 1.0
        self._schedule = None
        if topo.pp > 1:
            self._schedule = build_schedule(
                cfg.parallel.schedule, self.chunks, self.specs, device=topo.device,
                pp_group=topo.mesh["pp"].get_group(), n_microbatches=self.n_microbatches,
                loss_fn=self._pipeline_loss,
            )

    # ------------------------------------------------------------------------------------------
    @property
    def n_microbatches(self) -> int:
        t = self.cfg.train
        return t.global_batch_size // (t.micro_batch_size * self.topo.dp)

    def local_parameter_count(self) -> int:
        """Elements of parameters stored on this rank (shards only)."""
        seen, total = set(), 0
        for chunk in self.chunks:
            for p in chunk.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += (p.to_local() if isinstance(p, DTensor) else p).numel()
        return total

    def _precision_context(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.precision in LOW_PRECISION:
            return torch.autocast(self.topo.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss_context(self) -> contextlib.AbstractContextManager:
        return loss_parallel() if self.topo.tp > 1 else contextlib.nullcontext()

    def _pipeline_loss(self, output: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The schedule's loss: ``rows`` (the pipeline target) are the micro-batch's row indices, so every
        field of the batch reaches the loss, split exactly as the inputs were."""
        fields = {name: value.index_select(0, rows) for name, value in self._fields.items()}
        loss, stats = self._objective.loss(output, fields)
        scaled = loss * self._loss_scale
        if stats is not None:  # kept only if ``scaled`` reaches the schedule's losses (not a shape-inference call)
            self._pending_stats.append((scaled, local_value(stats.detach()).double()))
        return scaled

    def _micro_loss(self, output: torch.Tensor, fields: Fields) -> torch.Tensor:
        loss, stats = self._objective.loss(output, fields)
        if stats is not None:
            self._stat_sums.append(local_value(stats.detach()).double())
        return loss

    def _sync_every_microbatch(self) -> bool:
        mode = self.cfg.parallel.dp_grad_sync
        return mode == "every_microbatch" or (mode == "auto" and self.topo.dp_shard > 1)

    def _global_units(self, fields: Fields) -> torch.Tensor:
        """The objective's units (counted tokens, pairs) in the whole global batch: a device tensor, never
        read back here."""
        count = self._objective.units(fields)
        dist.all_reduce(count, group=self.topo.dp_mesh.get_group())
        return count

    # ------------------------------------------------------------------------------------------
    def _forward_backward(self, inputs: torch.Tensor, fields: Fields, position_ids: torch.Tensor | None, *,
                          backward: bool) -> torch.Tensor | None:
        """Run every micro-batch of this rank; returns the unnormalized local loss sum (last stage) as a
        device tensor, or None on stages without the head."""
        micro_losses: list[torch.Tensor] = []
        self._stat_sums = []
        n = self.n_microbatches
        if inputs.shape[0] % (n * self._objective.rows_per_example):
            raise ValueError(f"{inputs.shape[0]} rows cannot be split into {n} micro-batches of whole examples "
                             f"({self._objective.rows_per_example} rows each)")
        if self._schedule is not None:
            scaled: list[torch.Tensor] = []
            self._fields = fields
            kwargs: dict = {}
            if self.topo.is_last_stage:
                rows = torch.arange(inputs.shape[0], device=self.topo.device)
                kwargs = {"target": rows, "losses": scaled}
            if position_ids is not None:
                kwargs["position_ids"] = position_ids
            args = (inputs,) if self.topo.is_first_stage else ()
            try:
                with self._loss_context(), self._precision_context():
                    if backward:
                        self._schedule.step(*args, **kwargs)
                    else:
                        self._schedule.eval(*args, **kwargs)
            finally:
                self._fields = {}
                pending, self._pending_stats = self._pending_stats, []
            # the schedule keeps each micro-batch's loss as returned by _pipeline_loss (scaled); its first
            # step also calls the loss once to infer shapes, on placeholder activations: that call is dropped
            kept = {id(micro) for micro in scaled}
            self._stat_sums = [stats for loss, stats in pending if id(loss) in kept]
            micro_losses = [local_value(micro.detach()).double() / self._loss_scale for micro in scaled]
        else:
            model = self.chunks[0]
            positions = position_ids.chunk(n) if position_ids is not None else [None] * n
            split = {name: value.chunk(n) for name, value in fields.items()}
            sync_each = self._sync_every_microbatch()
            for i, (x, pos) in enumerate(zip(inputs.chunk(n), positions)):
                if backward and hasattr(model, "set_requires_gradient_sync"):
                    model.set_requires_gradient_sync(sync_each or i == n - 1)
                with self._loss_context():
                    with self._precision_context():
                        output = model(x) if pos is None else model(x, position_ids=pos)
                    loss_sum = self._micro_loss(output, {name: parts[i] for name, parts in split.items()})
                    if backward:
                        (loss_sum * self._loss_scale).backward()
                micro_losses.append(local_value(loss_sum.detach()).double())
        return torch.stack(micro_losses).sum() if micro_losses else None

    def _stats_sum(self) -> torch.Tensor:
        """This rank's sums of the objective's statistics (zeros where the loss did not run)."""
        names = self._objective.stat_names
        if self._stat_sums:
            return torch.stack(self._stat_sums).sum(0)
        return torch.zeros(len(names), dtype=torch.float64, device=self.topo.device)

    def _agree(self, local_sum: torch.Tensor | None, units: torch.Tensor, *extra: torch.Tensor
               ) -> tuple[list[float], list[float]]:
        """One world all-reduce of [loss sum, global units, *extra, *stat sums] and the step's one
        device->host read; returns ([loss sum, units, *extra], stat sums).

        The loss and stat sums are counted once per (data-parallel rank, last stage, tp rank 0); the unit
        count (already summed over DP) is contributed by rank 0 only.
        """
        zero = torch.zeros((), dtype=torch.float64, device=self.topo.device)
        counts = self.topo.is_last_stage and self.topo.tp_rank == 0 and local_sum is not None
        stats = self._stats_sum()
        fused = torch.cat([torch.stack([local_sum if counts else zero,
                                        units.double() if dist.get_rank() == 0 else zero,
                                        *(e.double() for e in extra)]),
                           stats if counts else torch.zeros_like(stats)])
        with scope(scopes.AGREE):
            dist.all_reduce(fused)
        values = fused.tolist()
        head = 2 + len(extra)
        return values[:head], values[head:]

    def _stats(self, sums: list[float], units: int) -> dict[str, float]:
        return {name: value / max(units, 1) for name, value in zip(self._objective.stat_names, sums)}

    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor | None = None,
                   loss_fn: TokenLossFn = cross_entropy_sum, *, step: int, position_ids: torch.Tensor | None = None,
                   stop_requested: bool = False, data_error: bool = False, objective: Objective | None = None,
                   fields: Fields | None = None) -> StepResult:
        """One optimizer step over this DP rank's rows (``inputs``/``position_ids``/``fields``: micro-batches
        stacked; ``position_ids`` restrict attention to each packed document).

        ``objective`` (default: next-token loss ``loss_fn`` over ``labels``) reads ``fields`` (default
        ``{"labels": labels}``), per-row tensors split with the inputs (``objectives.base``).
        ``stop_requested`` (this rank's stop flag) is agreed in the same all-reduce as the loss and the
        gradient norm; ``StepResult.stop`` is True on every rank when any rank asked. So is ``data_error``
        (this rank's batch is a placeholder: its data failed a check); when any rank set it, no rank steps
        the optimizer and ``StepResult.data_error`` is True everywhere.

        The backward runs with a loss scale known on the host (as if every unit counted); the true
        normalisation by the global count of counted units is applied to the gradients afterwards, with
        clipping, in one foreach kernel. So the step reads the device once, after its fused all-reduce.
        """
        if not self.trainable:
            raise RuntimeError("this engine is frozen (trainable=False); it has no optimizer step")
        for chunk in self.chunks:
            chunk.train()
        inputs, fields, position_ids = self._to_device(inputs, labels, fields, position_ids)
        self._objective = objective if objective is not None else token_objective(loss_fn)
        units = self._global_units(fields)
        all_units = self._objective.units_bound(fields) * self.topo.dp  # a host figure
        # DP reduction averages over dp ranks, so dp / all_units makes the gradient (sum of unit losses) /
        # all_units; the factor all_units / units below turns it into the mean over counted units
        self._loss_scale = self.topo.dp / all_units
        with scope(scopes.FORWARD_BACKWARD):
            local_sum = self._forward_backward(inputs, fields, position_ids, backward=True)
        with scope(scopes.OPTIMIZER):
            return self._finish_step(local_sum, units, all_units, step, stop_requested, data_error)

    def _finish_step(self, local_sum: torch.Tensor, units: torch.Tensor, all_units: float, step: int,
                     stop_requested: bool, data_error: bool) -> StepResult:
        """Agree on the loss, the gradient norm and the flags, then clip and step (or stop)."""
        settle_partial_grads(self.chunks)
        square = self._grad_normer.local_square_sum()
        flags = torch.tensor([float(stop_requested), float(data_error)], dtype=torch.float64, device=self.topo.device)
        (loss_sum, n_units, square_sum, stops, data_errors), stat_sums = self._agree(
            local_sum, units, square, *flags.unbind())
        n_units = int(n_units)
        loss = loss_sum / max(n_units, 1)
        stats = self._stats(stat_sums, n_units)
        if data_errors > 0:
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss=loss, grad_norm=float("nan"), lr=self.optimizer.param_groups[0]["lr"],
                              tokens=n_units, stop=stops > 0, data_error=True, stats=stats)
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"loss is {loss} at step {step}; stopping before the optimizer step")
        to_mean = all_units / max(n_units, 1)
        norm = math.sqrt(square_sum) * to_mean
        scale_gradients(self._grad_normer.grads(), to_mean * clip_factor(norm, self.cfg.train.grad_clip))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, grad_norm=norm, lr=lr, tokens=n_units, stop=stops > 0, stats=stats)

    def _to_device(self, inputs: torch.Tensor, labels: torch.Tensor | None, fields: Fields | None,
                   position_ids: torch.Tensor | None) -> tuple[torch.Tensor, Fields, torch.Tensor | None]:
        return inputs_on_device(self.topo.device, inputs, labels, fields, position_ids)

    @torch.no_grad()
    def eval_step(self, inputs: torch.Tensor, fields: Fields, objective: Objective = PRETRAIN, *,
                  position_ids: torch.Tensor | None = None) -> tuple[float, dict[str, float]]:
        """Mean unit loss and the objective's statistics over the global batch whose DP slice is given
        (forward only)."""
        for chunk in self.chunks:
            chunk.eval()
        inputs, fields, position_ids = self._to_device(inputs, None, fields, position_ids)
        self._objective = objective
        units = self._global_units(fields)
        self._loss_scale = 1.0
        local_sum = self._forward_backward(inputs, fields, position_ids, backward=False)
        (loss_sum, n_units), stat_sums = self._agree(local_sum, units)
        return loss_sum / max(int(n_units), 1), self._stats(stat_sums, int(n_units))

    def eval_loss(self, inputs: torch.Tensor, labels: torch.Tensor, loss_fn: TokenLossFn = cross_entropy_sum, *,
                  position_ids: torch.Tensor | None = None) -> float:
        """Mean token loss over the global batch whose DP slice is given (forward only)."""
        return self.eval_step(inputs, {"labels": labels}, token_objective(loss_fn), position_ids=position_ids)[0]

    @torch.no_grad()
    def forward_rows(self, inputs: torch.Tensor, fields: Fields, row_fn: RowFn, *,
                     position_ids: torch.Tensor | None = None, width: int | None = None) -> torch.Tensor | None:
        """Forward only: ``row_fn(output, fields)`` -> one float per row of each micro-batch (e.g. a
        sequence's log-probability, computed vocabulary-parallel under TP), or ``width`` floats per row
        (per-token log-probs or values), as a (rows[, width]) float64 tensor of this DP rank's rows on the
        last pipeline stage, None on the others. Every rank of the model group takes part (it runs the
        schedule)."""
        for chunk in self.chunks:
            chunk.eval()
        inputs, fields, position_ids = self._to_device(inputs, None, fields, position_ids)
        rows = inputs.shape[0]
        shape = (rows,) if width is None else (rows, width)
        out = torch.zeros(shape, dtype=torch.float64, device=self.topo.device)
        fields["row_index"] = torch.arange(rows, device=self.topo.device)
        self._objective = RowCollector(row_fn, out)
        self._loss_scale = 1.0
        local = self._forward_backward(inputs, fields, position_ids, backward=False)
        return out if local is not None else None

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 prompt_index: torch.Tensor | None = None, *, micro_batches: bool = False) -> Generation:
        """Continue this DP rank's ``prompts`` (token id lists) on the chunks as trained, with a KV cache
        (``engine.generation``). ``prompt_index`` (global prompt indices, which key the sampling) defaults to
        ``dp_rank * len(prompts) + i``: prompts split over DP ranks in order. Every rank of the model group
        takes part; the result is identical on all of them. ``micro_batches``: under PP, keep several
        micro-batches of prompts in flight (every stage busy; pays when a stage's forward is compute-bound:
        large batches) rather than one batch stage after stage."""
        for chunk in self.chunks:
            chunk.eval()
        if prompt_index is None:
            prompt_index = torch.arange(len(prompts)) + self.topo.dp_rank * len(prompts)
        dtype = torch.bfloat16 if self.cfg.train.precision in LOW_PRECISION else torch.float32
        return generate(self.chunks, self.specs, self.topo, prompts, prompt_index, params, activation_dtype=dtype,
                        sequence_parallel=self.topo.tp > 1 and self.cfg.parallel.sequence_parallel,
                        autocast=self._precision_context(), micro_batches=micro_batches)

    def close(self) -> None:
        """Drop this engine's model, schedule and optimizer state (a frozen reference once its work is done)."""
        self.chunks.clear()
        self._schedule = None
        self._objective, self._fields, self._pending_stats, self._stat_sums = PRETRAIN, {}, [], []
        if self.trainable:
            self.optimizer.state.clear()

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Full (gathered) parameters of this rank's chunks keyed by canonical name (collective)."""
        return full_parameters(list(self.chunks))

    # --- state under canonical names (engine.interface) -----------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters (DTensors where sharded) by canonical name, written in place by a load."""
        return dict(named_parameters(self.chunks))

    def checkpoint_state(self, prefix: str = "") -> dict[str, Any]:
        """Parameters and AdamW moments under canonical names (``native_state.engine_state``)."""
        return engine_state(self.chunks, self.optimizer, prefix)

    def state_loaded(self) -> None:
        """Nothing to do: loads write into the parameters and moments themselves."""

    def schedule_state(self) -> dict[str, Any]:
        return scheduler_state(self.scheduler)

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        load_scheduler_state(self.scheduler, state)

    def set_schedule_step(self, step: int) -> None:
        put_schedule_at(self.scheduler, step)
