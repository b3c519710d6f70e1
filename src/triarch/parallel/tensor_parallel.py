"""Tensor (and sequence) parallelism for the Llama model through DTensor plans.

Attention heads and the MLP hidden size are split column-wise then row-wise; the embedding is split by
vocabulary; the head produces vocabulary-sharded logits that stay sharded into the loss (loss parallel),
so no rank ever holds full logits. With sequence parallelism the norms and residual stream are sharded
along the sequence between the tensor-parallel regions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from triarch.models.llama import Llama
from triarch.parallel.kv_replication import replicate_kv_projections


def apply_tensor_parallel(model: Llama, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Shard ``model`` (any pipeline chunk of it) over ``tp_mesh`` in place."""
    between = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, object] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=between, output_layouts=Shard(-1), use_local_output=False)
    if model.score is not None:
        replicate_head(model.score, tp_mesh, between)
    if top:
        parallelize_module(model, tp_mesh, top)

    replicate_kv = model.args.n_kv_heads < tp_mesh.size()
    for block in model.layers.values():
        plan: dict[str, object] = {
            "attention": PrepareModuleInput(  # (x, AttentionInputs)
                input_layouts=(between, None), desired_input_layouts=(Replicate(), None),
                use_local_output=True,
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=between),
            "feed_forward": PrepareModuleInput(
                input_layouts=(between,), desired_input_layouts=(Replicate(),), use_local_output=True
            ),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=between),
        }
        if replicate_kv:
            replicate_kv_projections(block.attention, tp_mesh, model.args.n_kv_heads, model.args.head_dim)
        else:
            plan["attention.wk"] = ColwiseParallel()
            plan["attention.wv"] = ColwiseParallel()
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)
    _retie_embeddings(model)


def replicate_head(head: nn.Module, tp_mesh: DeviceMesh, input_layout: Placement) -> None:
    """A head with one output column (the reward/value score) cannot be split by columns: its weight is
    replicated over ``tp_mesh`` (a Replicate DTensor, as norm weights are under sequence parallelism), its
    input gathered to the full hidden states, and its output returned as a plain tensor."""

    def replicate_params(_name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for name, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [Replicate()])))

    def gather_input(_module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [input_layout], run_check=False)
        return (x.redistribute(mesh, [Replicate()]),)

    def local_output(_module: nn.Module, output: DTensor, _mesh: DeviceMesh) -> torch.Tensor:
        return output.to_local()

    distribute_module(head, tp_mesh, replicate_params, gather_input, local_output)


def _retie_embeddings(model: Llama) -> None:
    """Sharding replaces parameters, so re-share the head with the embedding when they were tied."""
    if model.args.tie_embeddings and model.tok_embeddings is not None and model.output is not None:
        model.output.weight = model.tok_embeddings.weight


def is_parallel_module(module: nn.Module) -> bool:
    """True when the module's parameters are DTensors."""
    return any(type(p).__name__ == "DTensor" for p in module.parameters())
