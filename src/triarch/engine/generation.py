"""Autoregressive generation on the training engine's own sharded chunks, with a KV cache.

Nothing is copied or resharded: each rank runs the chunks it trains.

- TP: every layer keeps the keys/values of this rank's heads (``models.kv_cache``); the vocabulary-sharded
  logits of the sampled position are gathered (batch x vocab) for sampling. Under sequence parallelism
  every forward must hold a multiple of ``tp`` tokens: prompts get extra left padding and each decoding
  forward appends ``tp - 1`` placeholder tokens that the next forward overwrites in the cache.
- PP: each new token's hidden states travel stage to stage over the pipeline group (send/recv, in global
  stage order, so interleaved virtual stages work too); the last stage samples and broadcasts the tokens to
  the other stages.
- DP: each data-parallel rank generates its own prompts; FSDP-sharded weights are gathered once for the
  whole generation (not per token) and the ranks agree each step whether any sequence is still running.

Prompts are left-padded; padding slots are masked out of every query's keys and positions count real
tokens only, so a prompt's result does not depend on the batch it is in. Sampling is keyed by (seed,
global prompt index, token index) (``engine.sampling``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from triarch.engine.sampling import sample_tokens
from triarch.models.kv_cache import DecodeInputs, KVCache, decode_mask
from triarch.models.llama import Llama
from triarch.parallel.pipeline import ChunkSpec
from triarch.parallel.topology import Topology


@dataclass(frozen=True)
class SamplingParams:
    """How to continue the prompts: ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1.0 keep every
    token; a sequence stops after ``eos_id`` (None: only at ``max_new_tokens``)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    eos_id: int | None = None
    pad_id: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Generation:
    """Completions of this rank's prompts (the prompts themselves are not repeated).

    ``tokens`` (batch, max_new_tokens) int64, ``pad_id`` after a sequence stops; ``logprobs`` (batch,
    max_new_tokens) float32, each token's log-probability under the temperature-scaled policy (0 after the
    stop); ``lengths`` (batch,) int64 tokens generated, the stop token included."""

    tokens: Tensor
    logprobs: Tensor
    lengths: Tensor

    def completions(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


@dataclass
class _Batch:
    """Left-padded prompts and the slot bookkeeping of one generation."""

    ids: Tensor  # (batch, prompt slots)
    valid: Tensor  # (batch, capacity) bool: the slot holds a real token
    prompt_lengths: Tensor  # (batch,)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_seq_len: int, max_new_tokens: int) -> None:
    """One-line ValueError for an empty prompt, a token outside the vocabulary, or a prompt that cannot be
    continued by ``max_new_tokens`` within the model's context."""
    if not prompts:
        raise ValueError("no prompts to generate from")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds token id {bad[0]}, outside the vocabulary [0, {vocab_size})")
        if len(prompt) + max_new_tokens > max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens: with max_new_tokens={max_new_tokens} it needs "
                             f"{len(prompt) + max_new_tokens} positions, more than model.max_seq_len={max_seq_len}")


def _left_pad(prompts: Sequence[Sequence[int]], multiple: int, capacity_extra: int, pad_id: int,
              device: torch.device) -> _Batch:
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    slots = -(-int(lengths.max()) // multiple) * multiple
    ids = torch.full((len(prompts), slots), pad_id, dtype=torch.int64)
    valid = torch.zeros(len(prompts), slots + capacity_extra, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, slots - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.int64)
        valid[row, slots - len(prompt):slots] = True
    return _Batch(ids.to(device), valid.to(device), lengths.to(device))


@contextlib.contextmanager
def gathered_weights(chunks: list[Llama]) -> Iterator[None]:
    """Keep FSDP-sharded parameters gathered for a whole generation: one all-gather per module instead of
    one per module per token. Each module's reshard-after-forward setting (FSDP2 keeps it per parameter
    group, and decides the root's itself) is put back afterwards."""
    modules = [m for chunk in chunks for m in chunk.modules() if isinstance(m, FSDPModule)]
    saved = []
    for module in modules:
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)  # older torch (2.11 read) keeps one ``_fsdp_param_group``
        if groups is None:
            groups = [g for g in [getattr(state, "_fsdp_param_group", None)] if g is not None]
        saved.append((state, getattr(state, "_auto_reshard_after_forward", None),
                      [(g, g.post_forward_mesh_info) for g in groups]))
        module.set_reshard_after_forward(False, recurse=False)
    for module in modules:
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
        for state, auto, groups in saved:
            if auto is not None:
                state._auto_reshard_after_forward = auto
            for group, info in groups:
                group.post_forward_mesh_info = info


