"""Step time of CPU ranks that share the cores (``launcher.cpu_threads``: each of N local ranks gets cores / N
torch threads) against the same ranks oversubscribed (each with every core, torch's default), in one run.

The workload is the test suite's most common shape: 4 tensor-parallel ranks of a small Llama (``tests/
plan_worker.py``: one step to build and warm, then ``--steps`` timed steps). The oversubscribed arm sets
OMP_NUM_THREADS to the number of cores, which ``configure_threads`` leaves alone. Rounds alternate the two
arms; the table shows each round and the ratio of the medians, the JSON last line the figures.

    python benchmarks/rank_threads.py [--nproc 4 --steps 2 --rounds 1]   (about 3 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from plan_worker import TIMED_STEPS_ENV  # noqa: E402

from triarch.launcher.local import launch_local  # noqa: E402

SHAPE = ["model.dim=256", "model.ffn_hidden=768", "model.vocab_size=2000", "model.seq_len=128", "model.max_seq_len=128"]


def step_seconds(nproc: int, threads: int | None) -> float:
    """Mean timed step of the slowest rank; ``threads``: OMP_NUM_THREADS of every rank (None: shared)."""
    saved = os.environ.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        with tempfile.TemporaryDirectory() as out:
            launch_local(nproc, [str(ROOT / "tests" / "plan_worker.py"), out, *SHAPE, f"parallel.tp={nproc}"])
            return max(json.loads((Path(out) / f"rank{r}.json").read_text())["step_s"] for r in range(nproc))
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    os.environ[TIMED_STEPS_ENV] = str(args.steps)
    shared, oversubscribed = [], []
    for i in range(args.rounds):
        shared.append(step_seconds(args.nproc, None))
        oversubscribed.append(step_seconds(args.nproc, cores))
        print(f"round {i + 1}: shared ({max(1, cores // args.nproc)} threads/rank) {shared[-1]:.3f} s/step, "
              f"oversubscribed ({cores} threads/rank) {oversubscribed[-1]:.3f} s/step", flush=True)
    ratio = statistics.median(oversubscribed) / statistics.median(shared)
    print(f"{args.nproc} tp ranks on {cores} cores: oversubscribed / shared step time = {ratio:.2f} "
          f"(reference: the shared arm, same run)")
    print(json.dumps({"nproc": args.nproc, "cores": cores, "steps": args.steps, "shared_s": shared,
                      "oversubscribed_s": oversubscribed, "oversubscribed_over_shared": ratio}))


if __name__ == "__main__":
    main()
