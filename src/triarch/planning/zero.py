"""Predicted memory and data-parallel time of one rank of a deepspeed-engine layout: ZeRO stage 1, 2 or 3 over
``parallel.dp_shard`` ranks, optionally with the optimizer state (and, at stage 3, the parameters) offloaded
to host memory, as DeepSpeed 0.19 lays them out (``engine/deepspeed.py`` builds it):

- Stages 1 and 2 flatten each parameter group (matrices, with weight decay; vectors, without) into one buffer
  in the model's dtype, padded to a multiple of 2 x dp elements. Every rank keeps the whole buffer (the
  module's parameters are views into it) and a float32 copy of its 1/dp partition, which AdamW steps (two
  float32 moments, one float32 step per group), with the partition's float32 gradient. Stage 1 accumulates
  whole float32 gradients between reductions; stage 2 reduces them through the bucket as they come. The
  bucket is ``reduce_bucket_size`` elements (capped at the model's size by the engine; two with
  ``overlap_comm``): float32 at stage 1, the model's dtype at stage 2, whose bf16 bucket is reduced through a
  float32 copy (the engine communicates in float32).
- Stage 3 partitions each parameter on its own (ceil(numel / dp) elements per rank) with a float32 master
  partition, moments and gradient partition of that size. Parameters below DeepSpeed's persistence threshold
  (1e5 elements: the norms) stay gathered on every rank; the others are gathered while their layer runs:
  two blocks at once and the embedding or head, as FSDP2. Gradients queue for their reduce-scatter in a
  bucket of up to ``reduce_bucket_size`` elements, with a float32 copy in bf16 as at stage 2 (measured: the
  copy is alive at the peak in some runs and not in others; the plan counts it).
- ``offload_optimizer: cpu`` puts the master partition, the moments and the float32 gradient partition in
  host memory; ``offload_params: cpu`` (stage 3) the parameter partitions.

Activations and logits are the native engine's at tp 1 (``memory.activation_bytes``): the same model runs.

Time (``zero_data_parallel_seconds``): stage 3 gathers every layer's parameters for forward and again for
backward and reduce-scatters float32 gradients every micro-batch (prefetched: overlapped like FSDP2's);
stage 2 reduce-scatters every micro-batch, stage 1 once per step; both all-gather the updated parameters once
per step, overlapped only with ``overlap_comm``. Offloaded optimizer state adds the float32 gradient
partition's copy to the host at each reduction and the updated parameters' back, and AdamW runs on the CPU;
offloaded parameters add a host-to-device copy of the partition before each gather.
"""

from __future__ import annotations

from dataclasses import replace

from triarch.config import TriarchConfig
from triarch.planning.costs import OPTIMIZER_BYTES_PER_ELEMENT, ring_seconds
from triarch.planning.devices import Device, Efficiency
from triarch.planning.memory import FP32, Layout, MemoryEstimate, activation_bytes, stage_tensor_shapes
from triarch.training.model_flops import parameter_count

PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's zero_optimization.stage3_param_persistence_threshold default
BLOCK_TENSORS = 9  # attention norm, wq, wk, wv, wo, ffn norm, w1, w3, w2


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _elements(cfg: TriarchConfig, head: str) -> list[tuple[int, bool]]:
    """(elements, is a matrix) of every parameter tensor, in the module's order."""
    return [(rows * cols, cols > 1 or rows == 1) for rows, cols in stage_tensor_shapes(cfg, 1, 1, 1, 0, head)]


def partition_elements(cfg: TriarchConfig, layout: Layout, head: str = "lm") -> int:
    """Elements of this rank's partition (of the float32 master weights, each moment, the float32 gradient)."""
    dp, tensors = layout.dp_shard, _elements(cfg, head)
    if layout.zero_stage == 3:
        return sum(_ceil(n, dp) for n, _ in tensors)
    groups = [sum(n for n, matrix in tensors if matrix), sum(n for n, matrix in tensors if not matrix)]
    return sum(_ceil(g, 2 * dp) * 2 for g in groups if g)


def flat_elements(cfg: TriarchConfig, layout: Layout, head: str = "lm") -> int:
    """Elements of the module's parameters on this rank: the padded flat groups (stages 1, 2), or this rank's
    slice of each parameter (stage 3)."""
    if layout.zero_stage == 3:
        return partition_elements(cfg, layout, head)
    return partition_elements(cfg, layout, head) * layout.dp_shard


