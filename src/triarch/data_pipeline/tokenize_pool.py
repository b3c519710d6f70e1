"""Tokenize batches of texts in worker processes, handing results back in submission order.

Each worker holds its own copy of the tokenizer and encodes single-threaded (``TOKENIZERS_PARALLELISM`` is
set to false for them), so ``workers`` is the number of cores used for tokenizing. At most ``2 * workers + 2``
batches are in flight, which bounds memory whatever the input size. With ``workers=0`` the caller's process
encodes (useful for debugging). Workers are spawned (see ``triarch.data_workers``), ignore SIGINT (the
parent handles Ctrl-C) and, on Linux, die with the parent, so a killed prepare leaves no orphans.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from multiprocessing.pool import AsyncResult
from typing import TypeVar

import numpy as np
from tokenizers import Tokenizer

from triarch.data_pipeline.errors import DataError
from triarch.data_workers import encode_in_worker, encode_texts, init_tokenizer_worker, spawn_pool

Tag = TypeVar("Tag")
MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """min(usable cores, 8)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


class TokenizerPool:
    """``workers`` tokenizer processes (see the module docstring); use as a context manager."""

    def __init__(self, tokenizer: Tokenizer, eos: int, workers: int) -> None:
        if workers < 0:
            raise DataError(f"workers ({workers}) must be >= 0")
        self.workers = workers
        self.max_in_flight = 2 * workers + 2
        self._tokenizer = tokenizer
        self._eos = eos
        self._pool = None
        if workers:
            saved = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by the workers
            try:
                self._pool = spawn_pool(workers, init_tokenizer_worker, (tokenizer.to_str(), eos, os.getpid()))
            finally:
                if saved is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = saved

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._pool is None:
            return
        if exc_type is None:
            self._pool.close()
        else:
            self._pool.terminate()
        self._pool.join()

    def map_ordered(self, batches: Iterable[tuple[Tag, list[str]]]) -> Iterator[tuple[Tag, np.ndarray, np.ndarray]]:
        """Encode each ``(tag, texts)``; yield ``(tag, values, lengths)`` in the order the batches came."""
        if self._pool is None:
            for tag, texts in batches:
                yield (tag, *encode_texts(self._tokenizer, self._eos, texts))
            return
        pending: deque[tuple[Tag, AsyncResult]] = deque()
        for tag, texts in batches:
            pending.append((tag, self._pool.apply_async(encode_in_worker, (texts,))))
            while pending and (len(pending) >= self.max_in_flight or pending[0][1].ready()):
                head, result = pending.popleft()
                yield (head, *result.get())
        while pending:
            head, result = pending.popleft()
            yield (head, *result.get())
