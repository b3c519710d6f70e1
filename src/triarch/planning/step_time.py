"""Predicted step time of a native-engine layout on a device (``planning.devices``).

Per micro-batch on the slowest (last) stage: GEMM and attention FLOPs over the peak at their kernel class's
efficiency, element-wise traffic over HBM bandwidth, tensor-parallel collectives of every layer (never
overlapped in this engine), and the pipeline transfers. The pipeline runs m micro-batches plus the
schedule's bubble, (p - 1) / v micro-batch times. FSDP's gathers and reductions overlap the compute up to
``efficiency.dp_overlap`` of it; across replicas (HSDP) gradients are all-reduced once per step; AdamW
reads and writes its state once per step (memory-bound).

With ``parallel.fsdp_offload: cpu`` every FSDP gather first copies this rank's float32 shard host to device
and every reduction copies the sharded float32 gradient back, over PCIe, counted with FSDP's traffic (the same
overlap); AdamW steps on the CPU, the node's DRAM bandwidth shared by its GPUs' ranks.

The deepspeed engine's data-parallel traffic and optimizer step are ``planning.zero``'s (the compute is the
same model's at tp 1, pp 1).

Which link a group uses follows the rank order pp x dp_replicate x dp_shard x tp (tp innermost): a group
whose ranks fit in one node uses NVLink, else the network.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from triarch.config import TriarchConfig
from triarch.planning.costs import OPTIMIZER_BYTES_PER_ELEMENT, ring_seconds
from triarch.planning.devices import Device, Efficiency
from triarch.planning.memory import ACTIVATION_BYTES, FP32, Layout, activation_bytes, model_key, stage_elements
from triarch.planning.zero import zero_data_parallel_seconds
from triarch.training.model_flops import matmul_parameter_count


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds per step, by term (``total`` adds them)."""

    compute: float
    tp_comm: float
    pp_comm: float
    bubble: float
    dp_exposed: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.pp_comm + self.bubble + self.dp_exposed + self.optimizer

    def terms(self) -> dict[str, float]:
        return {"compute": self.compute, "tp_comm": self.tp_comm, "pp_comm": self.pp_comm, "bubble": self.bubble,
                "dp_exposed": self.dp_exposed, "optimizer": self.optimizer}


def predict_step_time(cfg: TriarchConfig, layout: Layout, device: Device, eff: Efficiency,
                      gpus_per_node: int) -> StepTime:
    """The predicted step of ``layout`` (see the module docstring)."""
    m = cfg.model
    t, p, v = layout.tp, layout.pp, layout.virtual_stages
    dp = layout.dp_replicate * layout.dp_shard
    n_micro = cfg.train.global_batch_size // (layout.micro_batch_size * dp)
    tokens = layout.micro_batch_size * m.seq_len
    a = ACTIVATION_BYTES[layout.precision]
    link = eff.link

    def bandwidth(span: int) -> float:
        return (device.nvlink_bytes_s if span <= gpus_per_node else device.inter_node_bytes_s) * link

    # compute of the last stage (its layers and the head), per micro-batch, forward + backward (+ recompute)
    layers = m.n_layers // p
    block_params = (matmul_parameter_count(m) - m.vocab_size * m.dim) / m.n_layers
    recompute = 4 / 3 if layout.activation_checkpoint == "full" else 1.0
    gemm = (6 * block_params * layers * recompute + 6 * m.vocab_size * m.dim) * tokens / t
    attention = 12 * layers * m.dim * m.seq_len * tokens / t * recompute
    gemm_eff = eff.gemm_fp8 if layout.precision == "fp8" and device.fp8_flops else eff.gemm
    peak = device.peak(layout.precision)
    elementwise = 3 * layers * activation_bytes(cfg, replace(layout, activation_checkpoint="none"))
    per_micro = gemm / (peak * gemm_eff) + attention / (peak * eff.attention) + elementwise / (
        device.hbm_bytes_s * eff.memory)

    # tensor parallelism: per layer 2 gathers + 2 reductions forward and backward (SP), or 4 all-reduces
    message = tokens * m.dim * a
    per_collective = ring_seconds(message, t, bandwidth(t))
    collectives = 8 if layout.sequence_parallel else 16  # an all-reduce moves twice a gather's bytes
    if layout.activation_checkpoint == "full":
        collectives += collectives // 2
    tp_micro = layers * collectives * per_collective

    # pipeline: activations forward and gradients backward at each of the v chunk boundaries
    span_pp = t * dp + 1  # neighbouring stages sit t * dp ranks apart
    pp_micro = 0.0 if p == 1 else 2 * v * (message / (t if layout.sequence_parallel else 1)) / bandwidth(span_pp)

    micro_time = per_micro + tp_micro + pp_micro
    bubble = 0.0 if p == 1 else (p - 1) / v * micro_time

    # data parallelism: FSDP gathers (forward, and backward when resharded) and reduce-scatters
    elements = stage_elements(model_key(m), t, p, v, p - 1)
    compute_bytes = FP32 if layout.precision == "fp32" else 2
    compute_total = n_micro * per_micro
    if layout.zero_stage:
        dp_exposed, optimizer = zero_data_parallel_seconds(cfg, layout, device, eff, gpus_per_node, elements,
                                                           compute_total, bandwidth(dp))
        return StepTime(compute=compute_total, tp_comm=0.0, pp_comm=0.0, bubble=0.0, dp_exposed=dp_exposed,
                        optimizer=optimizer)
    f = layout.dp_shard
    gathers = n_micro * (2 if p == 1 else 1)
    reductions = n_micro if (p == 1 and f > 1) else 1
    fsdp = gathers * ring_seconds(elements * compute_bytes, f, bandwidth(t * f)) + reductions * ring_seconds(
        elements * FP32, f, bandwidth(t * f))
    offloaded = layout.fsdp_offload == "cpu"
    if offloaded:  # host -> device shard before each gather, device -> host gradient shard after each reduction
        fsdp += (gathers + reductions) * elements / f * FP32 / (device.pcie_bytes_s * link)
    replicas = 2 * ring_seconds(elements * FP32 / f, layout.dp_replicate, bandwidth(t * dp))
    dp_exposed = max(fsdp - eff.dp_overlap * compute_total, fsdp / (layers + 1)) + replicas
    optimizer_bytes = elements / f * OPTIMIZER_BYTES_PER_ELEMENT
    if offloaded:
        optimizer = optimizer_bytes * min(gpus_per_node, layout.world) / (device.host_bytes_s * eff.host_optimizer)
    else:
        optimizer = optimizer_bytes / (device.hbm_bytes_s * eff.memory)
    return StepTime(compute=compute_total, tp_comm=n_micro * tp_micro, pp_comm=n_micro * pp_micro, bubble=bubble,
                    dp_exposed=dp_exposed, optimizer=optimizer)
