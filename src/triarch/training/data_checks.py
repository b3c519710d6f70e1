"""Data errors that end every rank together, with one line.

A rank whose batch fails a check (an id above the manifest's ``max_token_id``, a shard that cannot be read)
or whose background hash check found a damaged shard must not leave the other ranks waiting in the next
collective. In the step loop the rank trains one step on a placeholder batch with its ``data_error`` flag
set, which the step agrees in its own fused all-reduce (no extra collective); when any rank set it, no
optimizer step is taken and every rank calls :func:`agree`, which gathers the messages and raises the lowest
failing rank's on all of them. Elsewhere (stream set-up, evaluation, before a checkpoint and at the end)
:func:`agree` is called directly: one small gather, at moments that are rare.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.stream import TokenStream


class AgreedDataError(DataError):
    """A data error every rank raises together; the message is the lowest failing rank's."""


def agree(problem: str | None, group: dist.ProcessGroup | None) -> None:
    """Collective over ``group``: raise :class:`AgreedDataError` on every rank when any rank has a problem."""
    problems: list[str | None] = [problem]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        problems = [None] * dist.get_world_size(group)
        dist.all_gather_object(problems, problem, group=group)
    found = next((p for p in problems if p), None)
    if found is not None:
        raise AgreedDataError(found)


def integrity_problem(streams: Sequence[TokenStream], *, wait: bool = False) -> str | None:
    """The first hash mismatch the streams' background checks found (``wait``: after finishing them)."""
    for stream in streams:
        problem = stream.wait_integrity() if wait else stream.integrity_error()
        if problem is not None:
            return problem
    return None


def next_batch(batches: Iterator[dict[str, torch.Tensor]], streams: Sequence[TokenStream]
               ) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The next batch, or None with the reason when it (or a shard read so far) failed a check."""
    try:
        batch = next(batches)
    except DataError as err:
        return None, str(err)
    return batch, integrity_problem(streams)


def placeholder_batch(stream: TokenStream) -> dict[str, torch.Tensor]:
    """A batch of the stream's shape (token 0 everywhere) for a step whose only purpose is to agree on an
    error: the step is not applied."""
    if hasattr(stream, "placeholder"):
        return stream.placeholder()
    shape = (stream.local_batch_size, stream.seq_len)
    batch = {"input_ids": torch.zeros(shape, dtype=torch.int64), "labels": torch.zeros(shape, dtype=torch.int64)}
    if stream.position_ids:
        batch["position_ids"] = torch.arange(stream.seq_len, dtype=torch.int64).expand(shape).contiguous()
    return batch
