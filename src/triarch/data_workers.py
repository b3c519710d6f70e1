"""Entry points of the worker processes of data preparation: parsing docstrings (tokenizing uses threads).

Workers are started with ``spawn``: forking a process that has loaded arbitrary libraries (threads,
allocators, CUDA or DALI memory) can crash or hang the child, and ``prepare`` is also called from inside
training scripts and test sessions. This module lives outside ``triarch.data_pipeline`` so a spawned worker
imports only ast, not that package's heavier dependencies (torch). Workers are started as if from an
interactive session (``hidden_main``): they need nothing from the caller's ``__main__``, and re-running it
in each worker fails for scripts read from stdin and re-executes unguarded scripts. The pool is a
``ProcessPoolExecutor``, which never restarts a worker that died: the caller gets ``BrokenProcessPool``
at once (``multiprocessing.Pool`` would start a replacement, this time importing the real ``__main__``,
which for ``python -`` fails at start-up, again and again, while the caller waits forever).
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def spawn_executor(processes: int, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> ProcessPoolExecutor:
    """A ``spawn`` process pool of at most ``processes`` workers, started on demand by ``submit``/``map``:
    call those inside ``hidden_main()``."""
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"), initializer=initializer,
                               initargs=initargs)


@contextlib.contextmanager
def hidden_main() -> Iterator[None]:
    """An empty ``__main__`` while worker processes start, so they do not import the caller's."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def die_with_parent(parent: int) -> None:
    """Ignore Ctrl-C (the parent handles it) and, on Linux, get SIGKILLed when the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


# --- docstrings ------------------------------------------------------------------------------------------


def docstrings_in_order(node: ast.AST) -> Iterator[str]:
    """Module, class and function docstrings of ``node``'s subtree, in source order."""
    if isinstance(node, _DOC_NODES):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(node):
        yield from docstrings_in_order(child)


def file_docstrings(path: Path) -> list[str]:
    """Docstrings of one source file; an unreadable or unparsable file gives none."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError, RecursionError):  # ValueError covers decode errors, NUL bytes
        return []
    return list(docstrings_in_order(tree))
