"""An optional NVIDIA DALI stage between the batch iterator and the model (``data.loader: dali``).

The stage takes any iterator of per-step batch dicts (``{"input_ids": LongTensor(B, T), "labels": ...,
optionally "position_ids": ...}``) and runs them through a DALI pipeline: one ``fn.external_source`` per
field, ``prefetch_queue_depth`` steps buffered ahead, outputs moved to the GPU when CUDA is available
(CPU-only pipeline, ``device_id=None``, otherwise). It yields dicts of torch tensors equal to its input:
same keys, dtypes, shapes and values, in the same order. It ends when the source iterator ends.

The stage copies every batch into DALI's buffers (outputs come back through DLPack without a copy), so on
its own it is slower than handing the tensors straight to the model; the default loader stays the plain
iterator. DALI is an extra: ``pip install triarch[dali]``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch

from triarch.data_pipeline.errors import DataError

Batch = dict[str, torch.Tensor]
Device = Literal["auto", "cpu", "gpu"]
LOADERS = ("default", "dali")
DEFAULT_PREFETCH = 2
DEFAULT_THREADS = 1  # the pipeline only copies; more threads only add contention
_TORCH_TO_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
                   torch.uint8: np.uint8, torch.bool: np.bool_, torch.float16: np.float16,
                   torch.float32: np.float32, torch.float64: np.float64}


def import_dali() -> ModuleType:
    """``nvidia.dali``, or a one-line DataError saying how to install it."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401  (submodules used below)
        import nvidia.dali.types  # noqa: F401
    except ImportError as exc:
        raise DataError(f"data.loader 'dali' needs NVIDIA DALI, which is not importable ({exc.name or exc}): "
                        "pip install 'triarch[dali]'") from None
    return dali


def _resolve_device(device: Device) -> str:
    """``"gpu"`` or ``"cpu"``: ``auto`` picks the GPU exactly when torch sees CUDA."""
    if device not in ("auto", "cpu", "gpu"):
        raise DataError(f"DALI stage device {device!r} must be one of auto, cpu, gpu")
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise DataError("DALI stage device 'gpu' needs CUDA, which torch does not see; use device 'cpu'")
    return device


class _StepFeeder:
    """Hands each field's part of the next step to its own ``external_source`` callback.

    DALI calls every field's callback once per step; whichever asks first pulls the next dict from the
    source iterator and queues all of its fields, so the fields of one step always travel together.
    """

    def __init__(self, first: Batch, rest: Iterator[Batch], max_rows: int) -> None:
        self.fields = list(first)
        self.max_rows = max_rows
        self.dtypes = {name: first[name].dtype for name in self.fields}
        self.ndims = {name: first[name].dim() for name in self.fields}
        self._rest = rest
        self._queues: dict[str, deque[np.ndarray]] = {name: deque() for name in self.fields}
        self._steps = 0
        self._enqueue(first)

    def _enqueue(self, batch: Any) -> None:
        """Check one step's dict against the first one and queue its fields as numpy arrays."""
        where = f"DALI stage input step {self._steps}"
        if not isinstance(batch, dict) or list(batch) != self.fields:
            keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
            raise DataError(f"{where} has fields {keys}, expected {self.fields} (as in step 0)")
        rows = None
        for name in self.fields:
            value = batch[name]
            if not isinstance(value, torch.Tensor) or value.dtype != self.dtypes[name] \
                    or value.dim() != self.ndims[name]:
                got = f"{value.dtype} of {value.dim()} dims" if isinstance(value, torch.Tensor) else type(value)
                raise DataError(f"{where} field {name!r} is {got}, expected a {self.dtypes[name]} tensor of "
                                f"{self.ndims[name]} dims (as in step 0)")
            rows = value.shape[0] if rows is None else rows
            if value.shape[0] != rows or not 1 <= rows <= self.max_rows:
                raise DataError(f"{where} field {name!r} has {value.shape[0]} rows; every field needs the "
                                f"same number, between 1 and the largest batch size {self.max_rows}")
        for name in self.fields:
            self._queues[name].append(np.ascontiguousarray(batch[name].detach().cpu().numpy()))
        self._steps += 1

    def source(self, name: str) -> Callable[[], np.ndarray]:
        """The ``external_source`` callback of field ``name``; raises StopIteration when the input ends."""

        def next_part() -> np.ndarray:
            queue = self._queues[name]
            if not queue:
                self._enqueue(next(self._rest))  # StopIteration ends the DALI epoch
            return queue.popleft()

        return next_part


