"""Tokenize batches of texts on worker threads of this process, handing results back in submission order.

The ``tokenizers`` library encodes in Rust with the GIL released, so ``workers`` threads keep ``workers``
cores busy while the caller's thread reads documents and writes shards; only the cheap conversion of the
ids to numpy holds the GIL. Threads instead of processes: nothing to start (a spawned process pays about
a second of interpreter and import start-up on a small machine), nothing pickled both ways, no
dependence on the caller's ``__main__``, and nothing left behind when the process is killed. The library's
own thread pool (``TOKENIZERS_PARALLELISM``) is left as the user set it. At most ``2 * workers + 2``
batches are in flight, which bounds memory whatever the input size. With ``workers=0`` the caller's
thread encodes (useful for debugging).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from typing import TypeVar

import numpy as np
from tokenizers import Tokenizer

from triarch.data_pipeline.errors import DataError

Tag = TypeVar("Tag")
MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """min(usable cores, 8)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


def encode_texts(tokenizer: Tokenizer, eos: int, texts: list[str],
                 closes: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts`` with EOS appended to each: (flat uint32 values, int64 per-text lengths).

    ``closes=False``: the last text is a piece of a longer document that goes on (``long_documents``), so it
    gets no EOS."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast: no offsets (>= 0.21)
    ids = [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    for doc in ids if closes else ids[:-1]:
        doc.append(eos)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    values = np.fromiter(chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
    return values, lengths


class TokenizerPool:
    """``workers`` tokenizer threads (see the module docstring); use as a context manager."""

    def __init__(self, tokenizer: Tokenizer, eos: int, workers: int) -> None:
        if workers < 0:
            raise DataError(f"workers ({workers}) must be >= 0")
        self.workers = workers
        self.max_in_flight = 2 * workers + 2
        self._tokenizer = tokenizer
        self._eos = eos
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="tokenize") if workers else None

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)

    def map_ordered(self, batches: Iterable[tuple[Tag, list[str], bool]]
                    ) -> Iterator[tuple[Tag, np.ndarray, np.ndarray]]:
        """Encode each ``(tag, texts, closes)`` (see ``encode_texts``); yield ``(tag, values, lengths)`` in the
        order the batches came."""
        if self._threads is None:
            for tag, texts, closes in batches:
                yield (tag, *encode_texts(self._tokenizer, self._eos, texts, closes))
            return
        pending: deque[tuple[Tag, Future]] = deque()
        for tag, texts, closes in batches:
            pending.append((tag, self._threads.submit(encode_texts, self._tokenizer, self._eos, texts, closes)))
            while pending and (len(pending) >= self.max_in_flight or pending[0][1].done()):
                head, result = pending.popleft()
                yield (head, *result.result())
        while pending:
            head, result = pending.popleft()
            yield (head, *result.result())
