"""Entry point of one rank: ``python -m triarch.launcher.rank_main RUN_DIR`` (reads RUN_DIR/config.yaml)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from triarch.checkpointing.commit import CheckpointError
from triarch.config import load_config
from triarch.engine.native import NonFiniteLossError
from triarch.launcher.distributed import init_distributed, pick_device, shutdown_distributed
from triarch.training.trainer import TrainSummary, train

EXIT_NON_FINITE = 3
EXIT_CHECKPOINT = 4

log = logging.getLogger("triarch.train")


def configure_threads(device: torch.device) -> None:
    """Share the CPU cores among the local ranks instead of oversubscribing them."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def report(summary: TrainSummary) -> None:
    """The closing lines rank 0 prints."""
    print(f"trained {summary.steps} steps: loss {summary.first_loss:.4f} -> {summary.final_loss:.4f}")
    if summary.first_eval_loss is not None and summary.final_eval_loss is not None:
        ratio = summary.final_eval_loss / summary.first_eval_loss
        print(f"validation loss {summary.first_eval_loss:.4f} at step 0 -> {summary.final_eval_loss:.4f} "
              f"at step {summary.steps} ({ratio:.0%} of step 0)")
    print(f"run directory: {summary.run_dir}")


def run_rank(run_dir: Path) -> int:
    """Train with the resolved config of ``run_dir``; returns the process exit code."""
    cfg = load_config(run_dir / "config.yaml")
    device = pick_device(cfg.train.device)
    configure_threads(device)
    init_distributed(device)
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", force=True)
    try:
        summary = train(cfg, run_dir, device)
    except NonFiniteLossError as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        shutdown_distributed(sync=True)
        return EXIT_NON_FINITE
    except CheckpointError as err:  # every rank raises together (the manager agrees first)
        if rank == 0:
            print(f"error: {err}; committed checkpoints are untouched", file=sys.stderr)
        shutdown_distributed(sync=True)
        return EXIT_CHECKPOINT
    except BaseException:
        shutdown_distributed()
        raise
    shutdown_distributed(sync=True)
    if rank == 0:
        report(summary)
    return 0


def main() -> None:
    sys.exit(run_rank(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
