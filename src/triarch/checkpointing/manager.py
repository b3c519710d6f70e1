"""Checkpoint manager: save (shards first, commit last), find the newest usable step, load, retention.

Layout of one step: ``RUN_DIR/checkpoints/step_<N>/`` with DCP shard files and ``.metadata``,
``trainer_state.pt`` (rank 0: step, LR schedule, data position, config, layout), ``rng/rank_<r>.pt``
(every RNG state of each rank), and ``COMMITTED.json`` written last by rank 0.

The commit costs every rank the same whatever the checkpoint's size: each rank hashes the files it wrote
as it writes them (in DCP's writer thread when async), rank 0 gathers the digests and writes the commit
file, retention deletes in a background thread, and verify-on-load splits the files over the ranks.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.torch_version import TorchVersion

from triarch.checkpointing.commit import (
    CheckpointError,
    merge_digests,
    read_commit,
    share_of,
    verify_files,
    write_commit,
)
from triarch.checkpointing.digests import DigestingWriter, FileRecord, file_record
from triarch.checkpointing.offline import tensor_metadata
from triarch.checkpointing.retention import BackgroundRetention
from triarch.checkpointing.safe_load import load_plain
from triarch.checkpointing.steps import StepInfo, list_steps  # noqa: F401  (re-exported)
from triarch.engine.interface import Engine
from triarch.parallel.process_groups import host_group as default_host_group

log = logging.getLogger("triarch.checkpoint")

TRAINER_STATE = "trainer_state.pt"
LOW_SPACE_BYTES = 64 << 20


def _reason(err: BaseException, where: Path) -> str:
    """The innermost useful message of a (possibly wrapped) save error, on one line.

    A full disk does not always surface as ENOSPC (torch's zip writer reports a position mismatch), so
    the free space of the target file system is checked too.
    """
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip()
    for marker in ("No space left on device", "Disk quota exceeded", "Permission denied", "Read-only file system"):
        if marker in text:
            return marker
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    if free is not None and free < LOW_SPACE_BYTES:
        return f"No space left on device ({free / 2**20:.1f} MiB free)"
    return text.splitlines()[-1] if text else type(err).__name__


# torch 2.11 and 2.12 close a DefaultStager at the end of every stage() and the next save through it fails
# (KeyError: <class 'type'>; pytorch/pytorch issue 183413, fixed for 2.13): there each async save gets its own.
STAGER_REUSABLE = TorchVersion(torch.__version__) >= (2, 13)


def _new_stager() -> DefaultStager:
    """A stager for async saves: kept for the whole run where torch allows (``STAGER_REUSABLE``), so its CPU
    (pinned, on CUDA) copies are allocated once and reused by every save.

    Staging stays synchronous, so the copy is complete before the optimizer touches the weights again.
    """
    cuda = torch.cuda.is_available()
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False,
                                        use_non_blocking_copy=cuda))


@dataclass(frozen=True)
class _PendingSave:
    """An async save whose write (and hashing) runs in DCP's background thread."""

    step: int
    step_dir: Path
    info: dict[str, Any]
    future: Future
    writer: DigestingWriter
    own: dict[str, FileRecord]  # files this rank wrote itself (RNG state, trainer state), already hashed


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process, as plain data (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_state(engine: Engine, others: dict[str, Engine]) -> dict[str, Any]:
    state = engine.checkpoint_state()
    for name, other in others.items():
        state.update(other.checkpoint_state(prefix=f"{name}."))
    return state


class CheckpointManager:
    """Saves and restores the whole training state of a run directory, on every rank (collective).

    With ``async_save`` the loop is blocked only while the state is staged (copied); DCP writes (and each
    rank hashes what it wrote) in a background thread over a dedicated gloo group, and the step is
    committed at the first step boundary where every rank's write has finished (``poll``). A new save
    first waits for the previous one. Rank 0 deletes old steps in a background thread (``wait`` drains it).

    Agreements between ranks (a save failed, a write finished, the digests, which step to load) and DCP's
    own planning run on ``host_group``, a gloo group (the default one may be NCCL, which cannot reduce CPU
    tensors).
    """

    def __init__(self, run_dir: Path, *, keep: int, keep_every: int = 0, async_save: bool = False,
                 host_group: dist.ProcessGroup | None = None) -> None:
        if keep < 2:
            raise ValueError(f"checkpoint.keep ({keep}) must be at least 2")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep, self.keep_every, self.async_save = keep, keep_every, async_save
        self._host = host_group if host_group is not None else default_host_group()
        self._group = dist.new_group(backend="gloo") if async_save else None
        self._stager = _new_stager() if async_save else None
        self._pending: _PendingSave | None = None
        self._retention = BackgroundRetention(self.dir, keep, keep_every)
        self.last_stall_s = 0.0
        self.last_wait_s = 0.0
        self.last_commit_s = 0.0

    # ------------------------------------------------------------------------------------------ save
    def save(self, step: int, engine: Engine, trainer_state: dict[str, Any], *,
             others: dict[str, Engine] | None = None) -> Path:
        """Write step ``step`` (in the background when async) and commit it once every rank is done.
        ``others`` are further trained models of the run (a PPO critic), saved under ``<name>.model.*`` /
        ``<name>.optim.*`` with their LR schedules in the trainer state as ``<name>_scheduler``."""
        others = others or {}
        started = time.perf_counter()
        self._finish_write()
        self.last_wait_s = time.perf_counter() - started
        rank = dist.get_rank()
        step_dir = self.dir / f"step_{step}"
        error = None
        if rank == 0:
            try:
                self._prepare_folder(step_dir)
            except OSError as err:  # e.g. no write permission on the checkpoints folder
                error = f"saving {step_dir} failed: {_reason(err, self.dir)}"
        self._agree_or_raise(error, step_dir)  # also the barrier: the folder exists for every rank
        commit_info = {"step": step, "world_size": dist.get_world_size(), "layout": trainer_state.get("layout")}
        writer = DigestingWriter(step_dir)
        try:
            schedules = {f"{name}_scheduler": e.schedule_state() for name, e in others.items()}
            own = self._write_own_files(step, step_dir, engine, {**trainer_state, **schedules})
            state = _all_state(engine, others)
            if self.async_save:
                # DCP stages a CPU copy before returning; only the write (and its hashing) runs in the background
                if not STAGER_REUSABLE:
                    self._stager = _new_stager()
                future = dcp.async_save(state, checkpoint_id=str(step_dir), storage_writer=writer,
                                        process_group=self._group, async_stager=self._stager)
                self._pending = _PendingSave(step, step_dir, commit_info, future, writer, own)
            else:
                dcp.save(state, checkpoint_id=str(step_dir), storage_writer=writer, process_group=self._host)
        except (Exception, CheckpointException) as err:  # OSError from our files; DCP: any rank's failure
            error = f"saving {step_dir} failed: {_reason(err, self.dir)}"
        self._agree_or_raise(error, step_dir)
        self.last_stall_s = time.perf_counter() - started
        if not self.async_save:
            self._commit(step, step_dir, commit_info, {**own, **writer.digests})
        return step_dir

    def _prepare_folder(self, step_dir: Path) -> None:
        """Rank 0: an empty folder for the step (a leftover of a killed save of the same step is removed)."""
        if step_dir.exists():
            self._retention.wait()  # never race a background deletion for the same folder
        if step_dir.exists():
            shutil.rmtree(step_dir)
        (step_dir / "rng").mkdir(parents=True)

    def _write_own_files(self, step: int, step_dir: Path, engine: Engine,
                         trainer_state: dict[str, Any]) -> dict[str, FileRecord]:
        """This rank's RNG state (and on rank 0 the trainer state), hashed: small files, written here."""
        rank = dist.get_rank()
        paths = [step_dir / "rng" / f"rank_{rank}.pt"]
        torch.save(rng_state(), paths[0])
        if rank == 0:
            paths.append(step_dir / TRAINER_STATE)
            torch.save({**trainer_state, "step": step, "scheduler": engine.schedule_state()}, paths[1])
        return {p.relative_to(step_dir).as_posix(): file_record(p) for p in paths}

    def poll(self) -> None:
        """At a step boundary: commit the background save if every rank finished writing it."""
        if self._pending is None:
            return
        done = torch.tensor(int(self._pending.future.done()))
        dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._host)
        if int(done):
            self._finish_pending()

    def wait(self) -> None:
        """Block until the background save (if any) is written and committed, and old steps are deleted."""
        self._finish_write()
        self._retention.wait()

    def _finish_write(self) -> None:
        if self._pending is not None:
            self._finish_pending()

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        error = None
        try:
            pending.future.result()
        except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
            error = f"saving {pending.step_dir} failed: {_reason(err, self.dir)}"
        self._agree_or_raise(error, pending.step_dir)
        self._commit(pending.step, pending.step_dir, pending.info, {**pending.own, **pending.writer.digests})

    def _agree_or_raise(self, error: str | None, step_dir: Path | None = None) -> None:
        """Every rank raises when any rank failed (so none waits forever at a barrier). The failed step's
        partial folder is removed by rank 0 once every rank stopped writing it (a disk-full save must not
        keep the disk full); committed steps are never touched."""
        flag = torch.tensor(int(error is not None))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._host)
        if int(flag):
            if dist.get_rank() == 0 and step_dir is not None:
                shutil.rmtree(step_dir, ignore_errors=True)
            raise CheckpointError(error or "a checkpoint save failed on another rank; see its log")

    def _commit(self, step: int, step_dir: Path, info: dict[str, Any], digests: dict[str, FileRecord]) -> None:
        """Gather every rank's digests (its files are on disk), rank 0 writes the commit file and queues
        retention; every rank returns once the step is committed (or raises with all the others)."""
        started = time.perf_counter()
        rank = dist.get_rank()
        gathered: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(digests, gathered, dst=0, group=self._host)
        error = None
        if rank == 0:
            try:
                files, hashed_by_rank = merge_digests(step_dir, gathered)
                write_commit(step_dir, {**info, "hashed_by_rank": hashed_by_rank}, files)
            except (OSError, CheckpointError) as err:
                error = f"saving {step_dir} failed: {_reason(err, self.dir)}"
            else:
                self._retention.request(just_committed=step)
        self._agree_or_raise(error, step_dir if error is not None else None)
        self.last_commit_s = time.perf_counter() - started

    # ------------------------------------------------------------------------------------------ load
    def newest_usable(self) -> StepInfo | None:
        """Newest committed step that passes verification; every rank checks a share of its files and all
        agree. Rank 0 lists the steps and warns about each one skipped, naming it and the reason."""
        rank0 = dist.get_rank() == 0
        for info in self._agreed_listing():
            if not info.committed:
                if rank0:
                    log.warning("checkpoint %s is not committed (no commit file); skipping it", info.path)
                continue
            problem = self._verify_together(info.path)
            if problem is None:
                return info
            if rank0:
                log.warning("checkpoint %s is unusable (%s); falling back to an older one", info.path, problem)
        return None

    def resume_point(self) -> StepInfo | None:
        """Where a run resumes: :meth:`newest_usable`, None for a run with no committed checkpoint; raises
        CheckpointError when committed checkpoints exist and none is usable, rather than start the run again
        from step 0 over them (retention would then delete them)."""
        info = self.newest_usable()
        committed = [s for s in self._agreed_listing() if s.committed]
        if info is None and committed:
            raise CheckpointError(
                f"{self.dir} holds {len(committed)} committed checkpoint(s) and none is usable (see the warnings "
                f"above; newest {committed[0].path.name}): refusing to start again from step 0 over them; repair "
                f"or move them, or use a new --run-dir")
        return info

    def _agreed_listing(self) -> list[StepInfo]:
        """Rank 0's listing of the step folders, newest first, on every rank."""
        listing: list[Any] = [list(reversed(list_steps(self.dir))) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(listing, src=0, group=self._host)
        return listing[0]

    def verify_step(self, step_dir: Path) -> str | None:
        """Check one step folder (of any run) together (collective): the first problem found, or None."""
        return self._verify_together(step_dir)

    def _verify_together(self, step_dir: Path) -> str | None:
        """Each rank checks its share (:func:`share_of`) of the step's files; the first problem any rank
        found (with the rank that found it), or None on every rank when all match."""
        rank, world = dist.get_rank(), dist.get_world_size()
        problem = None
        record = read_commit(step_dir)
        if record is None:
            problem = f"{step_dir} has no commit file"
        else:
            try:
                verify_files(step_dir, share_of(record["files"], rank, world))
            except (CheckpointError, OSError) as err:  # an unreadable file too: every rank must reach the gather
                problem = str(err)
        found: list[Any] = [None] * world
        dist.all_gather_object(found, problem, group=self._host)
        return next((f"{p}; found by rank {r}" for r, p in enumerate(found) if p is not None), None)

    def load(self, info: StepInfo, engine: Engine, *, others: dict[str, Engine] | None = None
             ) -> dict[str, Any]:
        """Load step ``info`` into ``engine`` (and ``others``, as saved by :meth:`save`) on any layout; returns
        the trainer state saved with it."""
        others = others or {}
        state = _all_state(engine, others)
        saved_keys = set(tensor_metadata(info.path))
        prefixes = ["", *(f"{name}." for name in others)]
        models = [k for k in state if any(k.startswith(f"{p}model.") for p in prefixes)]
        missing_model = [k for k in models if k not in saved_keys]
        if missing_model:
            raise CheckpointError(f"{info.path} does not fit this model: no tensor {missing_model[0]}")
        metas = tensor_metadata(info.path)
        for key in models:
            if tuple(metas[key].size) != tuple(state[key].shape):
                raise CheckpointError(f"{info.path} does not fit this model: {key} is {tuple(metas[key].size)} "
                                      f"there, {tuple(state[key].shape)} here")
        for p in prefixes:  # weights only (e.g. imported): that model's optimizer starts fresh
            if not any(k.startswith(f"{p}optim.") for k in saved_keys):
                state = {k: v for k, v in state.items() if not k.startswith(f"{p}optim.")}
        try:
            dcp.load(state, checkpoint_id=str(info.path), process_group=self._host)
        except Exception as err:  # DCP wraps per-rank failures (shape mismatch, unreadable shard) in one error
            first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"loading {info.path} failed: {first}") from None
        for loaded in (engine, *others.values()):
            loaded.state_loaded()
        trainer_state = load_plain(info.path / TRAINER_STATE)
        if not isinstance(trainer_state, dict) or not isinstance(trainer_state.get("step"), int):
            raise CheckpointError(f"{info.path / TRAINER_STATE} holds no step number: the checkpoint is damaged")
        if "scheduler" in trainer_state:
            engine.load_schedule_state(trainer_state["scheduler"])
        for name, other in others.items():
            if f"{name}_scheduler" in trainer_state:
                other.load_schedule_state(trainer_state[f"{name}_scheduler"])
        rng_file = info.path / "rng" / f"rank_{dist.get_rank()}.pt"
        if trainer_state.get("world_size") == dist.get_world_size() and rng_file.is_file():
            try:
                set_rng_state(load_plain(rng_file))
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                raise CheckpointError(f"{rng_file} is not a random-generator state ({type(err).__name__}: {err}): "
                                      f"the checkpoint is damaged") from None
        return trainer_state
