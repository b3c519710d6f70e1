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
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from triarch.config import TriarchConfig
from triarch.labels import IGNORE_INDEX
from triarch.models.llama import Llama, LlamaArgs
from triarch.parallel.activation_checkpoint import apply_activation_checkpointing
from triarch.parallel.data_parallel import apply_data_parallel
from triarch.parallel.init import full_parameters, materialize
from triarch.parallel.pipeline import build_chunk, build_schedule, chunk_specs
from triarch.parallel.tensor_parallel import apply_tensor_parallel
from triarch.parallel.topology import Topology
from triarch.training.grad_norm import GradNormer, clip_factor, scale_gradients, settle_partial_grads
from triarch.training.loss import TokenLossFn, cross_entropy_sum
from triarch.training.optimizer import build_optimizer, build_scheduler


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


def llama_args(cfg: TriarchConfig) -> LlamaArgs:
    """Model shape from the config."""
    m = cfg.model
    return LlamaArgs(
        vocab_size=m.vocab_size, dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.kv_heads,
        ffn_hidden=m.ffn_hidden, max_seq_len=m.max_seq_len, rope_theta=m.rope_theta, norm_eps=m.norm_eps,
        tie_embeddings=m.tie_embeddings, head="score" if cfg.objective.kind == "rm" else "lm",
    )


def parallelize_chunk(chunk: Llama, cfg: TriarchConfig, topo: Topology) -> Llama:
    """Apply TP/SP, activation checkpointing, compile and DP to one meta-device chunk (in place)."""
    if topo.tp > 1:
        apply_tensor_parallel(chunk, topo.mesh["tp"], sequence_parallel=cfg.parallel.sequence_parallel)
    apply_activation_checkpointing(chunk, cfg.train.activation_checkpoint)
    if cfg.train.compile:
        for key, block in list(chunk.layers.items()):
            chunk.layers[key] = torch.compile(block)
    param_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
    apply_data_parallel(chunk, topo, param_dtype=param_dtype, reshard_after_forward=topo.pp == 1)
    return chunk


