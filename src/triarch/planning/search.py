"""Enumerate the native engine's layouts on N GPUs, predict memory and step time for each, and rank the ones
that fit by predicted tokens/s (``triarch plan``)."""

from __future__ import annotations

from dataclasses import dataclass

from triarch.config import ConfigError, TriarchConfig, validate_for_world
from triarch.planning.devices import GIB, Device, efficiency
from triarch.planning.memory import Layout, MemoryEstimate, estimate_memory
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

    def largest_term(self) -> tuple[str, int]:
        terms = self.memory.terms()
        static = terms["parameters"] + terms["gradients"] + terms["optimizer"]
        named = {"parameters + gradients + optimizer state": static, "activations": terms["activations"],
                 "logits": terms["logits"], "gathered parameters": terms["buffers"]}
        return max(named.items(), key=lambda kv: kv[1])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two(limit: int) -> list[int]:
    out, x = [], 1
    while x <= limit:
        out.append(x)
        x *= 2
    return out


def layouts(cfg: TriarchConfig, gpus: int, gpus_per_node: int, precisions: list[str]) -> list[Layout]:
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
                                out.append(Layout(tp, pp, v, replicate, dp // replicate, mbs, recompute, precision))
    return out


def evaluate(cfg: TriarchConfig, layout: Layout, device: Device, gpus_per_node: int) -> Candidate:
    """Predictions for one layout."""
    memory = estimate_memory(cfg, layout)
    step = predict_step_time(cfg, layout, device, efficiency(), gpus_per_node)
    tokens = cfg.train.global_batch_size * cfg.model.seq_len
    tokens_per_s = tokens / step.total
    mfu = tokens_per_s * flops_per_token(cfg.model) / (layout.world * device.peak(layout.precision))
    return Candidate(layout, memory, step, tokens_per_s, mfu, memory.total <= device.usable_bytes)


def plan(cfg: TriarchConfig, gpus: int, gpus_per_node: int, device: Device, top: int,
         precisions: list[str] | None = None) -> list[Candidate]:
    """The ``top`` fitting layouts by predicted tokens/s, each accepted by ``validate_for_world``; ConfigError
    with the reason when none fits (the term that is too large in the layout closest to fitting).
    ``precisions``: those to consider (default the config's ``train.precision``)."""
    if cfg.engine != "native":
        raise ConfigError(f"triarch plan models the native engine; engine {cfg.engine} is not planned yet")
    if cfg.parallel.fsdp_offload != "none":
        raise ConfigError(f"parallel.fsdp_offload '{cfg.parallel.fsdp_offload}' is not planned yet (the planner "
                          f"keeps parameters, gradients and optimizer state on the device): plan without it")
    precisions = precisions or [cfg.train.precision]
    if "fp8" in precisions and not device.fp8_flops:
        raise ConfigError(f"--precision fp8: {device.key} has no FP8 tensor cores")
    candidates = [evaluate(cfg, layout, device, gpus_per_node)
                  for layout in layouts(cfg, gpus, gpus_per_node, precisions)]
    if not candidates:
        raise ConfigError(f"no layout of {cfg.name} divides {gpus} GPUs ({gpus_per_node} per node): "
                          "tp must divide model.n_heads, ffn_hidden and vocab_size, pp model.n_layers, and the "
                          "data-parallel size train.global_batch_size")
    fitting = sorted((c for c in candidates if c.fits), key=lambda c: -c.tokens_per_s)
    chosen = []
    for c in fitting:
        try:
            validate_for_world(c.layout.apply(cfg), gpus)
        except ConfigError:
            continue
        chosen.append(c)
        if len(chosen) == top:
            break
    if chosen:
        return chosen
    closest = min(candidates, key=lambda c: c.memory.total)
    term, size = closest.largest_term()
    raise ConfigError(
        f"{cfg.name} does not fit on {gpus} {device.key} at any layout: the smallest predicted peak is "
        f"{closest.memory.total / GIB:.1f} GiB per GPU ({' '.join(closest.layout.overrides()[:4])}) against "
        f"{device.usable_bytes / GIB:.1f} GiB usable; its largest term is {term} ({size / GIB:.1f} GiB)")
