"""The deepspeed engine: triarch's Llama under DeepSpeed ZeRO stage 1, 2 or 3 (optionally with optimizer and
parameter offload), behind ``engine.interface``.

The model, its initial weights, the objectives, the AdamW (a client ``torch.optim.AdamW``, so nothing
JIT-compiles) and the learning-rate schedule are the native engine's; DeepSpeed owns the partitioning,
the gradient reduction, clipping and the optimizer step. ``parallel.dp_shard`` is the ZeRO degree; tensor
and pipeline parallelism run on the other engines.

The loss normalisation is the native engine's: the global count of the objective's units (counted tokens,
pairs) is agreed before the forward, each micro-batch's backward runs on ``loss sum * dp / units`` (DeepSpeed
averages gradients over the data-parallel ranks and is told not to divide by the accumulation steps), so the
update is that of the global mean loss for any micro-batch count or DP size. Checkpoint state is handed out
per parameter under canonical names, gathered from ZeRO's flat partitions (``engine.deepspeed_state``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from triarch.config import TriarchConfig
from triarch.engine import deepspeed_state as zstate
from triarch.engine.adamw import adamw_groups, build_optimizer
from triarch.engine.deepspeed_config import deepspeed_json
from triarch.engine.generation import Generation, SamplingParams, generate
from triarch.engine.interface import NonFiniteLossError, RowFn, StepResult
from triarch.engine.lr_schedule import build_scheduler, load_scheduler_state, scheduler_state
from triarch.engine.lr_schedule import set_schedule_step as put_schedule_at
from triarch.engine.model_args import llama_args
from triarch.engine.step_inputs import inputs_on_device
from triarch.models.llama import Llama
from triarch.objectives.base import PRETRAIN, Fields, Objective
from triarch.objectives.rows import RowCollector, token_objective
from triarch.objectives.token_loss import TokenLossFn, cross_entropy_sum
from triarch.parallel.activation_checkpoint import apply_activation_checkpointing
from triarch.parallel.init import canonical_name, flat_init_value, full_init_value, materialize
from triarch.parallel.pipeline import build_chunk, chunk_specs
from triarch.parallel.topology import Topology
from triarch.profiling import scopes
from triarch.profiling.scopes import scope

log = logging.getLogger(__name__)


def import_deepspeed() -> Any:
    """DeepSpeed, quiet, without the shared-memory inference all-reduce op its communication backend would
    JIT-compile at start-up (75 s on 2 cores; training never uses it)."""
    if not torch.cuda.is_available():  # say so, rather than have DeepSpeed warn that it detected no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls torch's deprecated all_gather_into_tensor / reduce_scatter_tensor; the FutureWarning
    # is about its code, not the user's, and came back every step (catch_warnings elsewhere resets the once-only
    # registry): a 20-step ZeRO-3 run printed it 83 times
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    return deepspeed


def extension_cache_dir() -> Path:
    """Where DeepSpeed's JIT-compiled ops are kept: one folder per CPU model (they are built with
    ``-march=native``, so a build from another CPU may not run here), Python and torch version."""
    model = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    slug = re.sub(r"[^A-Za-z0-9]+", "-", model).strip("-").lower()
    version = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.split('+')[0]}"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "triarch" / "deepspeed-ops" / slug / version


def _ensure_local_rank(device: torch.device) -> None:
    """DeepSpeed reads ``LOCAL_RANK`` when it builds its engine and, under ZeRO-3, in every forward (its
    check that all ranks traced the same modules); a lone process (no launcher) lacks it: set it to this
    process's device index for the process's life. A child process that inherits it reads the same device."""
    os.environ.setdefault("LOCAL_RANK", str(device.index or 0))


class DeepSpeedEngine:
    """This rank's ZeRO partition of one model, its optimizer, schedule and step (``engine.interface``)."""

    rollout_logprobs_exact = True  # generate runs the module the training forward runs

    def __init__(self, cfg: TriarchConfig, topo: Topology, *, materialize_weights: bool = True,
                 trainable: bool = True, head: str | None = None) -> None:
        """``trainable=False``: a frozen model (a reference or reward model), kept whole on every rank without
        DeepSpeed (no optimizer to partition). ``head`` as in ``llama_args``."""
        self.cfg, self.topo, self.trainable = cfg, topo, trainable
        args = self.args = llama_args(cfg, head)
        self.specs = chunk_specs(args.n_layers, 1, 1, 0)
        with torch.device("meta"):
            self.module: Llama = build_chunk(args, self.specs[0])
        apply_activation_checkpointing(self.module, cfg.train.activation_checkpoint if trainable else "none")
        self.ds: Any = None  # the DeepSpeed engine of a trainable model
        self._frozen_ds: Any = None  # a frozen ZeRO-3 model's DeepSpeed engine (no optimizer: gathers to run)
        self._objective: Objective = PRETRAIN
        self._stat_sums: list[torch.Tensor] = []
        self._pending: list[tuple[torch.nn.Parameter | None, str | None, torch.Tensor]] = []
        if not materialize_weights:
            return
        if not trainable and not self._partitioned_at_construction():
            materialize(self.module, topo.device, seed=cfg.train.seed, std=cfg.model.init_std)
            self.module.requires_grad_(False)
            return
        deepspeed = import_deepspeed()
        config = deepspeed_json(cfg, n_microbatches=self.n_microbatches)
        _ensure_local_rank(topo.device)
        if self._partitioned_at_construction():
            self.module = self._build_partitioned(deepspeed, config)
        else:
            materialize(self.module, topo.device, seed=cfg.train.seed, std=cfg.model.init_std)
        if not trainable:  # partitioned like the policy; DeepSpeed gathers each layer for its forward
            self.module.requires_grad_(False)
            self._frozen_ds, *_ = deepspeed.initialize(model=self.module, config=config, dist_init_required=False)
            return
        self.optimizer = self._build_optimizer()
        self.ds, self.zero, _, _ = deepspeed.initialize(
            model=self.module, optimizer=self.optimizer, dist_init_required=False, config=config)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self._named = {canonical_name(n): p for n, p in self.module.named_parameters()}
        if cfg.train.precision == "bf16":
            self._write_fp32_initial_weights()

    def _partitioned_at_construction(self) -> bool:
        """ZeRO-3 builds the model partitioned (``deepspeed.zero.Init``), trainable or frozen: no rank ever
        holds the whole model, which is the point of stage 3 for a model larger than one device (or, with
        NVMe parameter offload, than host memory: each partition goes to disk as its module is built)."""
        return self.cfg.deepspeed.zero_stage == 3

    def _build_partitioned(self, deepspeed: Any, config: dict[str, Any]) -> Llama:
        """The model built under ``deepspeed.zero.Init`` (each parameter partitioned as its module is made),
        then every rank's partition filled with its elements of the layout-independent initial weights, drawing
        only those (``parallel.init.flat_init_value``)."""
        train = self.cfg.train
        with deepspeed.zero.Init(config_dict_or_path=config), torch.device(self.topo.device):
            module = build_chunk(self.args, self.specs[0])
        # recomputed in backward: ZeRO-3's pre-forward hooks gather the block's partitions again for it
        apply_activation_checkpointing(module, train.activation_checkpoint if self.trainable else "none")
        for raw_name, p in module.named_parameters():
            start, stop = zstate.partition_range(p)
            zstate.write_partition(p, flat_init_value(canonical_name(raw_name), tuple(p.ds_shape), start, stop,
                                                      seed=train.seed, std=self.cfg.model.init_std,
                                                      n_layers=self.args.n_layers))
        return module

    def _write_fp32_initial_weights(self) -> None:
        """bf16: DeepSpeed makes its fp32 master weights from the bf16 model; put the exact fp32 initial weights
        there instead (each parameter's full initial value computed on every rank, one at a time)."""
        train = self.cfg.train
        for name, p in self._named.items():
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            zstate.put_value(self.zero, p, full_init_value(name, shape, seed=train.seed, std=self.cfg.model.init_std,
                                                           n_layers=self.args.n_layers), None)
        zstate.refresh_model_weights(self.zero)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """The client optimizer DeepSpeed steps: torch's fused AdamW (the native engine's), or DeepSpeed's CPU
        Adam (``deepspeed.optimizer``), compiled into a cache folder per CPU model."""
        train = self.cfg.train
        if self.cfg.deepspeed.optimizer == "torch_adamw":
            return build_optimizer([self.module], train, self.topo.device)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extension_cache_dir()))
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(adamw_groups([self.module], train), lr=train.lr, betas=(train.beta1, train.beta2),
                                eps=train.eps, adamw_mode=True)

    # ------------------------------------------------------------------------------------------
    @property
    def n_microbatches(self) -> int:
        t = self.cfg.train
        return t.global_batch_size // (t.micro_batch_size * self.topo.dp)

    @property
    def zero_stage(self) -> int:
        run = self.ds if self.ds is not None else self._frozen_ds
        return run.zero_optimization_stage() if run is not None else 0

    def local_parameter_count(self) -> int:
        """Elements of parameters stored on this rank (a stage-3 rank holds its partition only)."""
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.module.parameters())

    def describe(self) -> dict[str, Any]:
        """What DeepSpeed runs here (for logs and tests)."""
        return {"engine": "deepspeed", "zero_stage": self.zero_stage,
                "optimizer": type(self.zero).__name__ if self.ds is not None else None,
                "client_optimizer": type(self.optimizer).__name__ if self.ds is not None else None,
                "offload_optimizer": self.cfg.deepspeed.offload_optimizer,
                "offload_params": self.cfg.deepspeed.offload_params,
                "built_partitioned": self.zero_stage == 3 and self._partitioned_at_construction(),
                "checkpointed_blocks": sum(type(b).__name__ == "CheckpointWrapper"
                                           for b in self.module.layers.values())}

    def _runner(self) -> Any:
        """What runs the forward: DeepSpeed's engine (trainable, or a frozen ZeRO-3 model), else the module."""
        for run in (self.ds, self._frozen_ds):
            if run is not None:
                return run
        return self.module

    def _forward(self, x: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        run = self._runner()
        return run(x) if position_ids is None else run(x, position_ids=position_ids)

    def _precision_context(self) -> contextlib.AbstractContextManager:
        # DeepSpeed's bf16 mode holds its model in bf16 itself; a frozen bare module runs under autocast
        if self._runner() is self.module and self.cfg.train.precision == "bf16":
            return torch.autocast(self.topo.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, inputs: torch.Tensor, labels: torch.Tensor | None, fields: Fields | None,
                   position_ids: torch.Tensor | None) -> tuple[torch.Tensor, Fields, torch.Tensor | None]:
        return inputs_on_device(self.topo.device, inputs, labels, fields, position_ids)

    def _micro_batches(self, inputs: torch.Tensor, fields: Fields, position_ids: torch.Tensor | None
                       ) -> list[tuple[torch.Tensor, Fields, torch.Tensor | None]]:
        n = self.n_microbatches
        if inputs.shape[0] % (n * self._objective.rows_per_example):
            raise ValueError(f"{inputs.shape[0]} rows cannot be split into {n} micro-batches of whole examples "
                             f"({self._objective.rows_per_example} rows each)")
        positions = position_ids.chunk(n) if position_ids is not None else [None] * n
        split = {name: value.chunk(n) for name, value in fields.items()}
        return [(x, {name: parts[i] for name, parts in split.items()}, pos)
                for i, (x, pos) in enumerate(zip(inputs.chunk(n), positions))]

    def _micro_loss(self, x: torch.Tensor, fields: Fields, position_ids: torch.Tensor | None) -> torch.Tensor:
        with self._precision_context():
            output = self._forward(x, position_ids)
        loss, stats = self._objective.loss(output, fields)
        if stats is not None:
            self._stat_sums.append(stats.detach().double())
        return loss

    def _stats_sum(self) -> torch.Tensor:
        if self._stat_sums:
            return torch.stack(self._stat_sums).sum(0)
        return torch.zeros(len(self._objective.stat_names), dtype=torch.float64, device=self.topo.device)

    def _all_reduce(self, values: list[torch.Tensor]) -> list[float]:
        fused = torch.cat([v.double().reshape(-1) for v in values])
        with scope(scopes.AGREE):
            dist.all_reduce(fused)
        return fused.tolist()

    def _stats(self, sums: list[float], units: int) -> dict[str, float]:
        return {name: value / max(units, 1) for name, value in zip(self._objective.stat_names, sums)}

    # ------------------------------------------------------------------------------------------
    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor | None = None,
                   loss_fn: TokenLossFn = cross_entropy_sum, *, step: int, position_ids: torch.Tensor | None = None,
                   stop_requested: bool = False, data_error: bool = False, objective: Objective | None = None,
                   fields: Fields | None = None) -> StepResult:
        """One optimizer step over this DP rank's rows (see ``engine.interface``). The stop and data-error
        flags and the global unit count are agreed in one all-reduce before the forward; the loss and the
        objective's statistics in one after the backward, before DeepSpeed steps."""
        if not self.trainable:
            raise RuntimeError("this engine is frozen (trainable=False); it has no optimizer step")
        self.module.train()
        inputs, fields, position_ids = self._to_device(inputs, labels, fields, position_ids)
        self._objective = objective if objective is not None else token_objective(loss_fn)
        units = self._objective.units(fields)
        flags = torch.tensor([float(stop_requested), float(data_error)], device=self.topo.device)
        n_units, stops, data_errors = self._all_reduce([units, flags])
        n_units = int(n_units)
        lr = self.optimizer.param_groups[0]["lr"]
        if data_errors > 0:
            nan = float("nan")
            return StepResult(loss=nan, grad_norm=nan, lr=lr, tokens=n_units, stop=stops > 0, data_error=True,
                              stats={name: nan for name in self._objective.stat_names})
        scale = self.topo.dp / max(n_units, 1)  # DeepSpeed averages over dp: the gradient of the global mean
        self._stat_sums = []
        losses = []
        with scope(scopes.FORWARD_BACKWARD):
            micro = self._micro_batches(inputs, fields, position_ids)
            for i, (x, part, pos) in enumerate(micro):
                loss_sum = self._micro_loss(x, part, pos)
                self.ds.backward(loss_sum * scale, scale_wrt_gas=False)
                losses.append(loss_sum.detach().double())
                if i < len(micro) - 1:
                    self.ds.step()  # not an accumulation boundary: DeepSpeed only counts the micro-step
        with scope(scopes.OPTIMIZER):
            loss_sum, *stat_sums = self._all_reduce([torch.stack(losses).sum().reshape(1), self._stats_sum()])
            loss = loss_sum / max(n_units, 1)
            if not math.isfinite(loss):
                raise NonFiniteLossError(f"loss is {loss} at step {step}; stopping before the optimizer step")
            self.ds.step()
            norm = float(self.ds.get_global_grad_norm())
            self.scheduler.step()
        return StepResult(loss=loss, grad_norm=norm, lr=lr, tokens=n_units, stop=stops > 0,
                          stats=self._stats(stat_sums, n_units))

    @torch.no_grad()
    def _forward_only(self, inputs: torch.Tensor, fields: Fields, position_ids: torch.Tensor | None) -> torch.Tensor:
        self.module.eval()
        self._stat_sums = []
        sums = [self._micro_loss(x, part, pos).double() for x, part, pos in
                self._micro_batches(inputs, fields, position_ids)]
        return torch.stack(sums).sum()

    def eval_step(self, inputs: torch.Tensor, fields: Fields, objective: Objective = PRETRAIN, *,
                  position_ids: torch.Tensor | None = None) -> tuple[float, dict[str, float]]:
        """Mean unit loss and the objective's statistics over the global batch whose DP slice is given."""
        inputs, fields, position_ids = self._to_device(inputs, None, fields, position_ids)
        self._objective = objective
        units = objective.units(fields)
        local = self._forward_only(inputs, fields, position_ids)
        n_units, loss_sum, *stat_sums = self._all_reduce([units, local, self._stats_sum()])
        return loss_sum / max(int(n_units), 1), self._stats(stat_sums, int(n_units))

    def eval_loss(self, inputs: torch.Tensor, labels: torch.Tensor, loss_fn: TokenLossFn = cross_entropy_sum, *,
                  position_ids: torch.Tensor | None = None) -> float:
        return self.eval_step(inputs, {"labels": labels}, token_objective(loss_fn), position_ids=position_ids)[0]

    def forward_rows(self, inputs: torch.Tensor, fields: Fields, row_fn: RowFn, *,
                     position_ids: torch.Tensor | None = None, width: int | None = None) -> torch.Tensor | None:
        """Forward only: ``row_fn``'s value(s) per row of this DP rank's rows (float64)."""
        inputs, fields, position_ids = self._to_device(inputs, None, fields, position_ids)
        rows = inputs.shape[0]
        out = torch.zeros((rows,) if width is None else (rows, width), dtype=torch.float64, device=self.topo.device)
        fields["row_index"] = torch.arange(rows, device=self.topo.device)
        self._objective = RowCollector(row_fn, out)
        self._forward_only(inputs, fields, position_ids)
        return out

    def _gathered(self) -> contextlib.AbstractContextManager:
        """Stage 3: every parameter whole on every rank for the duration (generation runs the bare module)."""
        if self.zero_stage == 3:
            return import_deepspeed().zero.GatheredParameters(list(self.module.parameters()))
        return contextlib.nullcontext()

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 prompt_index: torch.Tensor | None = None) -> Generation:
        """Continue this DP rank's prompts with a KV cache (``engine.generation``); under ZeRO-3 the weights
        are gathered whole for the duration."""
        self.module.eval()
        if prompt_index is None:
            prompt_index = torch.arange(len(prompts)) + self.topo.dp_rank * len(prompts)
        dtype = torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float32
        with self._gathered():
            return generate([self.module], self.specs, self.topo, prompts, prompt_index, params,
                            activation_dtype=dtype, sequence_parallel=False, autocast=self._precision_context())

    # --- state under canonical names (engine.interface) -----------------------------------------------
    def _row_shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full tensor as a DTensor sharded by rows over the data-parallel ranks (the
        split DTensor's ``Shard(0)`` makes: ceil-sized blocks, the last ones shorter or empty); 0-d stays plain."""
        if full.ndim == 0:
            return full
        ranks, rank = self.topo.dp, self.topo.dp_rank
        block = -(-full.shape[0] // ranks)
        local = full[min(rank * block, full.shape[0]):min((rank + 1) * block, full.shape[0])].clone()
        return DTensor.from_local(local, self.topo.dp_mesh, [Shard(0)], run_check=False, shape=full.shape,
                                  stride=full.stride())

    def _handed_out(self, param: torch.nn.Parameter, key: str | None) -> torch.Tensor:
        """One parameter's fp32 weight (``key`` None) or moment, gathered from ZeRO's partitions and handed out
        as this rank's row shard, remembered for ``state_loaded`` (collective)."""
        tensor = self._row_shard(zstate.full_value(self.zero, param, key))
        self._pending.append((param, key, tensor))
        return tensor

    def model_state(self) -> dict[str, torch.Tensor]:
        """fp32 weights by canonical name: the frozen model's own parameters (whole on every rank), or
        (trainable) row shards over the data-parallel ranks of the weights gathered from ZeRO's fp32 master
        partitions, one parameter at a time, which ``state_loaded`` writes back (collective)."""
        self._pending = []
        if self.ds is None:
            return self._frozen_named()
        return {name: self._handed_out(p, None) for name, p in self._named.items()}

    def _frozen_named(self) -> dict[str, torch.Tensor]:
        """A frozen model's weights by canonical name: its parameters themselves, or under ZeRO-3 full copies
        gathered one at a time that ``state_loaded`` writes back into the partitions (collective)."""
        if self._frozen_ds is None:
            return {canonical_name(n): p.detach() for n, p in self.module.named_parameters()}
        out = {}
        for raw_name, p in self.module.named_parameters():
            out[canonical_name(raw_name)] = zstate.gathered_value(p)
            self._pending.append((p, "partition", out[canonical_name(raw_name)]))
        return out

    def checkpoint_state(self, prefix: str = "") -> dict[str, Any]:
        """Weights and AdamW moments (``model.<name>``, ``optim.<name>.<exp_avg|exp_avg_sq|step>``) as row
        shards over the data-parallel ranks: ZeRO's flat partitions cut across parameters, so each parameter
        is gathered whole once, then only this rank's rows are kept (peak: the shards plus one full tensor)."""
        if self.ds is None:
            return {f"{prefix}model.{k}": v for k, v in self.model_state().items()}
        zstate.ensure_state(self.zero)
        state: dict[str, Any] = {f"{prefix}model.{k}": v for k, v in self.model_state().items()}
        steps = zstate.steps_taken(self.zero)
        for name, p in self._named.items():
            for moment in zstate.MOMENTS:
                state[f"{prefix}optim.{name}.{moment}"] = self._handed_out(p, moment)
            step = torch.tensor(steps, dtype=torch.float32)
            self._pending.append((None, "step", step))
            state[f"{prefix}optim.{name}.step"] = step
        return state

    def state_loaded(self) -> None:
        """Write what a load put into the handed-out tensors back into ZeRO's partitions (each gathered whole
        once, one at a time) and refresh the model's weights from them (collective)."""
        if self.ds is None:
            if self._frozen_ds is not None:  # a frozen ZeRO-3 model's gathered weights
                zstate.rewrite_frozen_partitions(self._frozen_ds.optimizer, [(p, t) for p, _, t in self._pending])
            self._pending = []
            return
        zstate.ensure_state(self.zero)
        for param, key, tensor in self._pending:
            if key == "step":
                zstate.set_steps_taken(self.zero, float(tensor))
            else:
                full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                zstate.put_value(self.zero, param, full, key)
        self._pending = []
        zstate.refresh_model_weights(self.zero)

    def schedule_state(self) -> dict[str, Any]:
        return scheduler_state(self.scheduler)

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        load_scheduler_state(self.scheduler, state)

    def set_schedule_step(self, step: int) -> None:
        put_schedule_at(self.scheduler, step)

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights by canonical name, on every rank (collective)."""
        if self.ds is None:
            state = {k: v.clone() for k, v in self._frozen_named().items()}
            self._pending = []
            return state
        return {name: zstate.full_value(self.zero, p, None) for name, p in self._named.items()}

    def close(self) -> None:
        """Drop the model and the optimizer state."""
        self._pending = []
        if self.ds is not None:
            self.ds.destroy()
            self.optimizer.state.clear()
        if self._frozen_ds is not None:
            self._frozen_ds.destroy()
        self.ds = self._frozen_ds = None
