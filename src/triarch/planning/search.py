"""Enumerate the layouts of the native or deepspeed engine on N GPUs, predict memory and step time for each,
and rank the ones that fit by predicted tokens/s (``triarch plan``)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from triarch.config import ConfigError, TriarchConfig, validate_for_world
from triarch.planning.devices import GIB, Device, efficiency
from triarch.planning.estimate import estimate_memory
from triarch.planning.memory import Layout, MemoryEstimate, static_bytes
from triarch.planning.step_time import StepTime, predict_step_time
from triarch.training.model_flops import flops_per_token

MICRO_BATCH_SIZES = (1, 2, 4, 8, 16)
RECOMPUTE = ("none", "selective", "full")
MAX_VIRTUAL_STAGES = 8


@dataclass(frozen=True)
class Candidate:
    """A layout with its predictions."""

    layout: Layout
    memory: MemoryEstimate
    step: StepTime
    tokens_per_s: float
    mfu: float
    fits: bool
    host_per_node: int = 0  # offloaded state of the most loaded node's ranks

    def largest_term(self) -> tuple[str, int]:
        """The largest term of the device memory."""
        mem = self.memory
        named = {"activations": mem.activations, "logits": mem.logits, "gathered parameters": mem.buffers,
                 "parameters + gradients + optimizer state": mem.static}
        return max(named.items(), key=lambda kv: kv[1])


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def _powers_of_two(limit: int) -> list[int]:
    out, x = [], 1
    while x <= limit:
        out.append(x)
        x *= 2
    return out


def layouts(cfg: TriarchConfig, gpus: int, gpus_per_node: int, precisions: list[str],
            offloads: tuple[str, ...] = ("none",)) -> list[Layout]:
    """Every layout the config's shapes allow on ``gpus`` ranks, with TP inside a node (cheap checks only;
    ``validate_for_world`` confirms the ones proposed)."""
    m, gbs = cfg.model, cfg.train.global_batch_size
    out = []
    for tp in _powers_of_two(min(gpus_per_node, gpus)):
        if m.n_heads % tp or m.ffn_hidden % tp or m.vocab_size % tp or (m.kv_heads % tp and tp % m.kv_heads):
            continue
        if tp > 1 and m.seq_len % tp:
            continue
        for pp in _divisors(m.n_layers):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            vs = [v for v in _divisors(m.n_layers // pp) if v <= MAX_VIRTUAL_STAGES] if pp > 1 else [1]
            for replicate in _divisors(dp):
                for mbs in MICRO_BATCH_SIZES:
                    if gbs % (mbs * dp):
                        continue
                    n_micro = gbs // (mbs * dp)
                    if pp > 1 and n_micro < pp:
                        continue
                    for v in vs:
                        if v > 1 and n_micro % pp:
                            continue
                        for recompute in RECOMPUTE:
                            for precision in precisions:
                                for offload in offloads:
                                    out.append(Layout(tp, pp, v, replicate, dp // replicate, mbs, recompute,
                                                      precision, fsdp_offload=offload))
    return out


ZERO_CHOICES = ((1, "none", "none"), (1, "cpu", "none"), (2, "none", "none"), (2, "cpu", "none"),
                (3, "none", "none"), (3, "cpu", "none"), (3, "cpu", "cpu"))  # stage, offload optimizer, params


def zero_layouts(cfg: TriarchConfig, gpus: int, precisions: list[str]) -> list[Layout]:
    """Every deepspeed layout on ``gpus`` ranks: ZeRO over all of them, each stage with and without CPU
    offload (NVMe offload is not modelled)."""
    out = []
    for mbs in MICRO_BATCH_SIZES:
        if cfg.train.global_batch_size % (mbs * gpus):
            continue
        for recompute in RECOMPUTE:
            for precision in precisions:
                for stage, optimizer, params in ZERO_CHOICES:
                    if stage == 3 and recompute == "selective":  # the engine refuses it
                        continue
                    out.append(Layout(1, 1, 1, 1, gpus, mbs, recompute, precision, sequence_parallel=False,
                                      zero_stage=stage, offload_optimizer=optimizer, offload_params=params))
    return out


def evaluate(cfg: TriarchConfig, layout: Layout, device: Device, gpus_per_node: int) -> Candidate:
    """Predictions for one layout."""
    memory = estimate_memory(cfg, layout)
    step = predict_step_time(cfg, layout, device, efficiency(), gpus_per_node)
    tokens = cfg.train.global_batch_size * cfg.model.seq_len
    tokens_per_s = tokens / step.total
    mfu = tokens_per_s * flops_per_token(cfg.model) / (layout.world * device.peak(layout.precision))
    if not memory.offloaded:
        host = 0
    elif layout.zero_stage:  # every rank holds the same partitions
        host = memory.host * min(gpus_per_node, layout.world)
    else:
        host = host_bytes_per_node(cfg, layout, gpus_per_node)
    fits = memory.total <= device.usable_bytes and host <= device.host_usable_bytes
    return Candidate(layout, memory, step, tokens_per_s, mfu, fits, host)


def host_bytes_per_node(cfg: TriarchConfig, layout: Layout, gpus_per_node: int) -> int:
    """The most host memory one node's ranks hold with their state offloaded (rank order pp x dp x tp: a node
    may hold ranks of several pipeline stages, whose state differs)."""
    per_stage = layout.world // layout.pp
    ranks = min(gpus_per_node, layout.world)
    worst = 0
    for first in range(0, layout.world, ranks):
        stages = Counter(rank // per_stage for rank in range(first, first + ranks))
        worst = max(worst, sum(n * static_bytes(cfg, layout, stage).total for stage, n in stages.items()))
    return worst


def plan(cfg: TriarchConfig, gpus: int, gpus_per_node: int, device: Device, top: int,
         precisions: list[str] | None = None, offloads: list[str] | None = None) -> list[Candidate]:
    """The ``top`` fitting layouts by predicted tokens/s, each accepted by ``validate_for_world``; ConfigError
    with the reason when none fits (the term that is too large in the layout closest to fitting).
    ``precisions`` / ``offloads``: the ``train.precision`` / ``parallel.fsdp_offload`` values to consider
    (default the config's)."""
    if cfg.engine == "megatron":
        raise ConfigError("triarch plan models the native and deepspeed engines; engine megatron is not planned yet")
    precisions = precisions or [cfg.train.precision]
    offloads = offloads or [cfg.parallel.fsdp_offload]
    if "fp8" in precisions and not device.fp8_flops:
        raise ConfigError(f"--precision fp8: {device.key} has no FP8 tensor cores")
    if cfg.engine == "deepspeed":
        if "fp8" in precisions:
            raise ConfigError("precision fp8 runs on engine native or megatron, not deepspeed: plan fp32 or bf16")
        if offloads != ["none"]:
            given = "--fsdp-offload" if offloads != [cfg.parallel.fsdp_offload] else \
                f"parallel.fsdp_offload '{cfg.parallel.fsdp_offload}'"
            raise ConfigError(f"{given} is the native engine's; the deepspeed plan weighs ZeRO's own offload "
                              "(deepspeed.offload_optimizer / offload_params) by itself")
        grid = zero_layouts(cfg, gpus, precisions)
    else:
        grid = layouts(cfg, gpus, gpus_per_node, precisions, tuple(dict.fromkeys(offloads)))
    candidates = [evaluate(cfg, layout, device, gpus_per_node) for layout in grid]
    if not candidates:
        raise ConfigError(f"no layout of {cfg.name} divides {gpus} GPUs ({gpus_per_node} per node): "
                          "tp must divide model.n_heads, ffn_hidden and vocab_size, pp model.n_layers, and the "
                          "data-parallel size train.global_batch_size")
    fitting = sorted((c for c in candidates if c.fits), key=lambda c: -c.tokens_per_s)
    chosen, refused = [], None
    for c in fitting:
        try:
            validate_for_world(c.layout.apply(cfg), gpus)
        except ConfigError as err:
            refused = refused or err
            continue
        chosen.append(c)
        if len(chosen) == top:
            break
    if chosen:
        return chosen
    if refused is not None:  # layouts fit, but a launch would refuse each (the first reason)
        raise refused
    raise ConfigError(_why_nothing_fits(cfg, candidates, gpus, gpus_per_node, device, precisions, offloads))


def _why_nothing_fits(cfg: TriarchConfig, candidates: list[Candidate], gpus: int, gpus_per_node: int,
                      device: Device, precisions: list[str], offloads: list[str]) -> str:
    """One line: the layout closest to fitting, its largest term, and whether offload would fit."""
    on_device = [c for c in candidates if c.memory.total <= device.usable_bytes]
    if on_device:  # the device fits, the host does not (offloaded state)
        closest = min(on_device, key=lambda c: c.host_per_node)
        return (f"{cfg.name} does not fit on {gpus} {device.key} with parallel.fsdp_offload=cpu: the smallest "
                f"offloaded state is {closest.host_per_node / GIB:.0f} GiB per node of "
                f"{min(gpus_per_node, gpus)} ranks against {device.host_usable_bytes / GIB:.0f} GiB usable host "
                f"memory ({' '.join(closest.layout.overrides()[:4])}): use more nodes")
    closest = min(candidates, key=lambda c: c.memory.total)
    term, size = closest.largest_term()
    line = (f"{cfg.name} does not fit on {gpus} {device.key} at any layout: the smallest predicted peak is "
            f"{closest.memory.total / GIB:.1f} GiB per GPU ({' '.join(closest.layout.overrides()[:4])}) against "
            f"{device.usable_bytes / GIB:.1f} GiB usable; its largest term is {term} ({size / GIB:.1f} GiB)")
    if "cpu" not in offloads and cfg.engine == "native":
        try:
            offloaded = plan(cfg, gpus, gpus_per_node, device, 1, precisions, ["cpu"])
        except ConfigError:
            return line
        line += f"; it fits with parameters, gradients and optimizer state in host memory: add --fsdp-offload cpu " \
                f"(predicted {offloaded[0].tokens_per_s:,.0f} tokens/s)"
    return line
