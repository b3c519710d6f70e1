"""Predicted memory of one rank of a native-engine layout, before anything is built.

Static state is exact: the native engine keeps float32 parameters (bf16/fp8 runs compute from them), splits
each weight by the tensor-parallel plan (``parallel.tensor_parallel``: embedding and output rows, wq / wk /
wv / w1 / w3 rows, wo / w2 columns; norms and the score head whole; wk / wv whole when there are fewer KV
heads than TP ranks), then FSDP2 shards dim 0 of the TP-local tensor over ``dp_shard`` ranks, padding it
to a multiple (every rank allocates ceil(rows / dp_shard) rows). Gradients match the sharded parameters
(float32); AdamW holds two float32 moments per element and one float32 ``step`` per tensor.

Activations are a model of what autograd saves per micro-batch (``activation_bytes``), times the
micro-batches the pipeline schedule keeps in flight, plus the last stage's logits and FSDP's gathered
parameter copies (``_buffers``).

With ``parallel.fsdp_offload: cpu`` the static state (the same exact bytes) lives in host memory: the device
holds the gathered copies, activations and logits (``MemoryEstimate.total``), the host the rest
(``MemoryEstimate.host``, per rank).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache

from triarch.config import ModelConfig, TriarchConfig

FP32 = 4
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp8": 2}  # fp8 runs keep bf16 activations between layers
GATHERED_BLOCKS = 2  # blocks FSDP keeps gathered at once without PP: the one computing, the one prefetched


@dataclass(frozen=True)
class Layout:
    """One candidate layout of the native engine (the config keys it becomes)."""

    tp: int
    pp: int
    virtual_stages: int
    dp_replicate: int
    dp_shard: int
    micro_batch_size: int
    activation_checkpoint: str
    precision: str
    sequence_parallel: bool = True
    fsdp_offload: str = "none"
    zero_stage: int = 0  # 1-3: engine deepspeed, with its offload of optimizer state and parameters
    offload_optimizer: str = "none"
    offload_params: str = "none"

    @classmethod
    def of(cls, cfg: TriarchConfig) -> "Layout":
        """The layout ``cfg`` selects."""
        p, t, ds = cfg.parallel, cfg.train, cfg.deepspeed
        zero = (ds.zero_stage, ds.offload_optimizer, ds.offload_params) if cfg.engine == "deepspeed" else (0, "none",
                                                                                                          "none")
        return cls(p.tp, p.pp, p.virtual_stages, p.dp_replicate, p.dp_shard, t.micro_batch_size,
                   t.activation_checkpoint, t.precision, p.sequence_parallel, p.fsdp_offload, *zero)

    @property
    def schedule(self) -> str:
        return "interleaved_1f1b" if self.virtual_stages > 1 else "1f1b"

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp_replicate * self.dp_shard

    def overrides(self) -> list[str]:
        """The command-line overrides that select this layout."""
        out = [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.dp_replicate={self.dp_replicate}",
               f"parallel.dp_shard={self.dp_shard}"]
        if self.zero_stage:
            out += [f"deepspeed.zero_stage={self.zero_stage}", f"deepspeed.offload_optimizer={self.offload_optimizer}",
                    f"deepspeed.offload_params={self.offload_params}"]
        else:
            out.append(f"parallel.fsdp_offload={self.fsdp_offload}")
        if self.pp > 1:
            out += [f"parallel.virtual_stages={self.virtual_stages}", f"parallel.schedule={self.schedule}"]
        return out + [f"train.micro_batch_size={self.micro_batch_size}",
                      f"train.activation_checkpoint={self.activation_checkpoint}",
                      f"train.precision={self.precision}"]

    def apply(self, cfg: TriarchConfig) -> TriarchConfig:
        """``cfg`` with this layout."""
        par = cfg.parallel.model_copy(update={
            "tp": self.tp, "pp": self.pp, "virtual_stages": self.virtual_stages, "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard, "schedule": self.schedule if self.pp > 1 else cfg.parallel.schedule,
            "sequence_parallel": self.sequence_parallel, "fsdp_offload": self.fsdp_offload})
        trn = cfg.train.model_copy(update={"micro_batch_size": self.micro_batch_size,
                                           "activation_checkpoint": self.activation_checkpoint,
                                           "precision": self.precision})
        update = {"parallel": par, "train": trn}
        if self.zero_stage:
            update["deepspeed"] = cfg.deepspeed.model_copy(update={
                "zero_stage": self.zero_stage, "offload_optimizer": self.offload_optimizer,
                "offload_params": self.offload_params})
        return cfg.model_copy(update=update)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def stage_chunks(n_layers: int, pp: int, virtual_stages: int, pp_rank: int) -> list[tuple[int, bool, bool]]:
    """(layers, holds the embedding, holds the head) of each chunk of pipeline rank ``pp_rank``: the split of
    ``parallel.pipeline.chunk_specs`` (stage s = pp_rank + v * pp holds layers s * per_stage ...), without
    importing torch."""
    stages = pp * virtual_stages
    per_stage = n_layers // stages
    return [(per_stage, s == 0, s == stages - 1) for s in (pp_rank + v * pp for v in range(virtual_stages))]


def stage_tensor_shapes(cfg: TriarchConfig, tp: int, pp: int, virtual_stages: int, pp_rank: int,
                        head: str = "lm") -> list[tuple[int, int]]:
    """(rows, columns) of every parameter tensor pipeline rank ``pp_rank`` holds after tensor parallelism
    (vectors as (n, 1)); FSDP then shards the rows."""
    return list(_shapes(model_key(cfg.model), tp, pp, virtual_stages, pp_rank, head))


def model_key(m: ModelConfig) -> tuple:
    return (m.n_layers, m.dim, m.n_heads, m.kv_heads, m.ffn_hidden, m.vocab_size, m.tie_embeddings)


@lru_cache(maxsize=4096)
def _shapes(key: tuple, tp: int, pp: int, virtual_stages: int, pp_rank: int, head: str) -> tuple[tuple[int, int], ...]:
    n_layers, dim, n_heads, kv_heads, ffn, vocab, tied = key
    hd = dim // n_heads
    kv_rows = kv_heads * hd if kv_heads < tp else kv_heads * hd // tp
    block = [(dim, 1), (n_heads * hd // tp, dim), (kv_rows, dim), (kv_rows, dim), (dim, n_heads * hd // tp), (dim, 1),
             (ffn // tp, dim), (ffn // tp, dim), (dim, ffn // tp)]
    shapes: list[tuple[int, int]] = []
    for layers, embedding, last in stage_chunks(n_layers, pp, virtual_stages, pp_rank):
        if embedding:
            shapes.append((vocab // tp, dim))
        shapes += block * layers
        if last:
            shapes.append((dim, 1))
            if head == "score":
                shapes.append((1, dim))
            elif not (tied and embedding):
                shapes.append((vocab // tp, dim))
    return tuple(shapes)


@lru_cache(maxsize=4096)
def _block_and_root(key: tuple, tp: int, head: str) -> tuple[int, int]:
    """TP-local elements of one block, and of the rest (embedding, final norm, head)."""
    shapes = _shapes(key, tp, 1, 1, 0, head)
    block = sum(r * c for r, c in shapes[1:10])
    return block, sum(r * c for r, c in shapes) - key[0] * block


@lru_cache(maxsize=4096)
def stage_elements(key: tuple, tp: int, pp: int, virtual_stages: int, pp_rank: int, head: str = "lm") -> int:
    """TP-local elements of pipeline rank ``pp_rank``'s parameters (before FSDP)."""
    return sum(r * c for r, c in _shapes(key, tp, pp, virtual_stages, pp_rank, head))


