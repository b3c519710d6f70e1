"""Full per-parameter fp32 weights and AdamW moments out of, and back into, a DeepSpeed ZeRO optimizer.

ZeRO keeps the fp32 master weights and the optimizer state as flat partitions (one per parameter group per
rank) that cut across parameters; triarch's checkpoints hold them per parameter under canonical names, so a
run moves between engines and data-parallel sizes. Each getter here assembles one parameter's full fp32
value from every rank's fragment (a collective over the ZeRO group: call it in the same order on every rank);
each setter writes this rank's fragment of a full value (local).

DeepSpeed's ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` cover most of this, but they
need optimizer state that exists (none before the first step: a resume loads into a fresh engine) and,
under stages 1 and 2, fragment views of the state that DeepSpeed links only when it loads its own
checkpoint. ``ensure_state`` and ``link_state`` provide both; the stage-3 setter writes its slice itself,
because DeepSpeed's reads past the end of a value whose size the ranks do not divide. The DeepSpeed
internals used (0.19): stage 1/2 ``single_partition_of_fp32_groups``, ``bit16_groups``, ``update_lp_params``
and each parameter's ``_hp_mapping``; stage 3 ``fp32_partitioned_groups_flat``,
``_get_fp32_opt_state_partition``, ``_get_param_partition_rank``, ``_reassign_or_swap_out_partitioned_parameters``
and ``persistent_parameters``. tests/test_deepspeed_engine.py fails when an upgrade moves one.
"""

from __future__ import annotations

from typing import Any

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


def _flat_partitions(zero: Any) -> list[torch.Tensor]:
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # stage 3
        return list(zero.fp32_partitioned_groups_flat)
    return list(zero.single_partition_of_fp32_groups)  # stages 1 and 2


def ensure_state(zero: Any) -> None:
    """Zeroed AdamW state (moments, step) for every flat fp32 partition that has none yet."""
    adam = zero.optimizer
    fused = bool(adam.defaults.get("fused"))
    for flat in _flat_partitions(zero):
        if adam.state.get(flat):
            continue
        # torch's AdamW counts steps in a tensor; DeepSpeed's CPU Adam in a Python int
        step: torch.Tensor | int = 0
        if isinstance(adam, torch.optim.AdamW):
            step = torch.zeros((), dtype=torch.float32, device=flat.device if fused else "cpu")
        adam.state[flat] = {"step": step, **{m: torch.zeros_like(flat) for m in MOMENTS}}
    link_state(zero)


def link_state(zero: Any) -> None:
    """Stages 1 and 2: point each parameter's fragment mapping at the moments of its flat partition."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        return
    flats = zero.single_partition_of_fp32_groups
    for group in zero.bit16_groups:
        for p in group:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                flat = flats[mapping.param_group_index]
                mapping.set_optim_state_fragment(flat, zero.optimizer.state[flat])


def steps_taken(zero: Any) -> float:
    """AdamW's step count (the same in every flat partition)."""
    state = zero.optimizer.state.get(_flat_partitions(zero)[0])
    return float(state["step"]) if state else 0.0


def set_steps_taken(zero: Any, steps: float) -> None:
    for flat in _flat_partitions(zero):
        state = zero.optimizer.state[flat]
        if torch.is_tensor(state["step"]):
            state["step"].fill_(steps)
        else:
            state["step"] = int(steps)


def full_value(zero: Any, param: torch.nn.Parameter, key: str | None) -> torch.Tensor:
    """The full fp32 master weight (``key`` None) or AdamW moment of ``param`` (collective)."""
    if hasattr(param, "ds_id"):  # stage 3
        return zero.get_full_hp_param(param, key).detach().clone()
    return param.get_full_hp_param(key).detach().clone()


@torch.no_grad()
def put_value(zero: Any, param: torch.nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """Write this rank's fragment of ``value`` (the full fp32 weight or moment of ``param``)."""
    flat = value.detach().reshape(-1).float()
    if hasattr(param, "ds_id"):  # stage 3: this rank's equal slice of the flattened, end-padded parameter
        part, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)  # noqa: SLF001
        start = part.numel() * zero._get_param_partition_rank(param)  # noqa: SLF001
        take = max(0, min(part.numel(), flat.numel() - start))
        part.view(-1)[:take].copy_(flat[start:start + take].to(part.device))
        return
    param.set_full_hp_param(flat.view(param.shape).to(param.device), key)


def refresh_model_weights(zero: Any) -> None:
    """Copy the fp32 master weights into the model's (possibly bf16) parameters on every rank (collective)."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        # release every gathered parameter first, the small ones stage 3 keeps whole on every rank included,
        # or they would keep their old values (DeepSpeed's own checkpoint load does the same)
        zero.checkpoint_event_prologue()
        for group in range(len(zero.fp32_partitioned_groups_flat)):
            zero._reassign_or_swap_out_partitioned_parameters(group)  # noqa: SLF001
        zero.checkpoint_event_epilogue()  # gathers the persistent ones again
    else:
        zero.update_lp_params()


def partition_range(param: torch.nn.Parameter) -> tuple[int, int]:
    """Stage 3: the elements ``[start, stop)`` of the flattened parameter this rank's partition holds (its
    ``ds_tensor`` may be longer: the last partition is padded)."""
    size = param.ds_tensor.numel()
    start = size * torch.distributed.get_rank(group=param.ds_process_group)
    return start, min(start + size, param.ds_numel)


@torch.no_grad()
def write_partition(param: torch.nn.Parameter, values: torch.Tensor) -> None:
    """Stage 3, a model without optimizer state: write this rank's slice of ``values`` (the parameter's
    flattened elements ``partition_range``, or its full value) into its partition (swapped in from NVMe and
    out again when parameters are offloaded there)."""
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    start, stop = partition_range(param)
    flat = values.detach().reshape(-1)
    if flat.numel() == param.ds_numel:
        flat = flat[start:stop]
    swapped = param.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE  # NVMe offload: on disk
    if swapped:
        param.nvme_swapper.swap_in([param], async_op=False)
    param.ds_tensor.view(-1)[:stop - start].copy_(flat.to(param.ds_tensor.dtype))
    if swapped:
        param.nvme_swapper.swap_out_and_release([param])


def gathered_value(param: torch.nn.Parameter) -> torch.Tensor:
    """Stage 3, a model without optimizer state: the parameter's full value as an fp32 copy (collective)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().float().clone()


def rewrite_frozen_partitions(offload: Any, values: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """Stage 3, a model without optimizer state (DeepSpeed's ``DeepSpeedZeRoOffload``): write each parameter's
    partition of its full value, with every gathered parameter released first and the persistent ones gathered
    again after (collective)."""
    offload.partition_all_parameters()
    for param, value in values:
        write_partition(param, value)
    if offload.persistent_parameters:
        offload.persistent_parameters[0].all_gather(offload.persistent_parameters)