class _PipelineForward:
    """One incremental forward of the whole model across this rank's chunks and the pipeline group."""

    def __init__(self, chunks: list[Llama], specs: list[ChunkSpec], topo: Topology, activation_dtype: torch.dtype,
                 sequence_parallel: bool) -> None:
        self.chunks, self.specs, self.topo = chunks, specs, topo
        self.dtype = activation_dtype
        self.seq_divisor = topo.tp if sequence_parallel else 1
        self.group = topo.mesh["pp"].get_group() if topo.pp > 1 else None

    def _peer(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.group, pp_rank)

    def __call__(self, tokens: Tensor, decode: DecodeInputs) -> Tensor | None:
        """Logits (batch, kept positions, vocab) float32 on the last stage (gathered over TP), else None."""
        pp, out = self.topo.pp, None
        for chunk, spec in zip(self.chunks, self.specs):
            if spec.stage_index == 0:
                h = tokens
            else:
                h = torch.empty(tokens.shape[0], tokens.shape[1] // self.seq_divisor, chunk.args.dim,
                                dtype=self.dtype, device=tokens.device)
                dist.recv(h, src=self._peer((spec.stage_index - 1) % pp), group=self.group)
            out = chunk(h, decode=decode)
            if not spec.has_head:
                dist.send(out.to(self.dtype).contiguous(), dst=self._peer((spec.stage_index + 1) % pp),
                          group=self.group)
                out = None
        if out is None:
            return None
        return (out.full_tensor() if isinstance(out, DTensor) else out).float()

    def share(self, values: Tensor) -> Tensor:
        """The last stage's ``values`` on every stage of this pipeline."""
        if self.group is None:
            return values
        dist.broadcast(values, src=self._peer(self.topo.pp - 1), group=self.group)
        return values


def generate(chunks: list[Llama], specs: list[ChunkSpec], topo: Topology, prompts: Sequence[Sequence[int]],
             prompt_index: Tensor, params: SamplingParams, *, activation_dtype: torch.dtype,
             sequence_parallel: bool, autocast: contextlib.AbstractContextManager,
             micro_batches: bool = False) -> Generation:
    """Continue this data-parallel rank's ``prompts`` (token id lists; ``prompt_index`` their global
    indices, which key the sampling). Every rank of the model group calls this with the same prompts. Under
    PP with one chunk per rank, ``micro_batches`` keeps several in flight (``engine.pipelined_decode``);
    False decodes the whole batch stage after stage (the same tokens)."""
    params.check()
    args = chunks[0].args
    check_prompts(prompts, args.vocab_size, args.max_seq_len, params.max_new_tokens)
    device, width = topo.device, topo.tp if sequence_parallel else 1
    n_new = params.max_new_tokens
    if micro_batches and topo.pp > 1 and len(chunks) == 1 and len(prompts) >= 2:
        with torch.no_grad(), gathered_weights(chunks), autocast:
            return _pipelined(chunks[0], topo, prompts, prompt_index.to(device), params, width=width,
                              dtype=activation_dtype, sequence_parallel=sequence_parallel)
    batch = _left_pad(prompts, width, n_new + width, params.pad_id, device)
    rows, start = batch.ids.shape
    cache = KVCache(start + n_new + width)
    forward = _PipelineForward(chunks, specs, topo, activation_dtype, sequence_parallel)
    prompt_index = prompt_index.to(device)
    tokens = torch.full((rows, n_new), params.pad_id, dtype=torch.int64, device=device)
    logprobs = torch.zeros(rows, n_new, dtype=torch.float32, device=device)
    running = torch.ones(rows, dtype=torch.bool, device=device)
    lengths = torch.zeros(rows, dtype=torch.int64, device=device)
    offsets = torch.arange(width, device=device)
    step_ids, positions = batch.ids, (batch.valid[:, :start].long().cumsum(1) - 1).clamp(min=0)
    pick = -1  # the position whose logits give the next token: the prompt's last, then each step's first
    with torch.no_grad(), gathered_weights(chunks), autocast:
        for t in range(n_new):
            seq = step_ids.shape[1]
            keep = slice(seq - 1, seq) if pick == -1 else slice(0, 1)
            decode = DecodeInputs(positions, decode_mask(batch.valid, cache.length, seq), cache,
                                  keep=None if sequence_parallel else keep)
            logits = forward(step_ids, decode)
            cache.advance(seq if t == 0 else 1)
            shared = torch.zeros(rows, 2, dtype=torch.float64, device=device)
            if logits is not None:
                last = logits[:, -1] if decode.keep is not None or pick == -1 else logits[:, pick]
                new, lp = sample_tokens(last, temperature=params.temperature, top_k=params.top_k,
                                        top_p=params.top_p, seed=params.seed, prompt_index=prompt_index,
                                        token_index=t)
                shared = torch.stack([new.double(), lp.double()], dim=1)
            shared = forward.share(shared)
            new, lp = shared[:, 0].long(), shared[:, 1].float()
            tokens[:, t] = torch.where(running, new, params.pad_id)
            logprobs[:, t] = torch.where(running, lp, 0.0)
            lengths += running.long()
            if params.eos_id is not None:
                running &= new != params.eos_id
            if t == n_new - 1 or not _any_running(running, topo):
                break
            slot = start + t
            batch.valid[:, slot] = True
            step_ids = torch.cat([new[:, None], new[:, None].expand(rows, width - 1)], dim=1)
            positions = _decode_positions(batch.prompt_lengths, t, offsets, args.max_seq_len)
            pick = 0
    return Generation(tokens, logprobs, lengths)


