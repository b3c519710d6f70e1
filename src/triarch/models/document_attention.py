"""Causal attention restricted to packed documents, without a dense (batch, heads, seq, seq) mask.

A packed row holds contiguous documents whose position ids restart at 0 where each starts, so a query sees
the keys at or before it in its own document: the row's attention is block-diagonal causal. A dense bool
mask of that shape rules out the fused SDPA kernels on CUDA (PyTorch falls back to the math kernel, which
materializes and keeps (batch, heads, seq, seq) scores) and costs seq² even on CPU. Instead:

- CUDA: FlexAttention with a ``BlockMask`` built at block granularity from each block's first and last
  document id (``document_blocks``): (seq / 128)² block flags are the largest thing built, never seq²
  elements (``create_block_mask`` would evaluate the mask per element unless compiled, and compiling it
  costs a second compile per shape for what is a few comparisons of per-block ids).
- elsewhere (CPU): ``is_causal`` SDPA on each document segment, concatenated (``segment_attention``);
  the CPU flash kernel keeps O(seq) for backward. One kernel call per document, so rows of many very
  short documents pay a Python loop; it runs outside ``torch.compile`` so the documents' lengths never
  cause recompiles.

``documents(position_ids)`` builds the form this device's kernel needs, once per forward;
``document_attention(q, k, v, docs)`` runs it, with grouped-query attention when k/v have fewer heads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

FLEX_BLOCK = 128  # FlexAttention's default sparse block size (tokens per query and key block)


@dataclass(frozen=True)
class DocumentSegments:
    """CPU form: ``lengths`` (batch, seq) int64 holds each document's length at its first token, 0 elsewhere
    (a tensor, not Python ints, so compiled callers guard on its shape only)."""

    lengths: Tensor


@dataclass(frozen=True)
class DocumentBlocks:
    """CUDA form: FlexAttention's block mask for "same document and causal"."""

    block_mask: BlockMask


Documents = DocumentSegments | DocumentBlocks


def _starts(position_ids: Tensor) -> Tensor:
    """(batch, seq) bool: a document starts here (position id 0, or the row's first token)."""
    starts = position_ids == 0
    starts[:, 0] = True
    return starts


def document_ids(position_ids: Tensor) -> Tensor:
    """(batch, seq) int64: 0 for the row's first document, +1 at each later document start."""
    return _starts(position_ids).cumsum(dim=1) - 1


def document_segments(position_ids: Tensor) -> DocumentSegments:
    """Each document's length, stored at its first token."""
    batch, seq = position_ids.shape
    first = _starts(position_ids).flatten().nonzero().flatten()  # rows start documents, so none spans two rows
    ends = torch.cat([first[1:], first.new_tensor([batch * seq])])
    lengths = torch.zeros(batch * seq, dtype=torch.int64, device=position_ids.device)
    lengths[first] = ends - first
    return DocumentSegments(lengths.view(batch, seq))


def document_blocks(position_ids: Tensor, block: int = FLEX_BLOCK) -> DocumentBlocks:
    """Block mask from per-block document ids. Ids never decrease along a row, so for query block i and
    key block j <= i: some pair is allowed iff j == i or j's last id equals i's first; every pair is
    allowed (a full block, mask_mod skipped) iff j < i and j's first id equals i's last. A last block cut
    short by ``seq`` is never full; the mask_mod reads ids padded with -1 past ``seq``."""
    batch, seq = position_ids.shape
    ids = document_ids(position_ids)
    n = -(-seq // block)
    padded = F.pad(ids, (0, n * block - seq), value=-1)
    first = ids[:, ::block]  # (batch, n)
    last = ids[:, torch.clamp(torch.arange(1, n + 1, device=ids.device) * block, max=seq) - 1]
    q, kv = torch.arange(n, device=ids.device)[:, None], torch.arange(n, device=ids.device)[None, :]
    below = (kv < q)[None]
    full = below & (first[:, None, :] == last[:, :, None])
    if seq % block:
        full[:, -1] = False
    some = (below & (last[:, None, :] == first[:, :, None])) | (kv == q)[None]
    partial = some & ~full

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (padded[b, q_idx] == padded[b, kv_idx]) & (q_idx >= kv_idx)

    mask = BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(seq, seq))
    return DocumentBlocks(mask)


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(batch, n, n) block flags -> (count (batch, 1, n), indices (batch, 1, n, n)) with flagged blocks first."""
    count = blocks.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count[:, None], indices[:, None]


def documents(position_ids: Tensor) -> Documents:
    """The form of the documents that this device's kernel takes: CUDA -> blocks, otherwise -> segments."""
    if position_ids.device.type == "cuda":
        return document_blocks(position_ids)
    return document_segments(position_ids)


def document_attention(q: Tensor, k: Tensor, v: Tensor, docs: Documents) -> Tensor:
    """Attention of (batch, heads, seq, head_dim) q/k/v within each document, causal."""
    gqa = q.shape[1] != k.shape[1]
    if isinstance(docs, DocumentBlocks):
        flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
        return flex(q, k, v, block_mask=docs.block_mask, enable_gqa=gqa)
    return segment_attention(q, k, v, docs.lengths)


@torch.compiler.disable
def segment_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
    """``is_causal`` SDPA per document segment (``DocumentSegments.lengths``); split and cat keep backward
    O(seq) (one cat / one split per row, not a full-size zero tensor per segment)."""
    gqa = q.shape[1] != k.shape[1]
    rows = []
    for row_q, row_k, row_v, row_lengths in zip(q.unbind(0), k.unbind(0), v.unbind(0), lengths.unbind(0)):
        sizes = row_lengths[row_lengths > 0].tolist()
        parts = zip(row_q.split(sizes, dim=1), row_k.split(sizes, dim=1), row_v.split(sizes, dim=1))
        rows.append(torch.cat([
            F.scaled_dot_product_attention(sq[None], sk[None], sv[None], is_causal=True, enable_gqa=gqa)
            for sq, sk, sv in parts
        ], dim=2))
    return torch.cat(rows, dim=0)


@functools.cache
def _compiled_flex_attention() -> Callable[..., Tensor]:
    """``flex_attention`` compiled once per process (uncompiled it materializes the full scores). Wrapped as
    the ``inductor_compiled_code`` op so selective activation checkpointing can keep its outputs."""
    return torch.compile(flex_attention, dynamic=False, options={"wrap_inductor_compiled_regions": True})