def _gathered_elements(cfg: TriarchConfig, head: str) -> int:
    """Stage 3: parameters held whole at once: the persistent ones, plus two blocks' and the larger of the
    embedding and the head's other parameters."""
    tensors = _elements(cfg, head)
    persistent = sum(n for n, _ in tensors if n < PERSISTENCE_THRESHOLD)
    block = sum(n for n, _ in tensors[1:1 + BLOCK_TENSORS] if n >= PERSISTENCE_THRESHOLD)
    root = max((n for n, _ in (tensors[0], tensors[-1]) if n >= PERSISTENCE_THRESHOLD), default=0)
    return persistent + 2 * block + root


def estimate_zero_memory(cfg: TriarchConfig, layout: Layout, head: str = "lm") -> MemoryEstimate:
    """The predicted peak of one rank of a deepspeed layout (the module docstring)."""
    m, stage = cfg.model, layout.zero_stage
    compute = FP32 if layout.precision == "fp32" else 2
    part = partition_elements(cfg, layout, head)
    parameters = compute * flat_elements(cfg, layout, head)
    optimizer = 3 * FP32 * part + FP32 * 2  # master weights, two moments; a float32 step per parameter group
    gradients = FP32 * part
    if stage == 1:
        gradients += FP32 * sum(n for n, _ in _elements(cfg, head))  # whole gradients between reductions
    bucket = min(cfg.deepspeed.reduce_bucket_size, parameter_count(m) + parameter_count(m) % 2)
    # stage 1 accumulates in float32; stages 2 and 3 stage gradients in the model's dtype and reduce a float32
    # copy of a bf16 bucket (the engine communicates in float32)
    staged = FP32 if stage == 1 else compute + (FP32 if compute != FP32 else 0)
    buffers = staged * bucket * (2 if cfg.deepspeed.overlap_comm and stage < 3 else 1)
    if stage == 3:  # and the gathered parameters
        buffers += compute * _gathered_elements(cfg, head)
    tokens = layout.micro_batch_size * m.seq_len
    logits = 0 if head == "score" else 3 * FP32 * tokens * m.vocab_size
    single = replace(layout, tp=1, pp=1)  # one rank runs the whole model
    activations = m.n_layers * activation_bytes(cfg, single)
    if layout.activation_checkpoint == "full":  # one block's activations rebuilt during its backward
        activations += activation_bytes(cfg, replace(single, activation_checkpoint="none"))
    host_optimizer = layout.offload_optimizer == "cpu"
    host_params = layout.offload_params == "cpu"
    partition_gradients = FP32 * part
    return MemoryEstimate(
        parameters=0 if host_params else parameters,
        gradients=gradients - partition_gradients * host_optimizer,
        optimizer=0 if host_optimizer else optimizer,
        activations=activations, logits=logits, buffers=buffers,
        host_parameters=parameters if host_params else 0,
        host_gradients=partition_gradients if host_optimizer else 0,
        host_optimizer=optimizer if host_optimizer else 0)


def zero_data_parallel_seconds(cfg: TriarchConfig, layout: Layout, device: Device, eff: Efficiency,
                               gpus_per_node: int, elements: int, compute_total: float, link_bytes_s: float
                               ) -> tuple[float, float]:
    """(exposed data-parallel seconds, optimizer seconds) of one step; ``elements``: the model's parameters,
    ``link_bytes_s``: the data-parallel group's bandwidth."""
    dp, stage = layout.dp_shard, layout.zero_stage
    n_micro = cfg.train.global_batch_size // (layout.micro_batch_size * dp)
    compute = FP32 if layout.precision == "fp32" else 2
    pcie = device.pcie_bytes_s * eff.link
    gather = ring_seconds(elements * compute, dp, link_bytes_s)
    reduce = ring_seconds(elements * FP32, dp, link_bytes_s)
    reductions = n_micro if stage >= 2 else 1
    gathers = 2 * n_micro if stage == 3 else 1
    traffic = gathers * gather + reductions * reduce
    if layout.offload_optimizer == "cpu":
        traffic += (reductions * FP32 + compute) * elements / dp / pcie
    if layout.offload_params == "cpu":
        traffic += gathers * compute * elements / dp / pcie
    overlap = eff.dp_overlap if stage == 3 or cfg.deepspeed.overlap_comm else 0.0
    exposed = max(traffic - overlap * compute_total, traffic / (cfg.model.n_layers + 1))
    optimizer_bytes = elements / dp * OPTIMIZER_BYTES_PER_ELEMENT
    if layout.offload_optimizer == "cpu":
        ranks = min(gpus_per_node, layout.world)
        return exposed, optimizer_bytes * ranks / (device.host_bytes_s * eff.host_optimizer)
    return exposed, optimizer_bytes / (device.hbm_bytes_s * eff.memory)