def _pipelined(chunk: Llama, topo: Topology, prompts: Sequence[Sequence[int]], prompt_index: Tensor,
               params: SamplingParams, *, width: int, dtype: torch.dtype, sequence_parallel: bool) -> Generation:
    """Micro-batches in flight through the pipeline (``engine.pipelined_decode``); every stage returns the
    last stage's results."""
    from triarch.engine.pipelined_decode import PipelinedDecoder, _Micro

    device, n_new, rows = topo.device, params.max_new_tokens, len(prompts)
    micros = []
    for part in torch.arange(rows).tensor_split(min(topo.pp, rows)):
        lo, hi = int(part[0]), int(part[-1]) + 1
        batch = _left_pad(prompts[lo:hi], width, n_new + width, params.pad_id, device)
        n = hi - lo
        micros.append(_Micro(batch.ids, batch.valid, batch.prompt_lengths, prompt_index[lo:hi],
                             KVCache(batch.ids.shape[1] + n_new + width),
                             torch.full((n, n_new), params.pad_id, dtype=torch.int64, device=device),
                             torch.zeros(n, n_new, dtype=torch.float32, device=device),
                             torch.zeros(n, dtype=torch.int64, device=device),
                             torch.ones(n, dtype=torch.bool, device=device)))
    PipelinedDecoder(chunk, topo, params, width=width, dtype=dtype, sequence_parallel=sequence_parallel,
                     pad_positions=_decode_positions).run(micros)
    results = torch.cat([torch.cat([m.tokens.double(), m.logprobs.double(), m.lengths[:, None].double()], dim=1)
                         for m in micros])
    group = topo.mesh["pp"].get_group()
    dist.broadcast(results, src=dist.get_global_rank(group, topo.pp - 1), group=group)
    return Generation(results[:, :n_new].long(), results[:, n_new:2 * n_new].float(), results[:, -1].long())


def _decode_positions(prompt_lengths: Tensor, t: int, offsets: Tensor, max_seq_len: int) -> Tensor:
    """Positions of a decoding forward's tokens: token ``t`` (of every row) then the sequence-parallel
    placeholders after it, clamped to the rotary table (a placeholder's output is discarded and its cache
    slot overwritten, so its position does not matter)."""
    return ((prompt_lengths + t)[:, None] + offsets[None, :]).clamp(max=max_seq_len - 1)


def _any_running(running: Tensor, topo: Topology) -> bool:
    """Whether some sequence of any data-parallel rank still runs (every rank then takes another step:
    they share the weights' collectives)."""
    flag = running.any().to(torch.int32)
    if topo.dp > 1:
        dist.all_reduce(flag, group=topo.dp_mesh.get_group())
    return bool(flag.item())
