"""Framework overhead: ``triarch train`` (1 rank, CPU, tiny model, data loading included) against a plain
PyTorch loop over the same model, batch shape and tokens held in memory, measured in the same run.

Both sides run in fresh subprocesses with the same thread count, alternating, several rounds; each side's
figure is the median steady-state tokens/s (first steps dropped). Last line: JSON with
``triarch_tokens_per_s``, ``plain_tokens_per_s`` and ``ratio`` (goal >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "tiny.yaml"
COMMON = ["train.micro_batch_size=16", "train.global_batch_size=16", "train.eval_interval=0",
          "logging.progress=off", "logging.tensorboard=false", "train.warmup_steps=5"]


def run_triarch(data: Path, steps: int, work: Path) -> float:
    run_dir = work / f"run-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "triarch.cli", "train", str(CONFIG), "--nproc", "1", "--run-dir", str(run_dir),
           f"data.path={data}", f"train.steps={steps}", "logging.log_interval=1", *COMMON]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in records if "loss" in r][steps // 5:]
    tokens = 16 * _seq_len()
    return tokens / statistics.median(times)


def run_plain(data: Path, steps: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--plain", str(data), "--steps", str(steps)], check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def _seq_len() -> int:
    from triarch.config import load_config

    return load_config(CONFIG).model.seq_len


def plain_loop(data: Path, steps: int) -> float:
    """The reference: the same Llama, AdamW and clipping, batches pre-gathered into memory."""
    import torch
    import torch.nn.functional as F

    from triarch.config import load_config
    from triarch.data_pipeline import TokenStream
    from triarch.engine.model_args import llama_args
    from triarch.models.llama import Llama

    cfg = load_config(CONFIG, [f"data.path={data}", *COMMON])
    torch.manual_seed(cfg.train.seed)
    stream = TokenStream(data, cfg.data.train_split, cfg.model.seq_len, global_batch_size=16, seed=cfg.train.seed,
                         shuffle_block=cfg.data.shuffle_block, verify="off")  # the trainer's batches
    batches = [stream.batch_for_step(i) for i in range(steps)]  # all in memory before timing
    model = Llama(llama_args(cfg))
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                            foreach=True)
    times = []
    for batch in batches:
        start = time.perf_counter()
        logits = model(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return 16 * cfg.model.seq_len / statistics.median(times[steps // 5:])


def ensure_data(path: Path) -> Path:
    from triarch.data_pipeline import prepare_pydocs

    from triarch.config import load_config

    return prepare_pydocs(path, load_config(CONFIG).model.vocab_size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "pydocs")
    parser.add_argument("--plain", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if args.plain is not None:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        print(plain_loop(args.plain, args.steps))
        return
    data = ensure_data(args.data)
    triarch_runs, plain_runs = [], []
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.rounds):
            triarch_runs.append(run_triarch(data, args.steps, Path(work)))
            plain_runs.append(run_plain(data, args.steps))
    tri, plain = statistics.median(triarch_runs), statistics.median(plain_runs)
    print(f"triarch train (1 rank, data loading included): {tri:,.0f} tokens/s  runs {[round(x) for x in triarch_runs]}")
    print(f"plain PyTorch loop (same model, data in memory): {plain:,.0f} tokens/s  runs {[round(x) for x in plain_runs]}")
    print(f"ratio triarch / plain: {tri / plain:.3f} (goal >= 0.95)")
    print(json.dumps({"triarch_tokens_per_s": round(tri, 1), "plain_tokens_per_s": round(plain, 1),
                      "ratio": round(tri / plain, 4)}))


if __name__ == "__main__":
    main()
