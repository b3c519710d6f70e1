"""Canonical parameters (the native model's names and shapes) as pieces of megatron-core GPTModel parameters.

megatron fuses what the canonical model keeps apart: ``linear_qkv`` holds, per query group, that group's
query heads, then its key head, then its value head; ``linear_fc1`` holds [gate (w1); up (w3)]. Under
tensor parallelism both are split by groups / by halves, so this rank's share of a canonical tensor is a
set of row ranges of its megatron tensors. A ``CanonicalParam`` lists those ranges; ``read`` copies them out
into this rank's canonical shard and ``write`` copies a shard back. The same mapping serves the optimizer's
moments (they have their parameter's shape).

Layer ``i`` of the canonical model is ``decoder.layers.<i - first layer of this stage>`` here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from triarch.models.llama import LlamaArgs


@dataclass(frozen=True)
class Rows:
    """Rows ``[source, source + count)`` of megatron tensor ``target`` are rows ``[at, at + count)`` of the
    canonical shard."""

    target: str
    source: int
    at: int
    count: int


@dataclass(frozen=True)
class CanonicalParam:
    """One canonical parameter on this rank: its full shape, how TP splits it (``shard_dim``: 0 or 1, None for
    replicated), and where its shard lives in megatron tensors."""

    name: str
    full_shape: tuple[int, ...]
    shard_dim: int | None
    local_shape: tuple[int, ...]
    rows: tuple[Rows, ...]

    def read(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's canonical shard, copied out of megatron ``tensors`` (by megatron name)."""
        first = tensors[self.rows[0].target]
        out = torch.empty(self.local_shape, dtype=first.dtype, device=first.device)
        with torch.no_grad():
            for r in self.rows:
                out[r.at:r.at + r.count].copy_(tensors[r.target][r.source:r.source + r.count])
        return out

    def write(self, shard: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        """Copy this rank's canonical ``shard`` into megatron ``tensors`` (in place)."""
        with torch.no_grad():
            for r in self.rows:
                tensors[r.target][r.source:r.source + r.count].copy_(shard[r.at:r.at + r.count])

    def local_box(self, tp: int, tp_rank: int) -> list[tuple[int, int]]:
        """This rank's shard as ``[(start, stop)]`` per dimension of the full tensor."""
        box = [(0, n) for n in self.full_shape]
        if self.shard_dim is not None:
            size = self.full_shape[self.shard_dim] // tp
            box[self.shard_dim] = (tp_rank * size, (tp_rank + 1) * size)
        return box


def _whole(name: str, target: str, full: tuple[int, ...], shard_dim: int | None, tp: int) -> CanonicalParam:
    local = list(full)
    if shard_dim is not None:
        local[shard_dim] //= tp
    return CanonicalParam(name, full, shard_dim, tuple(local), (Rows(target, 0, 0, local[0]),))


def canonical_params(args: LlamaArgs, tp: int, layers: range, *, first_stage: bool, last_stage: bool,
                     prefix: str = "") -> list[CanonicalParam]:
    """The canonical parameters of one model chunk: ``layers`` (global indices), the embedding on the first
    stage, final norm and head on the last, each split ``tp`` ways as megatron splits them. ``prefix`` goes
    before every megatron name (a rank with several chunks names them apart)."""
    d, hd, f = args.dim, args.head_dim, args.ffn_hidden
    groups, per_group = args.n_kv_heads // tp, args.n_heads // args.n_kv_heads
    stride = (per_group + 2) * hd
    out: list[CanonicalParam] = []
    if first_stage:
        out.append(_whole("tok_embeddings.weight", prefix + "embedding.word_embeddings.weight", (args.vocab_size, d),
                          0, tp))
    for local_index, i in enumerate(layers):
        c, m = f"layers.{i}.", f"{prefix}decoder.layers.{local_index}."
        qkv = m + "self_attention.linear_qkv.weight"
        q = tuple(Rows(qkv, g * stride, g * per_group * hd, per_group * hd) for g in range(groups))
        k = tuple(Rows(qkv, g * stride + per_group * hd, g * hd, hd) for g in range(groups))
        v = tuple(Rows(qkv, g * stride + (per_group + 1) * hd, g * hd, hd) for g in range(groups))
        fc1 = m + "mlp.linear_fc1.weight"
        out += [
            _whole(c + "attention_norm.weight", m + "input_layernorm.weight", (d,), None, tp),
            CanonicalParam(c + "attention.wq.weight", (args.n_heads * hd, d), 0, (groups * per_group * hd, d), q),
            CanonicalParam(c + "attention.wk.weight", (args.n_kv_heads * hd, d), 0, (groups * hd, d), k),
            CanonicalParam(c + "attention.wv.weight", (args.n_kv_heads * hd, d), 0, (groups * hd, d), v),
            _whole(c + "attention.wo.weight", m + "self_attention.linear_proj.weight", (d, args.n_heads * hd), 1, tp),
            _whole(c + "ffn_norm.weight", m + "pre_mlp_layernorm.weight", (d,), None, tp),
            CanonicalParam(c + "feed_forward.w1.weight", (f, d), 0, (f // tp, d), (Rows(fc1, 0, 0, f // tp),)),
            CanonicalParam(c + "feed_forward.w3.weight", (f, d), 0, (f // tp, d), (Rows(fc1, f // tp, 0, f // tp),)),
            _whole(c + "feed_forward.w2.weight", m + "mlp.linear_fc2.weight", (d, f), 1, tp),
        ]
    if last_stage:
        out.append(_whole("norm.weight", prefix + "decoder.final_layernorm.weight", (d,), None, tp))
        if args.head == "score":  # the scalar head, replicated over TP (megatron_model.ScoreHead)
            out.append(_whole("score.weight", prefix + "output_layer.weight", (1, d), None, tp))
        elif not args.tie_embeddings or not first_stage:
            out.append(_whole("output.weight", prefix + "output_layer.weight", (args.vocab_size, d), 0, tp))
    return out
