"""Entry point of one rank: ``python -m triarch.launcher.rank_main RUN_DIR`` (reads RUN_DIR/config.yaml)."""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from triarch.checkpointing.commit import CheckpointError
from triarch.config import ConfigError, TriarchConfig, load_config
from triarch.data_pipeline.errors import DataError
from triarch.engine.interface import NonFiniteLossError
from triarch.launcher import exit_codes
from triarch.launcher.distributed import exit_process, init_distributed, pick_device, shutdown_distributed
from triarch.launcher.parent_watch import die_with_parent
from triarch.launcher.stop_signal import LOCAL_STOP_SIGNALS, StopRequest
from triarch.launcher.watchdog import HangWatchdog
from triarch.parallel.process_groups import host_group
from triarch.training.data_checks import AgreedDataError
from triarch.training.precision import configure_tf32
from triarch.training.run_control import RunControl
from triarch.training.trainer import TrainSummary, train

EXIT_CONFIG = exit_codes.CONFIG
EXIT_NON_FINITE = exit_codes.NON_FINITE
EXIT_CHECKPOINT = exit_codes.CHECKPOINT
EXIT_STOPPED = exit_codes.STOPPED
EXIT_DATA = exit_codes.DATA
HEARTBEAT_DIR = "heartbeats"

FLIGHT_RECORDER_DIR = "flight_recorder"
FLIGHT_RECORDER_ENTRIES = 20000  # collectives each rank remembers for the dump after a timeout


