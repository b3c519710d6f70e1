"""Pipeline-parallel decoding with several micro-batches in flight, so every stage keeps working.

Decoding one batch through ``pp`` stages leaves all but one stage idle at any moment: each new token must
cross every stage before the next can start. With one chunk per rank and at least two prompts, the batch is
split into ``m = min(pp, rows)`` micro-batches, each with its own KV cache, and they circulate as a
wavefront: while the last stage samples micro-batch ``j``'s token, the earlier stages already compute
``j + 1, j + 2, ...``; with ``m = pp`` every stage is busy at every step once the pipeline is full.

Messages travel around the ring of stages, each pair's consumed in the order sent:

- stage ``r`` -> ``r + 1``: a header ``(micro-batch, step, go)`` and, when ``go``, the hidden states;
- the last stage -> stage 0: a header ``(micro-batch, next step, go)`` and, when ``go``, the sampled tokens,
  sent asynchronously and never waited for before the end: the ring's only edge back never blocks, so
  every blocking send down the chain is eventually received (no cycle of waits).

A micro-batch ends when each of its rows stopped at EOS or reached ``max_new_tokens``: the last stage sends
``go = 0``, stage 0 passes the end down the pipeline, and a stage leaves its loop once every micro-batch
has ended. Then the last stage's tokens are broadcast to the other stages. Tokens equal the step-by-step
decoding's (the same keyed sampling per prompt and token; each prompt's computation does not depend on
its batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from triarch.engine.sampling import sample_tokens
from triarch.models.kv_cache import DecodeInputs, KVCache, decode_mask
from triarch.models.llama import Llama
from triarch.parallel.topology import Topology


@dataclass
class _Micro:
    """One micro-batch: its left-padded prompts, cache and (on the last stage) its results so far."""

    ids: Tensor
    valid: Tensor
    prompt_lengths: Tensor
    prompt_index: Tensor
    cache: KVCache
    tokens: Tensor
    logprobs: Tensor
    lengths: Tensor
    running: Tensor

    @property
    def start(self) -> int:
        return self.ids.shape[1]


class PipelinedDecoder:
    """Runs the wavefront on this rank's single pipeline chunk (``engine.generation`` builds it)."""

    def __init__(self, chunk: Llama, topo: Topology, params, *, width: int, dtype: torch.dtype,
                 sequence_parallel: bool, pad_positions) -> None:
        self.chunk, self.topo, self.params = chunk, topo, params
        self.width, self.dtype, self.sp = width, dtype, sequence_parallel
        self.positions = pad_positions  # (prompt_lengths, t, offsets, max_seq_len) -> positions
        self.group = topo.mesh["pp"].get_group()
        self.rank, self.pp = topo.pp_rank, topo.pp
        self.offsets = torch.arange(width, device=topo.device)
        self._pending: list[tuple[dist.Work, Tensor]] = []  # back-edge sends and the buffers they read

    def _peer(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.group, pp_rank % self.pp)

    def _header(self, j: int, k: int, go: bool) -> Tensor:
        return torch.tensor([j, k, int(go)], dtype=torch.int64, device=self.topo.device)

    def _recv_header(self, src: int) -> tuple[int, int, bool]:
        header = torch.empty(3, dtype=torch.int64, device=self.topo.device)
        dist.recv(header, src=self._peer(src), group=self.group)
        j, k, go = header.tolist()
        return j, k, bool(go)

    def _forward(self, mb: _Micro, k: int, h: Tensor) -> Tensor:
        """Step ``k`` of micro-batch ``mb`` through this chunk (step 0: the prompt; step k: token k - 1)."""
        if k == 0:
            seq = mb.start
            positions = (mb.valid[:, :seq].long().cumsum(1) - 1).clamp(min=0)
            keep = slice(seq - 1, seq)
        else:
            mb.valid[:, mb.start + k - 1] = True
            seq = self.width
            positions = self.positions(mb.prompt_lengths, k - 1, self.offsets, self.chunk.args.max_seq_len)
            keep = slice(0, 1)
        decode = DecodeInputs(positions, decode_mask(mb.valid, mb.cache.length, seq), mb.cache,
                              keep=None if self.sp else keep)
        out = self.chunk(h, decode=decode)
        mb.cache.advance(seq if k == 0 else 1)
        return out

    def _sample(self, mb: _Micro, k: int, out: Tensor) -> tuple[Tensor, bool]:
        """Token ``k`` of every row of ``mb`` (last stage), and whether ``mb`` continues."""
        logits = (out.full_tensor() if isinstance(out, DTensor) else out).float()
        last = logits[:, -1] if (not self.sp or k == 0) else logits[:, 0]
        p = self.params
        new, lp = sample_tokens(last, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed,
                                prompt_index=mb.prompt_index, token_index=k)
        mb.tokens[:, k] = torch.where(mb.running, new, p.pad_id)
        mb.logprobs[:, k] = torch.where(mb.running, lp.float(), 0.0)
        mb.lengths += mb.running.long()
        if p.eos_id is not None:
            mb.running &= new != p.eos_id
        return new, k < p.max_new_tokens - 1 and bool(mb.running.any())

    def _send_back(self, j: int, k: int, go: bool, tokens: Tensor) -> None:
        messages = [self._header(j, k, go)] + ([tokens.contiguous()] if go else [])
        for message in messages:
            self._pending.append((dist.isend(message, dst=self._peer(0), group=self.group), message))

    def run(self, micros: list[_Micro]) -> None:
        """The loop of this stage; the last stage's micro-batches hold the results afterwards."""
        first, last = self.rank == 0, self.rank == self.pp - 1
        ended = 0
        if first:
            for j, mb in enumerate(micros):
                self._send_forward(j, 0, True, self._forward(mb, 0, mb.ids))
        while ended < len(micros):
            j, k, go = self._recv_header(self.rank - 1 if not first else self.pp - 1)
            mb = micros[j]
            if not go:
                ended += 1
                if not last:
                    self._send_forward(j, k, False, None)
                continue
            if first:
                tokens = torch.empty(mb.ids.shape[0], dtype=torch.int64, device=self.topo.device)
                dist.recv(tokens, src=self._peer(self.pp - 1), group=self.group)
                step_ids = tokens[:, None].expand(-1, self.width).contiguous()
                self._send_forward(j, k, True, self._forward(mb, k, step_ids))
                continue
            seq = mb.start if k == 0 else self.width
            divisor = self.topo.tp if self.sp else 1
            h = torch.empty(mb.ids.shape[0], seq // divisor, self.chunk.args.dim, dtype=self.dtype,
                            device=self.topo.device)
            dist.recv(h, src=self._peer(self.rank - 1), group=self.group)
            out = self._forward(mb, k, h)
            if not last:
                self._send_forward(j, k, True, out)
                continue
            tokens, go_on = self._sample(mb, k, out)
            self._send_back(j, k + 1, go_on, tokens)
        for work, _ in self._pending:
            work.wait()
        self._pending = []

    def _send_forward(self, j: int, k: int, go: bool, out: Tensor | None) -> None:
        dst = self._peer(self.rank + 1)
        dist.send(self._header(j, k, go), dst=dst, group=self.group)
        if go:
            dist.send(out.to(self.dtype).contiguous(), dst=dst, group=self.group)
