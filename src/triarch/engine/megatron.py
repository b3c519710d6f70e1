"""The megatron engine: megatron-core's GPTModel, DDP, optimizer and schedules behind ``engine.interface``.

Construction: megatron's process groups from the run's Topology (``megatron_model.init_parallel_state``),
this stage's ``GPTModel`` (Transformer Engine spec on CUDA when TE imports, local spec otherwise), the
canonical initial weights written into it (the native engine's, drawn by canonical name and box, so both
engines start from the same weights), megatron DDP (fp32 gradient buffers) and megatron's optimizer
(AdamW, weight decay on matrices, clipping by the global norm). On CPU the small redirect layer
``megatron_cpu`` is applied first.

A step runs megatron's forward-backward schedule with the caller's objective as its ``loss_func`` and
``calculate_per_token_loss``: each micro-batch returns its loss *sum* and its units (counted tokens, pairs),
megatron sums gradients over data-parallel ranks and divides by the global unit count, so the update is
that of the global unit-mean loss, as on the native engine. Under TP the local vocabulary shard of the
logits is wrapped as a ``Shard(-1)`` DTensor and the objective runs under ``loss_parallel``, so every
objective of ``triarch.objectives`` runs unchanged.

State under canonical names (``megatron_names``): ``model_state``/``checkpoint_state`` copy this rank's
canonical shards out of megatron's fused tensors as DTensors on the tensor-parallel mesh; after a load,
``state_loaded`` copies them back. So DCP reshards between engines and layouts.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import loss_parallel

from triarch.config import ConfigError, TriarchConfig
from triarch.engine.interface import NonFiniteLossError, RowFn, StepResult
from triarch.engine.lr_schedule import build_scheduler, load_scheduler_state, scheduler_state
from triarch.engine.lr_schedule import set_schedule_step as put_schedule_at
from triarch.engine.megatron_model import (
    build_gpt,
    check_megatron_config,
    init_parallel_state,
    transformer_config,
    uses_transformer_engine,
)
from triarch.engine.megatron_names import CanonicalParam, canonical_params
from triarch.engine.model_args import llama_args
from triarch.engine.weight_sync import copy_weights
from triarch.objectives.base import PRETRAIN, Fields, Objective
from triarch.objectives.rows import RowCollector, local_value, token_objective
from triarch.objectives.token_loss import TokenLossFn, cross_entropy_sum
from triarch.parallel.init import init_box
from triarch.parallel.topology import Topology
from triarch.profiling import scopes
from triarch.profiling.scopes import scope

_MOMENTS = ("exp_avg", "exp_avg_sq")


class MegatronEngine:
    """This rank's megatron-core model, optimizer and step (``engine.interface``)."""

    rollout_logprobs_exact = False  # rollouts run on a native engine's forward (``generate``)

    def __init__(self, cfg: TriarchConfig, topo: Topology, *, materialize_weights: bool = True,
                 trainable: bool = True, head: str | None = None) -> None:
        check_megatron_config(cfg, topo.tp, topo.pp)
        if not materialize_weights:
            raise ConfigError("planning a layout of engine 'megatron' is not supported yet; plan with engine: native "
                              "(the parameter shards are the same)")
        self.cfg, self.topo, self.trainable = cfg, topo, trainable
        self.args = llama_args(cfg, head)
        from triarch.engine.megatron_cpu import apply_cpu_compat, silence_expected_notices

        silence_expected_notices()
        if topo.device.type == "cpu":
            apply_cpu_compat()
        virtual = cfg.parallel.virtual_stages if topo.pp > 1 else 1
        init_parallel_state(topo, virtual)
        if cfg.train.precision == "fp8" and not uses_transformer_engine(topo.device):
            raise ConfigError(f"train.precision 'fp8' on engine 'megatron' needs Transformer Engine on CUDA, not "
                              f"device {topo.device.type}; engine: native runs fp8 through torchao")
        self.config = transformer_config(cfg, self.args, topo.tp, topo.pp, topo.device)
        stages, per_stage = topo.pp * virtual, self.args.n_layers // (topo.pp * virtual)
        modules, self.canonical = [], []
        for v in range(virtual):  # chunk v of this rank is stage v * pp + pp_rank (the loop placement)
            stage = v * topo.pp + topo.pp_rank
            first, last = stage == 0, stage == stages - 1
            modules.append(build_gpt(cfg, self.args, topo, self.config, first=first, last=last,
                                     vp_stage=v if virtual > 1 else None))
            self.canonical += canonical_params(self.args, topo.tp, range(stage * per_stage, (stage + 1) * per_stage),
                                               first_stage=first, last_stage=last, prefix=f"{v}.")
        self._tp_mesh = topo.mesh["tp"]
        self._write_initial_weights(modules)
        self._pending: list[tuple[CanonicalParam, str, torch.Tensor]] = []
        self._slot_copies: dict[str, dict[str, torch.Tensor]] = {}
        self._steps_taken = 0
        self._rollout: Any = None  # the native engine ``generate`` samples on (built at its first call)
        self._distributed = trainable and topo.dp_shard > 1  # ZeRO-1: megatron's distributed optimizer
        if trainable:
            self.model_chunks = [self._wrap_ddp(m, v) for v, m in enumerate(modules)]
            self.optimizer = self._build_optimizer()
            self._adams = [inner.optimizer for inner in _inner_optimizers(self.optimizer)]
            for adam in self._adams:  # megatron's own scheduler applies each group's multiplier; ours is this
                for group in adam.param_groups:
                    group["weight_decay"] = cfg.train.weight_decay * group.get("wd_mult", 1.0)
            self._schedulers = [build_scheduler(adam, cfg.train) for adam in self._adams]
        else:
            for module in modules:
                module.requires_grad_(False)
            self.model_chunks = modules

    # --- construction -------------------------------------------------------------------------------
    def _named(self, chunks: list[torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """megatron's parameters of this rank by "<chunk>.<megatron name>" (DDP's ``module.`` removed)."""
        chunks = chunks if chunks is not None else self.model_chunks
        return {f"{v}.{name.removeprefix('module.')}": p for v, chunk in enumerate(chunks)
                for name, p in chunk.named_parameters()}

    def _write_initial_weights(self, modules: list[torch.nn.Module]) -> None:
        """The native engine's initial weights: each canonical shard drawn by name and box."""
        named = self._named(modules)
        init = self.cfg.model
        for param in self.canonical:
            box = param.local_box(self.topo.tp, self.topo.tp_rank)
            value, _ = init_box(param.name, param.full_shape, box, seed=self.cfg.train.seed, std=init.init_std,
                                n_layers=init.n_layers)
            param.write(value.to(self.topo.device), named)

    def _wrap_ddp(self, module: torch.nn.Module, chunk: int) -> torch.nn.Module:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=self._distributed,
                                                   check_for_nan_in_grad=False)
        model = DistributedDataParallel(self.config, ddp_config, module,
                                        disable_bucketing=chunk > 0)  # megatron's rule for virtual stages
        self.config.finalize_model_grads_func = scopes.scoped(scopes.GRAD_SYNC, finalize_model_grads)
        return model

    def _build_optimizer(self) -> Any:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        t = self.cfg.train
        config = OptimizerConfig(optimizer="adam", lr=t.lr, weight_decay=t.weight_decay, adam_beta1=t.beta1,
                                 adam_beta2=t.beta2, adam_eps=t.eps, clip_grad=t.grad_clip,
                                 bf16=self.config.bf16, params_dtype=self.config.params_dtype,
                                 use_distributed_optimizer=self._distributed)
        return get_megatron_optimizer(config, self.model_chunks)

    # --- the interface: shape ------------------------------------------------------------------------
    @property
    def n_microbatches(self) -> int:
        t = self.cfg.train
        return t.global_batch_size // (t.micro_batch_size * self.topo.dp)

    def local_parameter_count(self) -> int:
        return sum(p.numel() for p in {id(p): p for c in self.model_chunks for p in c.parameters()}.values())

    # --- forward -------------------------------------------------------------------------------------
    def _causal_mask(self, seq: int) -> torch.Tensor:
        """megatron's attention mask (True = masked) for causal attention; passing it keeps megatron from
        building its default on CUDA."""
        return torch.ones(seq, seq, dtype=torch.bool, device=self.topo.device).triu(1)[None, None]

    def _output(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One chunk's output for ``x``: on the last stage the head's output as the native model gives it,
        (batch, seq, vocab) logits (a ``Shard(-1)`` DTensor under TP) or (batch, seq, 1) scores; elsewhere the
        hidden states the schedule sends on (later stages take theirs from the schedule, not from ``x``)."""
        with self._precision_context():
            out = model(x, None, self._causal_mask(x.shape[1]))
        if getattr(model, "module", model).post_process and self.topo.tp > 1 and self.args.head == "lm":
            return DTensor.from_local(out, self._tp_mesh, [Shard(2)], run_check=False)
        return out

    def _precision_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # bf16 is megatron's own (params_dtype); no autocast

    def _loss_context(self) -> contextlib.AbstractContextManager:
        return loss_parallel() if self.topo.tp > 1 else contextlib.nullcontext()

    def _to_device(self, inputs: torch.Tensor, labels: torch.Tensor | None, fields: Fields | None,
                   position_ids: torch.Tensor | None) -> tuple[torch.Tensor, Fields]:
        if position_ids is not None:
            raise ValueError("engine 'megatron' has no per-document positions (data.document_masks)")
        fields = dict(fields) if fields is not None else {}
        if labels is not None:
            fields["labels"] = labels
        device = self.topo.device
        return inputs.to(device), {name: value.to(device) for name, value in fields.items()}

    def _micro_batches(self, inputs: torch.Tensor, fields: Fields, objective: Objective) -> list[tuple]:
        n = self.n_microbatches
        if inputs.shape[0] % (n * objective.rows_per_example):
            raise ValueError(f"{inputs.shape[0]} rows cannot be split into {n} micro-batches of whole examples "
                             f"({objective.rows_per_example} rows each)")
        split = {name: value.chunk(n) for name, value in fields.items()}
        return [(x, {name: parts[i] for name, parts in split.items()}) for i, x in enumerate(inputs.chunk(n))]

    def _run(self, inputs: torch.Tensor, fields: Fields, objective: Objective, *, backward: bool
             ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Every micro-batch through megatron's schedule; returns (local loss sum, local units, stat sums)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batches = self._micro_batches(inputs, fields, objective)
        losses: list[torch.Tensor] = []
        units: list[torch.Tensor] = []
        stats: list[torch.Tensor] = []

        def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
            x, micro_fields = next(data_iterator)
            output = self._output(model, x)

            def loss_func(_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
                loss, stat = objective.loss(output, micro_fields)
                count = objective.units(micro_fields)
                losses.append(local_value(loss.detach()).double())
                units.append(count.detach())
                if stat is not None:
                    stats.append(local_value(stat.detach()).double())
                local = loss.to_local() if isinstance(loss, DTensor) else loss
                return local, count.to(torch.int), {}

            plain = output.to_local() if isinstance(output, DTensor) else output
            return plain, loss_func

        schedule = get_forward_backward_func()
        # one iterator per chunk: each chunk's forward takes the micro-batches in order
        iterators = [iter(batches) for _ in self.model_chunks]
        with self._loss_context():
            schedule(forward_step_func=forward_step, data_iterator=iterators if len(iterators) > 1 else iterators[0],
                     model=self.model_chunks, num_microbatches=len(batches), seq_length=inputs.shape[1],
                     micro_batch_size=batches[0][0].shape[0], forward_only=not backward)
        zero = torch.zeros((), dtype=torch.float64, device=self.topo.device)
        return (torch.stack(losses).sum() if losses else zero,
                torch.stack(units).sum() if units else zero.long(), stats)

    def _agree(self, loss_sum: torch.Tensor, units: torch.Tensor, stats: list[torch.Tensor],
               names: tuple[str, ...], *flags: float) -> tuple[list[float], list[float]]:
        """One world all-reduce of [loss sum, units, *flags, *stat sums], counted once per data-parallel
        rank (last stage, tensor-parallel rank 0)."""
        counts = self.topo.is_last_stage and self.topo.tp_rank == 0
        zero = torch.zeros((), dtype=torch.float64, device=self.topo.device)
        stat = torch.stack(stats).sum(0) if stats else torch.zeros(len(names), dtype=torch.float64,
                                                                     device=self.topo.device)
        fused = torch.cat([torch.stack([loss_sum if counts else zero, units.double() if counts else zero,
                                        *(torch.tensor(float(f), dtype=torch.float64, device=self.topo.device)
                                          for f in flags)]),
                           stat if counts else torch.zeros_like(stat)])
        with scope(scopes.AGREE):
            dist.all_reduce(fused)
        values = fused.tolist()
        head = 2 + len(flags)
        return values[:head], values[head:]

    # --- the interface: steps ------------------------------------------------------------------------
    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor | None = None,
                   loss_fn: TokenLossFn = cross_entropy_sum, *, step: int, position_ids: torch.Tensor | None = None,
                   stop_requested: bool = False, data_error: bool = False, objective: Objective | None = None,
                   fields: Fields | None = None) -> StepResult:
        """One optimizer step (``engine.interface.Engine.train_step``)."""
        if not self.trainable:
            raise RuntimeError("this engine is frozen (trainable=False); it has no optimizer step")
        objective = objective if objective is not None else token_objective(loss_fn)
        inputs, fields = self._to_device(inputs, labels, fields, position_ids)
        for chunk in self.model_chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        with scope(scopes.FORWARD_BACKWARD):
            loss_sum, units, stats = self._run(inputs, fields, objective, backward=True)
        with scope(scopes.OPTIMIZER):
            return self._finish_step(loss_sum, units, stats, objective, step, stop_requested, data_error)

    def _finish_step(self, loss_sum: torch.Tensor, units: torch.Tensor, stats: list[torch.Tensor],
                     objective: Objective, step: int, stop_requested: bool, data_error: bool) -> StepResult:
        """Agree on the loss and the flags, then step the (distributed) optimizer (or stop)."""
        (loss_sum, n_units, stops, data_errors), stat_sums = self._agree(
            loss_sum, units, stats, objective.stat_names, float(stop_requested), float(data_error))
        n_units = int(n_units)
        loss = loss_sum / max(n_units, 1)
        stat_values = {name: v / max(n_units, 1) for name, v in zip(objective.stat_names, stat_sums)}
        lr = self._adams[0].param_groups[0]["lr"]
        if data_errors > 0:
            self.optimizer.zero_grad()
            return StepResult(loss=loss, grad_norm=float("nan"), lr=lr, tokens=n_units, stop=stops > 0,
                              data_error=True, stats=stat_values)
        if not math.isfinite(loss):
            self.optimizer.zero_grad()
            raise NonFiniteLossError(f"loss is {loss} at step {step}; stopping before the optimizer step")
        if self.cfg.train.grad_clip > 0:
            _, grad_norm, _ = self.optimizer.step()
        else:
            self.optimizer.prepare_grads()
            grad_norm = self.optimizer.get_grad_norm()
            self.optimizer.step_with_ready_grads()
        for scheduler in self._schedulers:
            scheduler.step()
        self._steps_taken += 1
        return StepResult(loss=loss, grad_norm=float(grad_norm), lr=lr, tokens=n_units, stop=stops > 0,
                          stats=stat_values)

    @torch.no_grad()
    def eval_step(self, inputs: torch.Tensor, fields: Fields, objective: Objective = PRETRAIN, *,
                  position_ids: torch.Tensor | None = None) -> tuple[float, dict[str, float]]:
        for chunk in self.model_chunks:
            chunk.eval()
        inputs, fields = self._to_device(inputs, None, fields, position_ids)
        loss_sum, units, stats = self._run(inputs, fields, objective, backward=False)
        (loss_sum, n_units), stat_sums = self._agree(loss_sum, units, stats, objective.stat_names)
        n = max(int(n_units), 1)
        return loss_sum / n, {name: v / n for name, v in zip(objective.stat_names, stat_sums)}

    def eval_loss(self, inputs: torch.Tensor, labels: torch.Tensor, loss_fn: TokenLossFn = cross_entropy_sum, *,
                  position_ids: torch.Tensor | None = None) -> float:
        return self.eval_step(inputs, {"labels": labels}, token_objective(loss_fn), position_ids=position_ids)[0]

    @torch.no_grad()
    def forward_rows(self, inputs: torch.Tensor, fields: Fields, row_fn: RowFn, *,
                     position_ids: torch.Tensor | None = None, width: int | None = None) -> torch.Tensor | None:
        for chunk in self.model_chunks:
            chunk.eval()
        inputs, fields = self._to_device(inputs, None, fields, position_ids)
        rows = inputs.shape[0]
        out = torch.zeros((rows,) if width is None else (rows, width), dtype=torch.float64, device=self.topo.device)
        fields["row_index"] = torch.arange(rows, device=self.topo.device)
        self._run(inputs, fields, RowCollector(row_fn, out), backward=False)
        return out if self.topo.is_last_stage else None

    def generate(self, prompts: list[list[int]], params: Any, prompt_index: torch.Tensor | None = None) -> Any:
        """Rollouts on a frozen native engine of this layout holding this engine's current weights
        (``engine.weight_sync``; built at the first call, synced at every call): same tokens and log-probs as
        the native engine would sample from these weights. Its log-probs come from another implementation of
        the forward (``rollout_logprobs_exact`` is False): the RL loop recomputes the old log-probs here."""
        if self._rollout is None:
            from triarch.engine.build import build_engine

            train = self.cfg.train.model_copy(update={"compile": False, "activation_checkpoint": "none"})
            native = self.cfg.model_copy(update={"engine": "native", "train": train})
            self._rollout = build_engine(native, self.topo, trainable=False, head=self.args.head)
        copy_weights(self.model_state(), self._rollout.model_state())
        self._pending, self._slot_copies = [], {}
        return self._rollout.generate(prompts, params, prompt_index)

    # --- the interface: state under canonical names ---------------------------------------------------
    def _as_dtensor(self, param: CanonicalParam, local: torch.Tensor) -> DTensor:
        placement = Replicate() if param.shard_dim is None else Shard(param.shard_dim)
        return DTensor.from_local(local, self._tp_mesh, [placement], run_check=False,
                                  shape=torch.Size(param.full_shape), stride=_contiguous_stride(param.full_shape))

    def _optimizer_params(self) -> dict[str, tuple[Any, torch.Tensor, int]]:
        """Per megatron parameter name: (the inner torch optimizer, the fp32 parameter it steps, the offset of
        that parameter in the flattened megatron parameter). The stepped parameter is the model parameter
        itself (fp32), its fp32 main copy (bf16 models), or, with the distributed optimizer, this data-parallel
        rank's shard of the main parameter (absent when the rank holds none of it)."""
        out: dict[str, tuple[Any, torch.Tensor, int]] = {}
        for inner in _inner_optimizers(self.optimizer):
            stepped = {id(q) for g in inner.optimizer.param_groups for q in g["params"]}
            main = {}
            for model_group, main_group in zip(getattr(inner, "float16_groups", []),
                                               getattr(inner, "fp32_from_float16_groups", [])):
                main.update({id(m): copy for m, copy in zip(model_group, main_group)})
            for name, p in self._named().items():
                if self._distributed:
                    if p not in inner.model_param_group_index_map:
                        continue
                    try:
                        rng = inner._get_model_param_range_map(p)["param"]  # noqa: SLF001 (megatron's shard map)
                    except KeyError:  # no element of this parameter on this data-parallel rank
                        continue
                    group, order = inner.model_param_group_index_map[p]
                    out[name] = (inner.optimizer, inner.optimizer.param_groups[group]["params"][order], rng.start)
                elif id(p) in main:
                    out[name] = (inner.optimizer, main[id(p)], 0)
                elif id(p) in stepped:
                    out[name] = (inner.optimizer, p, 0)
        return out

    def _slot_names(self) -> tuple[str, ...]:
        """What the optimizer holds per parameter: AdamW's moments, and the fp32 main weights of a bf16 model."""
        return (*_MOMENTS, "main") if self.config.bf16 else _MOMENTS

    def _full_slots(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each megatron parameter's optimizer slots (``_slot_names``) as fp32 tensors of its shape (this TP
        rank's), created zeroed where the optimizer has not stepped; with the distributed optimizer gathered
        over data-parallel ranks (collective)."""
        stepped = self._optimizer_params()
        slots = self._slot_names()
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in self._named().items():
            out[name] = {m: torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for m in slots}
            if name in stepped:
                adam, shard, offset = stepped[name]
                state = {**_ensure_state(adam, shard, self._steps_taken), "main": shard}
                for m in slots:
                    out[name][m][offset:offset + shard.numel()] = state[m].detach().reshape(-1)
            if self._distributed:
                for m in slots:
                    dist.all_reduce(out[name][m], group=self.topo.dp_mesh.get_group())  # disjoint ranges
            out[name] = {m: v.view(p.shape) for m, v in out[name].items()}
        return out

    def _put_slots(self, slots: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write full slots (``_full_slots``' layout) into the optimizer: each rank its own shard."""
        with torch.no_grad():
            for name, (adam, shard, offset) in self._optimizer_params().items():
                state = {**_ensure_state(adam, shard, self._steps_taken), "main": shard}
                for m in self._slot_names():
                    state[m].reshape(-1).copy_(slots[name][m].reshape(-1)[offset:offset + shard.numel()])
                state["step"].fill_(self._steps_taken)

    def model_state(self) -> dict[str, torch.Tensor]:
        """Canonical weights: the model's own (fp32), or the optimizer's fp32 main weights (bf16)."""
        self._pending = []  # what the last call handed out is what ``state_loaded`` takes back
        if self.trainable and self.config.bf16:
            self._slot_copies = self._full_slots()
            source, kind = {n: v["main"] for n, v in self._slot_copies.items()}, "main"
        else:
            source, kind = self._named(), "model"
        state = {}
        for param in self.canonical:
            tensor = self._as_dtensor(param, param.read(source))
            self._pending.append((param, kind, tensor))
            state[param.name] = tensor
        return state

    def checkpoint_state(self, prefix: str = "") -> dict[str, Any]:
        state: dict[str, Any] = {f"{prefix}model.{k}": v for k, v in self.model_state().items()}
        if not self._slot_copies:
            self._slot_copies = self._full_slots()
        for param in self.canonical:
            for moment in _MOMENTS:
                tensor = self._as_dtensor(param, param.read({r.target: self._slot_copies[r.target][moment]
                                                              for r in param.rows}))
                self._pending.append((param, moment, tensor))
                state[f"{prefix}optim.{param.name}.{moment}"] = tensor
            step = torch.tensor(float(self._steps_taken), dtype=torch.float32)
            self._pending.append((param, "step", step))
            state[f"{prefix}optim.{param.name}.step"] = step
        return state

    def state_loaded(self) -> None:
        """Copy what a load wrote into the canonical tensors back into megatron's model and optimizer."""
        named = self._named()
        slots_loaded = False
        for param, kind, tensor in self._pending:
            if kind == "model":
                param.write(tensor.to_local(), named)
            elif kind == "step":
                self._steps_taken = int(tensor.item())
            else:  # a slot ("main" weights of a bf16 model, or a moment)
                if kind == "main":
                    param.write(tensor.to_local(), named)  # the bf16 model weights: the main weights rounded
                param.write(tensor.to_local(), {r.target: self._slot_copies[r.target][kind] for r in param.rows})
                slots_loaded = True
        self._pending.clear()
        if slots_loaded:
            self._put_slots(self._slot_copies)
        elif self.trainable:
            _refresh_main_params(self.optimizer)
        self._slot_copies = {}

    def schedule_state(self) -> dict[str, Any]:
        return scheduler_state(self._schedulers[0])

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        for scheduler in self._schedulers:
            load_scheduler_state(scheduler, state)

    def set_schedule_step(self, step: int) -> None:
        for scheduler in self._schedulers:
            put_schedule_at(scheduler, step)

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Full canonical weights (the fp32 main weights of a bf16 model), gathered over TP (collective)."""
        full = {name: tensor.full_tensor() for name, tensor in self.model_state().items()}
        self._pending, self._slot_copies = [], {}
        return full

    def describe(self) -> dict[str, Any]:
        """What megatron runs here (for logs and tests): sequence parallel, the optimizer classes."""
        inner = _inner_optimizers(self.optimizer) if self.trainable else []
        return {"engine": "megatron", "sequence_parallel": bool(self.config.sequence_parallel),
                "optimizers": [type(o).__name__ for o in inner], "chunks": len(self.model_chunks)}

    def close(self) -> None:
        self._pending.clear()
        if self._rollout is not None:
            self._rollout.close()
            self._rollout = None
        if self.trainable:
            for adam in self._adams:
                adam.state.clear()
        self.model_chunks = []



def _inner_optimizers(optimizer: Any) -> list[Any]:
    """megatron's optimizers under a ChainedOptimizer (or the one given)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _refresh_main_params(optimizer: Any) -> None:
    """After model weights were written: let optimizers that keep fp32 main copies take them in."""
    for inner in _inner_optimizers(optimizer):
        reload = getattr(inner, "reload_model_params", None)
        if reload is not None:
            reload()


def _ensure_state(adam: torch.optim.Optimizer, param: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """``adam``'s state of ``param``, created (zero moments, ``steps`` done) if the optimizer has not stepped."""
    state = adam.state[param]
    if not state:
        state["step"] = torch.tensor(float(steps), dtype=torch.float32)
        for moment in _MOMENTS:
            state[moment] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, out = 1, []
    for n in reversed(shape):
        out.append(stride)
        stride *= n
    return tuple(reversed(out))
