"""An RL rollout as training rows: prompt + completion, right-padded to ``seq_len``, with per-token fields.

Generation left-pads its batch (``engine.generation``); training reads right-padded rows whose real tokens
start at position 0, so a completion's tokens keep the positions they were generated at and the training
forward recomputes exactly the rollout's log-probs. Per-token tensors are in *label positions*
(``objectives.rl_math``): position ``t`` belongs to token ``t + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from triarch.engine.generation import Generation
from triarch.labels import IGNORE_INDEX


@dataclass(frozen=True)
class RolloutRows:
    """``input_ids`` (rows, seq_len); ``labels`` (rows, seq_len) the completion tokens at their label
    positions, ``IGNORE_INDEX`` elsewhere; ``logprobs`` the rollout's per-token log-probs (0 outside the
    completion); ``ended`` (rows,) bool: the completion stopped at EOS (not at the token limit)."""

    input_ids: Tensor
    labels: Tensor
    logprobs: Tensor
    ended: Tensor

    @property
    def mask(self) -> Tensor:
        return self.labels != IGNORE_INDEX

    @property
    def response_lengths(self) -> Tensor:
        return self.mask.sum(-1)


def rollout_rows(prompts: Sequence[Sequence[int]], generation: Generation, seq_len: int, pad_id: int,
                 eos_id: int | None) -> RolloutRows:
    """Rows of ``prompts`` continued by ``generation`` (``prompt + completion <= seq_len`` is the caller's
    rule: ``rl.rollout.max_new_tokens`` plus the longest prompt)."""
    rows = len(prompts)
    ids = torch.full((rows, seq_len), pad_id, dtype=torch.int64)
    labels = torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.int64)
    logprobs = torch.zeros(rows, seq_len, dtype=torch.float32)
    ended = torch.zeros(rows, dtype=torch.bool)
    tokens, lps, lengths = generation.tokens.cpu(), generation.logprobs.cpu(), generation.lengths.cpu()
    for r, prompt in enumerate(prompts):
        p, n = len(prompt), int(lengths[r])
        if p + n > seq_len:
            raise ValueError(f"prompt of {p} tokens + completion of {n} exceed seq_len {seq_len}")
        ids[r, :p] = torch.as_tensor(list(prompt), dtype=torch.int64)
        ids[r, p:p + n] = tokens[r, :n]
        labels[r, p - 1:p + n - 1] = tokens[r, :n]
        logprobs[r, p - 1:p + n - 1] = lps[r, :n]
        ended[r] = eos_id is not None and n > 0 and int(tokens[r, n - 1]) == eos_id
    return RolloutRows(ids, labels, logprobs, ended)