def _check_first(batch: Any) -> Batch:
    """Step 0 defines the fields, dtypes and largest batch size; it must be a non-empty dict of tensors."""
    if not isinstance(batch, dict) or not batch:
        raise DataError(f"DALI stage input must be non-empty dicts of tensors, got {type(batch).__name__}")
    for name, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 1:
            raise DataError(f"DALI stage input field {name!r} must be a tensor with a batch dimension, "
                            f"got {type(value).__name__}")
        if value.dtype not in _TORCH_TO_NUMPY:
            raise DataError(f"DALI stage input field {name!r} has dtype {value.dtype}, which DALI does not "
                            f"carry (supported: {', '.join(str(t) for t in _TORCH_TO_NUMPY)})")
    return batch


class DaliStage:
    """Iterate the batches of ``batches`` through a DALI pipeline (see the module docstring).

    ``device``: ``auto`` (GPU output when CUDA is available), ``cpu`` or ``gpu``. ``prefetch_queue_depth``
    steps are pulled from ``batches`` ahead of the one being consumed. Step 0 fixes the fields and their
    dtypes; no step may have more rows than ``max_batch_size`` (default: step 0's rows). The stage can
    be iterated once, like the iterator it wraps.
    """

    def __init__(self, batches: Iterable[Batch], *, device: Device = "auto",
                 prefetch_queue_depth: int = DEFAULT_PREFETCH, num_threads: int = DEFAULT_THREADS,
                 device_id: int | None = None, max_batch_size: int | None = None) -> None:
        self._dali = import_dali()
        if prefetch_queue_depth < 1 or num_threads < 1:
            raise DataError(f"DALI stage prefetch_queue_depth ({prefetch_queue_depth}) and num_threads "
                            f"({num_threads}) must be at least 1")
        self.device = _resolve_device(device)
        self.device_id = (torch.cuda.current_device() if device_id is None else device_id) \
            if self.device == "gpu" else None
        self.prefetch_queue_depth = prefetch_queue_depth
        self.num_threads = num_threads
        self.max_batch_size = max_batch_size
        self._batches = iter(batches)
        self._started = False

    def _build(self, feeder: _StepFeeder) -> Any:
        """A DALI pipeline with one external source per field, moved to the GPU in gpu mode."""
        dali = self._dali
        pipe = dali.Pipeline(batch_size=feeder.max_rows, num_threads=self.num_threads, device_id=self.device_id,
                             prefetch_queue_depth=self.prefetch_queue_depth, exec_dynamic=True)
        with pipe:
            outputs = []
            for name in feeder.fields:
                out = dali.fn.external_source(
                    source=feeder.source(name), batch=True, name=name, ndim=feeder.ndims[name] - 1,
                    dtype=dali.types.to_dali_type(np.dtype(_TORCH_TO_NUMPY[feeder.dtypes[name]])))
                outputs.append(out.gpu() if self.device == "gpu" else out)
            pipe.set_outputs(*outputs)
        pipe.build()
        return pipe

    def _to_torch(self, tensor_list: Any, dtype: torch.dtype) -> torch.Tensor:
        """One DALI output batch as a torch tensor, without a copy.

        The dynamic executor's outputs are reference-counted, so DLPack hands their memory to torch
        safely (and, on the GPU, orders DALI's stream before torch's current stream).
        """
        dense = tensor_list.as_tensor()
        if self.device == "gpu":
            with torch.cuda.device(self.device_id):
                out = torch.from_dlpack(dense)
        else:
            out = torch.from_dlpack(dense)
        if out.dtype != dtype:
            raise DataError(f"DALI returned {out.dtype} for a {dtype} field")  # a DALI type-mapping change
        return out

    def __iter__(self) -> Iterator[Batch]:
        if self._started:
            raise DataError("a DALI stage can be iterated once; wrap a fresh batch iterator for another pass")
        self._started = True
        first = next(self._batches, None)
        if first is None:
            return
        first = _check_first(first)
        max_rows = self.max_batch_size or next(iter(first.values())).shape[0]
        feeder = _StepFeeder(first, self._batches, max_rows=max_rows)
        pipe = self._build(feeder)
        try:
            while True:
                try:
                    outputs = pipe.run()
                except StopIteration:
                    return
                yield {name: self._to_torch(out, feeder.dtypes[name])
                       for name, out in zip(feeder.fields, outputs, strict=True)}
        finally:
            del pipe  # stops DALI's worker threads now, also when the consumer stops early


def loader_stage(batches: Iterable[Batch], loader: str, **dali_options: Any) -> Iterable[Batch]:
    """Apply the ``data.loader`` choice: ``default`` returns ``batches`` as is, ``dali`` wraps them."""
    if loader == "default":
        return batches
    if loader == "dali":
        return DaliStage(batches, **dali_options)
    raise DataError(f"data.loader {loader!r} must be one of {', '.join(LOADERS)}")
