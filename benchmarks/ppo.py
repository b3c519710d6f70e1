"""One PPO iteration's time split: generate / score (reward model) / reference / values / train, on 1 rank
(CPU), the tiny example's model (examples/tiny_ppo.yaml) on the synthetic preference prompts.

Builds its own inputs in a temporary folder: the synthetic preference set and a reward model (2 steps of
``triarch rm``: its scores are not meaningful, its cost is). Then ``triarch ppo`` runs ``--iterations``
iterations; each phase's figure is the median over the iterations after the first (warm-up), and every
fraction is measured against the same iteration's total, in the same run. Last line: JSON with
``generate_fraction``, ``iteration_s``, ``tokens_per_s`` (rollout rows x seq_len per second of iteration)
and each phase's fraction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("generate_s", "score_s", "reference_s", "values_s", "train_s")
QUIET = ["logging.progress=off", "logging.tensorboard=false", "logging.log_interval=1"]


def triarch(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "triarch.cli", *args], check=True, capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=6)
    args = parser.parse_args()
    from triarch.data_pipeline.prepare.synthetic_preferences import make_synthetic_preferences

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "prefs"
        make_synthetic_preferences(data, seed=0, pairs=400, eval_fraction=0.1)
        triarch("rm", str(ROOT / "examples" / "tiny_rm.yaml"), "--run-dir", str(work / "rm"), f"data.path={data}",
                "train.steps=2", "train.warmup_steps=0", "train.eval_interval=0", "checkpoint.interval=2", *QUIET)
        run = work / "ppo"
        triarch("ppo", str(ROOT / "examples" / "tiny_ppo.yaml"), "--run-dir", str(run), f"data.path={data}",
                f"reward.model={work / 'rm'}", f"train.steps={args.iterations}", "checkpoint.interval=0", *QUIET)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "generate_s" in r][1:]
    iteration = statistics.median(r["iteration_s"] for r in rows)
    fractions = {p.removesuffix("_s") + "_fraction": statistics.median(r[p] / r["iteration_s"] for r in rows)
                 for p in PHASES}
    result = {"iteration_s": iteration, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
              "generated_tokens_per_s": statistics.median(r["generated_tokens"] / r["generate_s"] for r in rows),
              **fractions, "iterations_measured": len(rows),
              "reference": "each phase against the same iteration's total time, median over iterations 2.."}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
