"""One rank of ``triarch generate``: ``python -m triarch.launcher.generate_main JOB.json`` (started by the
local launcher; one rank runs :func:`run_job` in the command's own process).

The job file (written by ``launcher.generate_job``) holds the checked config, the weights (an
``init.from`` spec: a step folder or ``hf:PATH``), the prompts as token ids, the sampling settings and
where rank 0 writes the results. The engine is built for the config's layout without optimizer state
(``trainable=False``), loads the weights into its own shards, and each data-parallel rank continues an
equal, contiguous share of the prompts (the last prompt repeated to fill the last share; the copies are
dropped), ``batch_size`` prompts per call. Sampling is keyed by each prompt's global index, so the tokens
do not depend on the layout or the batching. Rank 0 writes ``{"completions": [[ids], ...],
"generate_s": seconds}`` (temp file + rename).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from triarch.checkpointing.commit import CheckpointError
from triarch.config import ConfigError, TriarchConfig
from triarch.data_pipeline.errors import DataError
from triarch.launcher import exit_codes
from triarch.launcher.distributed import exit_process, init_distributed, pick_device, shutdown_distributed

INTERRUPTED = 130


def _generate(cfg: TriarchConfig, device: torch.device, job: dict[str, Any]) -> dict[str, Any]:
    """Build, load, generate this rank's share; every rank returns the completions of all prompts."""
    from triarch.checkpointing.init_from import load_initial_weights
    from triarch.engine.build import build_engine
    from triarch.engine.generation import SamplingParams
    from triarch.parallel.topology import Topology

    p = cfg.parallel
    topo = Topology.build(device, pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp)
    engine = build_engine(cfg, topo, trainable=False)
    load_initial_weights(engine, job["weights"], topo.host_group)
    prompts: list[list[int]] = job["prompts"]
    share = -(-len(prompts) // topo.dp)
    padded = prompts + [prompts[-1]] * (share * topo.dp - len(prompts))
    first = topo.dp_rank * share
    params = SamplingParams(**job["sampling"])
    batch = max(1, int(job["batch_size"]))
    dist.barrier(group=topo.host_group)
    start = time.perf_counter()
    mine: list[list[int]] = []
    for lo in range(first, first + share, batch):
        hi = min(lo + batch, first + share)
        mine += engine.generate(padded[lo:hi], params, torch.arange(lo, hi)).completions()
    elapsed = time.perf_counter() - start
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (topo.dp_rank, mine, elapsed), group=topo.host_group)
    by_dp = {dp: rows for dp, rows, _ in everyone}
    completions = [row for dp in range(topo.dp) for row in by_dp[dp]][:len(prompts)]
    return {"completions": completions, "generate_s": max(e for _, _, e in everyone)}


def _write(results: dict[str, Any], path: Path) -> None:
    from triarch.data_pipeline.fileio import replace_atomically, temp_path

    tmp = temp_path(path)
    tmp.write_text(json.dumps(results))
    replace_atomically(tmp, path)


def run_job(path: Path) -> int:
    """Run one rank of the job in ``path``; returns the exit code (2 for an error every rank agrees on, after
    rank 0 printed it)."""
    from triarch.training.precision import configure_tf32

    job = json.loads(Path(path).read_text())
    cfg = TriarchConfig.model_validate(job["config"])
    try:
        device = pick_device(cfg.train.device)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_codes.CONFIG
    configure_tf32(device, cfg.train.tf32)
    init_distributed(device, timeout_s=cfg.fault.startup_timeout_s)
    try:
        with torch.no_grad():
            results = _generate(cfg, device, job)
    except (ConfigError, CheckpointError, DataError) as err:  # agreed: the same job on every rank
        if dist.get_rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        shutdown_distributed()
        return exit_codes.CONFIG
    except BaseException:
        shutdown_distributed()
        raise
    if dist.get_rank() == 0:
        _write(results, Path(job["results"]))
    shutdown_distributed(sync=True)
    return exit_codes.OK


def _interrupted(signum: int, frame: object) -> None:
    """Ctrl-C (the terminal's INT, or the launcher's USR2): end quietly; nothing was written."""
    if os.environ.get("RANK", "0") == "0":
        print("interrupted; no completions written", file=sys.stderr)
    sys.stderr.flush()
    os._exit(INTERRUPTED)


def main() -> None:
    from triarch.launcher.parent_watch import die_with_parent

    die_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, _interrupted)
    exit_process(run_job(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