def nccl_environment(run_dir: Path) -> dict[str, str]:
    """NCCL settings for a rank (each applied only where the user has not set it): fail fast instead of
    hanging on a broken communicator, and on a collective timeout dump the flight recorder (the last
    collectives of every rank, which shows who was missing) into ``RUN_DIR/flight_recorder/rank_<r>``
    rather than node-local /tmp."""
    prefix = str(Path(run_dir).resolve() / FLIGHT_RECORDER_DIR / "rank_")
    return {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_NCCL_TRACE_BUFFER_SIZE": str(FLIGHT_RECORDER_ENTRIES),
            "TORCH_FR_DUMP_TEMP_FILE": prefix, "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix}

log = logging.getLogger("triarch.train")


def report(summary: TrainSummary) -> None:
    """The closing lines rank 0 prints."""
    if summary.stop_reason:
        print(f"stopped at step {summary.steps} ({summary.stop_reason}); the checkpoint is committed; run the same "
              "command to resume", file=sys.stderr)
        return
    if summary.start_step and summary.start_step >= summary.target_steps:  # resumed a finished run
        print(f"nothing to train: the run is at step {summary.start_step} and train.steps is "
              f"{summary.target_steps}; raise train.steps to continue it")
        print(f"run directory: {summary.run_dir}")
        return
    print(f"trained {summary.steps} steps: loss {summary.first_loss:.4f} -> {summary.final_loss:.4f}")
    if summary.first_eval_loss is not None and summary.final_eval_loss is not None:
        ratio = summary.final_eval_loss / summary.first_eval_loss
        print(f"validation loss {summary.first_eval_loss:.4f} at step 0 -> {summary.final_eval_loss:.4f} "
              f"at step {summary.steps} ({ratio:.0%} of step 0)")
    print(f"run directory: {summary.run_dir}")


@dataclass(frozen=True)
class RankOutcome:
    """How one rank ended: its exit code, and why it stopped early (a stop signal) if it did."""

    code: int
    stop_reason: str | None = None


def build_control(cfg: TriarchConfig, run_dir: Path, device: torch.device, stop: StopRequest) -> RunControl:
    """Stop requests, collective timeouts, the host (gloo) group and, when ``fault.hang_timeout_s`` is set,
    the heartbeat watchdog (collective: call it on every rank right after joining the process group)."""
    fault = cfg.fault
    watchdog = None
    if fault.hang_timeout_s > 0:
        watchdog = HangWatchdog(run_dir / HEARTBEAT_DIR, dist.get_rank(), dist.get_world_size(),
                                timeout_s=fault.hang_timeout_s, startup_timeout_s=fault.startup_timeout_s,
                                interval_s=fault.beat_interval_s)
    return RunControl(device, stop=stop, watchdog=watchdog, collective_timeout_s=fault.collective_timeout_s,
                      startup_timeout_s=fault.startup_timeout_s, host_group=host_group())


def run_rank(run_dir: Path, config: Path | None = None) -> int:
    """One rank of a local run (``triarch train``): USR2, Ctrl-C, TERM and HUP are stop requests (every rank
    stops after the same step and saves; a second Ctrl-C, TERM or HUP exits at once); returns the process
    exit code (:mod:`triarch.launcher.exit_codes`)."""
    stop = StopRequest()
    if threading.current_thread() is threading.main_thread():
        stop.install(LOCAL_STOP_SIGNALS)
    try:
        outcome = execute_rank(run_dir, stop, config=config)
    finally:
        stop.uninstall()
    return EXIT_STOPPED if outcome.stop_reason and not outcome.code else outcome.code


def execute_rank(run_dir: Path, stop: StopRequest | None = None, *, config: Path | None = None) -> RankOutcome:
    """Join the process group, train, leave the group; errors every rank agrees on become exit codes.
    Stop signals (USR2) end the run after a committed checkpoint; pass ``stop`` when the caller already
    listens for them. ``config`` is this attempt's resolved config (default ``RUN_DIR/config.yaml``); it
    becomes the run's ``config.yaml`` only once the run is accepted (resume checks passed)."""
    owns_signals = stop is None
    if stop is None:
        stop = StopRequest()
        if threading.current_thread() is threading.main_thread():
            stop.install()
    try:
        return _execute(run_dir, stop, config)
    finally:
        if owns_signals:
            stop.uninstall()


def _execute(run_dir: Path, stop: StopRequest, config: Path | None) -> RankOutcome:
    cfg = load_config(config or run_dir / "config.yaml")
    try:
        device = pick_device(cfg.train.device)
    except ConfigError as err:  # before the process group: every rank that cannot place itself says why
        print(f"error: {err}", file=sys.stderr)
        return RankOutcome(EXIT_CONFIG)
    if device.type == "cuda":
        for key, value in nccl_environment(run_dir).items():
            os.environ.setdefault(key, value)
        (run_dir / FLIGHT_RECORDER_DIR).mkdir(exist_ok=True)
    configure_tf32(device, cfg.train.tf32)
    init_distributed(device, timeout_s=cfg.fault.startup_timeout_s)
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", force=True)
    control = build_control(cfg, run_dir, device, stop).start()
    try:
        summary = train(cfg, run_dir, device, control, publish_config=config is not None)
    except ConfigError as err:  # the layout does not fit this world (e.g. an elastic restart's node count)
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        shutdown_distributed()
        return RankOutcome(EXIT_CONFIG)
    except NonFiniteLossError as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        shutdown_distributed(sync=True)
        return RankOutcome(EXIT_NON_FINITE)
    except CheckpointError as err:  # every rank raises together (the manager agrees first)
        if rank == 0:
            print(f"error: {err}; committed checkpoints are untouched", file=sys.stderr)
        shutdown_distributed(sync=True)
        return RankOutcome(EXIT_CHECKPOINT)
    except AgreedDataError as err:  # every rank raises together, with the lowest failing rank's message
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        shutdown_distributed(sync=True)
        return RankOutcome(EXIT_DATA)
    except DataError as err:  # this rank alone: its exit ends the others through the launcher
        print(f"error: {err}", file=sys.stderr)
        shutdown_distributed()
        return RankOutcome(EXIT_DATA)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            shutdown_distributed()
            raise
        print(f"error: rank {rank} ran out of memory ({_out_of_memory(err)}): the model, micro-batch or "
              "model.max_seq_len does not fit this machine (triarch plan estimates memory per rank)", file=sys.stderr)
        shutdown_distributed()
        return RankOutcome(EXIT_CONFIG)
    except BaseException:
        shutdown_distributed()
        raise
    finally:
        control.close()
    shutdown_distributed(sync=True)
    if rank == 0:
        report(summary)
    return RankOutcome(0, summary.stop_reason)


def _out_of_memory(err: BaseException) -> str:
    """The allocator's own words when ``err`` is an allocation failure (CUDA or CPU), else ''."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, torch.OutOfMemoryError):
        return text.split(". ")[0] + "." if text else "out of memory"
    marker = "can't allocate memory:"
    if marker not in text:
        return ""
    return "tried to allocate" + text.split(marker, 1)[1].split("tried to allocate", 1)[-1].split(". Error")[0]


def main() -> None:
    """``python -m triarch.launcher.rank_main RUN_DIR [CONFIG]`` (started by the local launcher)."""
    die_with_parent()
    config = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    exit_process(run_rank(Path(sys.argv[1]), config))


if __name__ == "__main__":
    main()