@lru_cache(maxsize=4096)
def _shape_counts(key: tuple, tp: int, pp: int, virtual_stages: int, pp_rank: int, head: str
                  ) -> tuple[tuple[tuple[int, int], int], ...]:
    return tuple(Counter(_shapes(key, tp, pp, virtual_stages, pp_rank, head)).items())


@dataclass(frozen=True)
class StaticBytes:
    """Bytes of one rank's parameters, gradients and optimizer state."""

    parameters: int
    gradients: int
    optimizer: int
    tensors: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def static_bytes(cfg: TriarchConfig, layout: Layout, pp_rank: int = 0, head: str = "lm") -> StaticBytes:
    """Exact bytes of the parameters, gradients and AdamW state on the first rank of pipeline stage
    ``pp_rank`` (each rank of a stage holds as much, up to FSDP's padding, which every rank allocates)."""
    counts = _shape_counts(model_key(cfg.model), layout.tp, layout.pp, layout.virtual_stages, pp_rank, head)
    elements = sum(n * _ceil(rows, layout.dp_shard) * cols for (rows, cols), n in counts)
    tensors = sum(n for _, n in counts)
    return StaticBytes(parameters=FP32 * elements, gradients=FP32 * elements,
                       optimizer=2 * FP32 * elements + FP32 * tensors, tensors=tensors)