class NativeEngine:
    """Owns the model chunks of this rank, the optimizer, the LR schedule and the step."""

    def __init__(self, cfg: TriarchConfig, topo: Topology, *, materialize_weights: bool = True) -> None:
        self.cfg, self.topo = cfg, topo
        args = llama_args(cfg)
        self.specs = chunk_specs(args.n_layers, topo.pp, cfg.parallel.virtual_stages, topo.pp_rank)
        with torch.device("meta"):
            chunks = [build_chunk(args, spec) for spec in self.specs]
        self.chunks: list[Llama] = [parallelize_chunk(c, cfg, topo) for c in chunks]
        if not materialize_weights:
            return
        for chunk in self.chunks:
            materialize(chunk, topo.device, seed=cfg.train.seed, std=cfg.model.init_std)
        self.optimizer = build_optimizer(self.chunks, cfg.train, topo.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self._loss_fn: TokenLossFn = cross_entropy_sum
        self._loss_scale = 1.0
        self._grad_normer = GradNormer(self.chunks, topo)
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
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.topo.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss_context(self) -> contextlib.AbstractContextManager:
        return loss_parallel() if self.topo.tp > 1 else contextlib.nullcontext()

    def _pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._loss_fn(output, target) * self._loss_scale

    def _sync_every_microbatch(self) -> bool:
        mode = self.cfg.parallel.dp_grad_sync
        return mode == "every_microbatch" or (mode == "auto" and self.topo.dp_shard > 1)

    def _global_token_count(self, labels: torch.Tensor) -> torch.Tensor:
        """Counted label positions of the whole global batch: a device tensor, never read back here."""
        count = (labels != IGNORE_INDEX).sum()
        dist.all_reduce(count, group=self.topo.dp_mesh.get_group())
        return count

    # ------------------------------------------------------------------------------------------
    def _forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None, *,
                          backward: bool) -> torch.Tensor | None:
        """Run every micro-batch of this rank; returns the unnormalized local loss sum (last stage) as a
        device tensor, or None on stages without the head."""
        micro_losses: list[torch.Tensor] = []
        if self._schedule is not None:
            scaled: list[torch.Tensor] = []
            kwargs: dict = {"target": labels, "losses": scaled} if self.topo.is_last_stage else {}
            if position_ids is not None:
                kwargs["position_ids"] = position_ids
            args = (inputs,) if self.topo.is_first_stage else ()
            with self._loss_context(), self._precision_context():
                if backward:
                    self._schedule.step(*args, **kwargs)
                else:
                    self._schedule.eval(*args, **kwargs)
            # the schedule keeps each micro-batch's loss as returned by _pipeline_loss (scaled)
            micro_losses = [_local_value(l.detach()).double() / self._loss_scale for l in scaled]
        else:
            model = self.chunks[0]
            n = self.n_microbatches
            positions = position_ids.chunk(n) if position_ids is not None else [None] * n
            sync_each = self._sync_every_microbatch()
            for i, (x, y, pos) in enumerate(zip(inputs.chunk(n), labels.chunk(n), positions)):
                if backward and hasattr(model, "set_requires_gradient_sync"):
                    model.set_requires_gradient_sync(sync_each or i == n - 1)
                with self._loss_context():
                    with self._precision_context():
                        logits = model(x) if pos is None else model(x, position_ids=pos)
                    loss_sum = self._loss_fn(logits, y)
                    if backward:
                        (loss_sum * self._loss_scale).backward()
                micro_losses.append(_local_value(loss_sum.detach()).double())
        return torch.stack(micro_losses).sum() if micro_losses else None

    def _agree(self, local_sum: torch.Tensor | None, tokens: torch.Tensor, *extra: torch.Tensor) -> list[float]:
        """One world all-reduce of [loss sum, global tokens, *extra] and the step's one device->host read.

        The loss sum is counted once per (data-parallel rank, last stage, tp rank 0); the token count (already
        summed over DP) is contributed by rank 0 only.
        """
        zero = torch.zeros((), dtype=torch.float64, device=self.topo.device)
        counts = self.topo.is_last_stage and self.topo.tp_rank == 0 and local_sum is not None
        fused = torch.stack([local_sum if counts else zero,
                             tokens.double() if dist.get_rank() == 0 else zero,
                             *(e.double() for e in extra)])
        dist.all_reduce(fused)
        return fused.tolist()

    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor, loss_fn: TokenLossFn = cross_entropy_sum,
                   *, step: int, position_ids: torch.Tensor | None = None, stop_requested: bool = False,
                   data_error: bool = False) -> StepResult:
        """One optimizer step over this DP rank's rows (``inputs``/``labels``/``position_ids``: micro-batches
        stacked; ``position_ids`` restrict attention to each packed document).

        ``stop_requested`` (this rank's stop flag) is agreed in the same all-reduce as the loss and the
        gradient norm; ``StepResult.stop`` is True on every rank when any rank asked. So is ``data_error``
        (this rank's batch is a placeholder: its data failed a check); when any rank set it, no rank steps
        the optimizer and ``StepResult.data_error`` is True everywhere.

        The backward runs with a loss scale known on the host (as if every label counted); the true
        normalisation by the global count of counted tokens is applied to the gradients afterwards, with
        clipping, in one foreach kernel. So the step reads the device once, after its fused all-reduce.
        """
        for chunk in self.chunks:
            chunk.train()
        inputs, labels = inputs.to(self.topo.device), labels.to(self.topo.device)
        position_ids = position_ids.to(self.topo.device) if position_ids is not None else None
        tokens = self._global_token_count(labels)
        self._loss_fn = loss_fn
        all_labels = labels.numel() * self.topo.dp  # label positions of the global batch: a host figure
        # DP reduction averages over dp ranks, so dp / all_labels makes the gradient (sum of token losses) /
        # all_labels; the factor all_labels / tokens below turns it into the mean over counted tokens
        self._loss_scale = self.topo.dp / all_labels
        local_sum = self._forward_backward(inputs, labels, position_ids, backward=True)
        settle_partial_grads(self.chunks)
        square = self._grad_normer.local_square_sum()
        flags = torch.tensor([float(stop_requested), float(data_error)], dtype=torch.float64, device=self.topo.device)
        loss_sum, n_tokens, square_sum, stops, data_errors = self._agree(local_sum, tokens, square, *flags.unbind())
        n_tokens = int(n_tokens)
        loss = loss_sum / max(n_tokens, 1)
        if data_errors > 0:
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss=loss, grad_norm=float("nan"), lr=self.optimizer.param_groups[0]["lr"],
                              tokens=n_tokens, stop=stops > 0, data_error=True)
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"loss is {loss} at step {step}; stopping before the optimizer step")
        to_mean = all_labels / max(n_tokens, 1)
        norm = math.sqrt(square_sum) * to_mean
        scale_gradients(self._grad_normer.grads(), to_mean * clip_factor(norm, self.cfg.train.grad_clip))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, grad_norm=norm, lr=lr, tokens=n_tokens, stop=stops > 0)

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, labels: torch.Tensor, loss_fn: TokenLossFn = cross_entropy_sum, *,
                  position_ids: torch.Tensor | None = None) -> float:
        """Mean token loss over the global batch whose DP slice is given (forward only)."""
        for chunk in self.chunks:
            chunk.eval()
        inputs, labels = inputs.to(self.topo.device), labels.to(self.topo.device)
        position_ids = position_ids.to(self.topo.device) if position_ids is not None else None
        tokens = self._global_token_count(labels)
        self._loss_fn = loss_fn
        self._loss_scale = 1.0
        local_sum = self._forward_backward(inputs, labels, position_ids, backward=False)
        loss_sum, n_tokens = self._agree(local_sum, tokens)
        return loss_sum / max(int(n_tokens), 1)

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Full (gathered) parameters of this rank's chunks keyed by canonical name (collective)."""
        return full_parameters(list(self.chunks))


def _local_value(value: torch.Tensor) -> torch.Tensor:
    """A loss as a plain device tensor (a DTensor loss from the vocabulary-parallel loss is gathered)."""
    return value.full_tensor() if isinstance(value, DTensor) else value
