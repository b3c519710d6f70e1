"""Pipeline parallelism: split the model by layers into stage chunks and build a torch.distributed.pipelining schedule.

Stage ``s`` of ``pp * virtual_stages`` holds layers ``[s*k, (s+1)*k)``; the first stage also holds the
embedding, the last the final norm and head. Pipeline rank ``r`` holds stages ``r, r+pp, ...`` (the loop
placement interleaved schedules expect).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    _PipelineSchedule,
)

from triarch.models.llama import Llama, LlamaArgs


@dataclass(frozen=True)
class ChunkSpec:
    """Which part of the model one pipeline stage holds."""

    stage_index: int
    num_stages: int
    layer_ids: tuple[int, ...]

    @property
    def has_embedding(self) -> bool:
        return self.stage_index == 0

    @property
    def has_head(self) -> bool:
        return self.stage_index == self.num_stages - 1


def chunk_specs(n_layers: int, pp: int, virtual_stages: int, pp_rank: int) -> list[ChunkSpec]:
    """The stage chunks held by pipeline rank ``pp_rank`` (all layers when pp == 1)."""
    num_stages = pp * virtual_stages
    per_stage = n_layers // num_stages
    specs = []
    for v in range(virtual_stages):
        s = pp_rank + v * pp
        specs.append(ChunkSpec(s, num_stages, tuple(range(s * per_stage, (s + 1) * per_stage))))
    return specs


def build_chunk(args: LlamaArgs, spec: ChunkSpec) -> Llama:
    """A model holding only the pieces of ``spec`` (build under a meta device context)."""
    model = Llama(args)
    keep = {str(i) for i in spec.layer_ids}
    for key in list(model.layers.keys()):
        if key not in keep:
            del model.layers[key]
    if not spec.has_embedding:
        model.tok_embeddings = None
    if not spec.has_head:
        model.norm = None
        model.output = None
        model.score = None
    return model


_SCHEDULES = {
    "1f1b": Schedule1F1B,
    "gpipe": ScheduleGPipe,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
}


def build_schedule(
    name: str,
    chunks: list[Llama],
    specs: list[ChunkSpec],
    *,
    device: torch.device,
    pp_group: torch.distributed.ProcessGroup,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> _PipelineSchedule:
    """Wrap each chunk in a PipelineStage and build the named schedule (gradients are not rescaled)."""
    stages = [
        PipelineStage(chunk, spec.stage_index, spec.num_stages, device, group=pp_group)
        for chunk, spec in zip(chunks, specs)
    ]
    cls = _SCHEDULES[name]
    if cls in (Schedule1F1B, ScheduleGPipe):
        if len(stages) != 1:
            raise ValueError(f"schedule {name} takes one stage per rank, got {len(stages)}")
        return cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
