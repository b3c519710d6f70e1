"""``triarch ckpt`` subcommands: list, verify, inspect, export, import (no process group needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

from triarch.checkpointing.commit import CheckpointError, read_commit, verify, verify_files
from triarch.checkpointing.hf_import import import_hf
from triarch.checkpointing.hf_io import export_hf, pick_step
from triarch.checkpointing.manager import list_steps
from triarch.checkpointing.offline import tensor_metadata


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_run(run_dir: Path) -> int:
    steps = list_steps(run_dir / "checkpoints")
    if not steps:
        raise CheckpointError(f"{run_dir} has no checkpoints folder with steps")
    print(f"{'step':>8}  {'state':<12} {'size':>10}  layout")
    for info in steps:
        commit = read_commit(info.path) or {}
        state, problem = ("committed", "") if info.committed else ("UNCOMMITTED", "")
        if info.committed:  # sizes only (fast): `ckpt verify` checks every byte
            try:
                verify_files(info.path, commit.get("files", {}), hashes=False)
            except CheckpointError as err:
                state, problem = "DAMAGED", f"  ({err})"
        print(f"{info.step:>8}  {state:<12} {_size(info.path) / 2**20:>8.1f} MB  {commit.get('layout', '-')}{problem}")
    return 0


def verify_run(run_dir: Path, step: int | None) -> int:
    info = pick_step(run_dir, step)
    verify(info.path)
    print(f"{info.path}: every file matches its size and sha256")
    return 0


def inspect_run(run_dir: Path, step: int | None) -> int:
    info = pick_step(run_dir, step)
    for name, meta in sorted(tensor_metadata(info.path).items()):
        print(f"{name:<60} {str(tuple(meta.size)):<20} {str(meta.properties.dtype).removeprefix('torch.')}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch one ``triarch ckpt`` subcommand."""
    if args.ckpt_command == "list":
        return list_run(args.run_dir)
    if args.ckpt_command == "verify":
        return verify_run(args.run_dir, args.step)
    if args.ckpt_command == "inspect":
        return inspect_run(args.run_dir, args.step)
    if args.ckpt_command == "export":
        out = export_hf(args.run_dir, args.hf, step=args.step, dtype=args.dtype, force=args.force,
                        pad_id=getattr(args, "pad_id", None))
        print(f"exported to {out}")
        return 0
    if args.deepspeed is not None:
        from triarch.checkpointing.deepspeed_import import import_deepspeed

        step_dir = import_deepspeed(args.deepspeed, args.run_dir)
    else:
        step_dir = import_hf(args.hf, args.run_dir)
    print(f"imported into {step_dir}; continue with: triarch train {args.run_dir / 'config.yaml'} "
          f"--run-dir {args.run_dir} data.path=...")
    return 0
