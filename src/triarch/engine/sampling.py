"""Token sampling that depends only on (seed, prompt index, token index), never on the layout.

Sampling is the Gumbel-max trick: the token is the argmax of the (filtered) log-probabilities plus Gumbel
noise, and the noise of vocabulary entry ``v`` for token ``t`` of prompt ``i`` is a hash of
(seed, i, t, v) computed with integer tensor ops. So a prompt gets the same tokens whichever data-parallel
rank generates it, in whatever batch, with any tensor or pipeline split: no generator state is shared or
advanced. Greedy decoding is ``temperature == 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK31 = (1 << 31) - 1


def _mix(x: Tensor) -> Tensor:
    """A 31-bit integer mixer (xorshift-multiply); every product stays below 2**62, so int64 never wraps."""
    x = x & _MASK31
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK31
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK31
    x = ((x ^ (x >> 13)) * 0x297A2D39) & _MASK31
    return x ^ (x >> 16)


def gumbel_noise(seed: int, prompt_index: Tensor, token_index: int, vocab: int) -> Tensor:
    """(batch, vocab) float32 Gumbel(0, 1) noise keyed by (seed, prompt, token, vocabulary entry)."""
    device = prompt_index.device
    key = _mix(torch.full_like(prompt_index, seed & _MASK31) + 0x9E3779B)
    key = _mix(key ^ _mix(prompt_index.long() + 0x3C6EF37))
    key = _mix(key ^ _mix(torch.full_like(prompt_index, token_index) + 0x1B873593))
    entries = _mix(torch.arange(vocab, device=device, dtype=torch.int64) + 0x5BD1E995)
    bits = _mix(key[:, None] ^ entries[None, :])
    uniform = (bits.double() + 0.5) / float(1 << 31)
    return (-torch.log(-torch.log(uniform))).float()


def filter_logprobs(logprobs: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set to -inf every entry outside the ``top_k`` most likely (0: no limit) and outside the smallest set
    whose probability reaches ``top_p`` (1.0: no limit); the most likely entry always stays."""
    out = logprobs
    if 0 < top_k < logprobs.shape[-1]:
        kth = torch.topk(logprobs, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(logprobs < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = torch.sort(out, dim=-1, descending=True)
        probs = sorted_lp.exp()
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely entries
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_tokens(logits: Tensor, *, temperature: float, top_k: int, top_p: float, seed: int,
                  prompt_index: Tensor, token_index: int) -> tuple[Tensor, Tensor]:
    """(batch, vocab) logits -> (tokens (batch,) int64, their log-probabilities (batch,) float32 under the
    temperature-scaled distribution, before top-k/top-p filtering: the policy's log-probability that a
    training forward recomputes)."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    logprobs = torch.log_softmax(scaled, dim=-1)
    if temperature <= 0:
        tokens = logprobs.argmax(dim=-1)
    else:
        noisy = filter_logprobs(logprobs, top_k, top_p) + gumbel_noise(seed, prompt_index, token_index,
                                                                       logits.shape[-1])
        tokens = noisy.argmax(dim=-1)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]
