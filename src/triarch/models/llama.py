"""A Llama-family decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

No parallelism lives here. Tensor parallelism may shard the projections (the attention reads the local
head count from the tensor shapes), and pipeline parallelism may drop layers, the embedding, or the head:
each missing piece is ``None`` and is skipped in ``forward``.

``forward`` optionally takes ``position_ids`` (batch, seq) for rows packed with several documents, whose
positions restart at 0 where each document starts: rotary embeddings then use those positions, and
attention is restricted to earlier tokens of the same document, so each document is computed exactly as
if it were alone in its row. No (seq, seq) mask is built: ``models.document_attention`` runs FlexAttention
with a block mask on CUDA and causal attention per document segment elsewhere. What the attention layers
need (rotary table or rows, the documents) is computed once per forward into one ``AttentionInputs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from triarch.models.document_attention import Documents, document_attention, documents
from triarch.models.kv_cache import DecodeInputs, LayerCache


@dataclass(frozen=True)
class LlamaArgs:
    """Shape of the model; mirrors :class:`triarch.config.ModelConfig`."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    head: str = "lm"  # "lm": vocabulary logits; "score": one scalar per position (reward or value model)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def rotary_table(head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """cos/sin table of shape (max_seq_len, head_dim // 2, 2), float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, seq, heads, head_dim) by ``rope`` (half-split pairs): the cos/sin table, read at
    positions 0..seq-1, or per-token rows (batch, seq, head_dim // 2, 2) from ``rotary_rows``."""
    rows = rope[None, :x.shape[1]] if rope.dim() == 3 else rope
    cos = rows[..., 0][:, :, None, :].to(x.dtype)
    sin = rows[..., 1][:, :, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rotary_rows(table: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The table rows of each token's position: (batch, seq, head_dim // 2, 2)."""
    return table[position_ids]


@dataclass(frozen=True)
class AttentionInputs:
    """What every attention layer reads, computed once per forward: ``rope`` (the cos/sin table, or per-token
    rows from ``rotary_rows``) and the packed ``documents`` (``None``: one causal sequence per row). An
    incremental (decoding) forward also carries the layer's ``cache`` and the ``mask`` of visible keys."""

    rope: torch.Tensor
    documents: Documents | None = None
    cache: LayerCache | None = None
    mask: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


class Attention(nn.Module):
    """Causal grouped-query attention: scaled_dot_product_attention, or within each packed document."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim)
        q, k = apply_rotary(q, inputs.rope), apply_rotary(k, inputs.rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if inputs.cache is not None:
            k, v = inputs.cache.write(k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask, enable_gqa=q.shape[1] != k.shape[1])
        elif inputs.documents is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        else:
            out = document_attention(q, k, v, inputs.documents)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm attention then pre-norm MLP, each with a residual."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), inputs)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Token embedding, a stack of blocks keyed by their global index, final norm, and a head: ``output``
    (hidden -> vocabulary logits) or, with ``args.head == "score"``, ``score`` (hidden -> 1, the scalar
    head of a reward or value model, named as in ``LlamaForSequenceClassification``).

    ``forward`` takes token ids (first pipeline stage) or hidden states (later stages), and optionally
    per-document ``position_ids`` (module docstring), and returns hidden states, or the head's output
    (logits, or values of shape (batch, seq, 1)) when the head is present. With ``decode`` (incremental
    decoding, ``models.kv_cache``) the tokens continue the cached ones: rotary positions and the mask come
    from ``decode``, each layer reads and extends its cache, blocks run uncompiled (their shapes change every
    token), and the head sees only the ``decode.keep`` positions.
    """

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps)
        if args.head not in ("lm", "score"):
            raise ValueError(f"head must be 'lm' or 'score', got {args.head!r}")
        self.output: nn.Linear | None = None
        self.score: nn.Linear | None = None
        if args.head == "lm":
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        else:
            self.score = nn.Linear(args.dim, 1, bias=False)
        if args.tie_embeddings and self.output is not None:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", rotary_table(args.head_dim, args.max_seq_len, args.rope_theta), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after materializing from the meta device)."""
        self.rope = rotary_table(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, self.rope.device)

    def forward(self, h: torch.Tensor, position_ids: torch.Tensor | None = None, *,
                decode: DecodeInputs | None = None) -> torch.Tensor:
        if decode is not None:
            return self._decode(h, decode)
        inputs = AttentionInputs(self.rope)
        if position_ids is not None:
            inputs = AttentionInputs(rotary_rows(self.rope, position_ids), documents(position_ids))
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(h)
        for layer in self.layers.values():
            h = layer(h, inputs)
        return self._head(h)

    def _decode(self, h: torch.Tensor, decode: DecodeInputs) -> torch.Tensor:
        rope = rotary_rows(self.rope, decode.position_ids)
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(h)
        for key, layer in self.layers.items():
            inputs = AttentionInputs(rope, cache=LayerCache(decode.cache, key), mask=decode.mask)
            h = getattr(layer, "_orig_mod", layer)(h, inputs)
        if decode.keep is not None and (self.norm is not None or self.output is not None or self.score is not None):
            h = h[:, decode.keep]
        return self._head(h)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)
        if self.score is not None:
            h = self.score(h)
        return h


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once), by full logical shape."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