def activation_bytes(cfg: TriarchConfig, layout: Layout) -> int:
    """Bytes autograd keeps per layer for one micro-batch (the model below; see docs/profiling.md)."""
    m, t = cfg.model, layout.tp
    a = ACTIVATION_BYTES[layout.precision]
    tokens = layout.micro_batch_size * m.seq_len
    sp = layout.sequence_parallel and t > 1
    local = tokens // t if sp else tokens  # tokens of the residual stream on this rank
    hd = m.dim // m.n_heads
    heads, kv = m.n_heads // t, (m.kv_heads if m.kv_heads < t else m.kv_heads // t)
    ffn = m.ffn_hidden // t
    if layout.activation_checkpoint == "full":
        return a * local * m.dim  # the block's input
    norms = 2 * 2 * FP32 * local * m.dim  # each RMSNorm keeps its float32 input and its normalized output
    gathered = 2 * a * tokens * m.dim  # the inputs of the QKV and the gate/up projections (gathered under SP)
    attention = a * tokens * hd * (3 * heads + 2 * kv) + FP32 * layout.micro_batch_size * heads * m.seq_len
    mlp = 4 * a * tokens * ffn  # gate, up, silu(gate), product
    if layout.activation_checkpoint == "selective":  # element-wise results are recomputed, not kept
        norms, mlp = norms // 2, 2 * a * tokens * ffn
    return norms + gathered + attention + mlp


def in_flight_micro_batches(layout: Layout, n_micro: int, pp_rank: int = 0) -> float:
    """Micro-batches whose activations stage ``pp_rank`` holds at once (in units of its whole stage):
    1F1B keeps pp - pp_rank; interleaved adds (pp - 1) / virtual_stages; without PP, one."""
    if layout.pp == 1:
        return 1.0
    held = layout.pp - pp_rank
    if layout.virtual_stages > 1:
        held += (layout.pp - 1) / layout.virtual_stages
    return float(min(held, n_micro))


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes of one rank, by term: on the device, and (``host_*``) offloaded to host memory."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    buffers: int
    host_parameters: int = 0
    host_gradients: int = 0
    host_optimizer: int = 0

    @property
    def static(self) -> int:
        """Device bytes of parameters, gradients and optimizer state."""
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        """Device bytes."""
        return self.static + self.activations + self.logits + self.buffers

    @property
    def host(self) -> int:
        """Host bytes of this rank (its offloaded state)."""
        return self.host_parameters + self.host_gradients + self.host_optimizer

    @property
    def offloaded(self) -> bool:
        return self.host > 0

    def terms(self) -> dict[str, int]:
        return {"parameters": self.parameters, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "logits": self.logits, "buffers": self.buffers,
                "host_parameters": self.host_parameters, "host_gradients": self.host_gradients,
                "host_optimizer": self.host_optimizer}


def _buffers(cfg: TriarchConfig, layout: Layout, head: str) -> int:
    """Gathered parameter copies FSDP2 holds (none when the engine does not wrap: fp32 at dp = 1 without
    offload): the chunk
    root (embedding, norm, head) stays gathered from forward to backward; each block is gathered for its
    forward and again for its backward (two alive at once, the one computing and the one prefetched), except
    under PP, where blocks stay gathered between a micro-batch's forward and backward (the whole stage)."""
    dp = layout.dp_replicate * layout.dp_shard
    if dp == 1 and layout.precision == "fp32" and layout.fsdp_offload == "none":
        return 0
    compute = FP32 if layout.precision == "fp32" else 2
    block, root = _block_and_root(model_key(cfg.model), layout.tp, head)
    if layout.pp > 1:
        return compute * (root + block * cfg.model.n_layers // layout.pp)
    return compute * (root + GATHERED_BLOCKS * block)


def estimate_native_memory(cfg: TriarchConfig, layout: Layout, head: str = "lm", pp_rank: int | None = None
                           ) -> MemoryEstimate:
    """The predicted peak of a native-engine layout's pipeline stage ``pp_rank``'s first rank; by default of
    the most loaded stage (the first stage holds the most micro-batches, the last one the logits). Any engine's
    layout: ``planning.estimate.estimate_memory``."""
    m = cfg.model
    n_micro = cfg.train.global_batch_size // (layout.micro_batch_size * layout.dp_replicate * layout.dp_shard)
    layers = m.n_layers // layout.pp
    tokens = layout.micro_batch_size * m.seq_len
    logits = 0 if head == "score" else 3 * FP32 * tokens * m.vocab_size // layout.tp  # logits, softmax, grad
    plain = replace(layout, activation_checkpoint="none")
    buffers = _buffers(cfg, layout, head)
    best = None
    for rank in ([pp_rank] if pp_rank is not None else sorted({0, layout.pp - 1})):
        static = static_bytes(cfg, layout, rank, head)
        acts = int(in_flight_micro_batches(layout, n_micro, rank) * layers * activation_bytes(cfg, layout))
        if layout.activation_checkpoint == "full":
            acts += activation_bytes(cfg, plain)  # one block's activations rebuilt during its backward
        last = rank == layout.pp - 1
        on_device = layout.fsdp_offload == "none"
        est = MemoryEstimate(*(term * on_device for term in (static.parameters, static.gradients, static.optimizer)),
                             acts, logits if last else 0, buffers,
                             *(term * (not on_device) for term in (static.parameters, static.gradients,
                                                                   static.optimizer)))
        if best is None or (est.total, est.host) > (best.total, best.host):
            best = est
    assert best is not None
    return best
