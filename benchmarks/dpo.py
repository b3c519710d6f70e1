"""DPO throughput: ``triarch dpo`` (1 rank, CPU, tiny model, reference log-probs precomputed, data loading
included) against a plain PyTorch DPO loop over the same model, pairs, reference values and hyperparameters,
measured in the same run.

Both sides run in fresh subprocesses with the same thread count, alternating, several rounds; each side's
figure is the median steady-state pairs/s (first fifth of the steps dropped). The plain loop holds its batches
and the reference log-probs in memory and computes sequence log-probs with log_softmax + gather. Last line:
JSON with ``triarch_pairs_per_s``, ``plain_pairs_per_s`` and ``ratio`` (goal >= 0.95).
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
CONFIG = ROOT / "examples" / "tiny_dpo.yaml"
PAIRS = 16
# a DPO learning rate (the tiny example's 5e-4 saturates the loss within these steps, and saturated
# sigmoids make denormal gradients, whose CPU cost would then dominate both sides' timings)
COMMON = [f"train.micro_batch_size={PAIRS}", f"train.global_batch_size={PAIRS}", "train.eval_interval=0",
          "checkpoint.interval=0", "logging.progress=off", "logging.tensorboard=false", "train.warmup_steps=5",
          "train.lr=1.0e-5", "objective.reference=precompute"]


def run_triarch(data: Path, steps: int, work: Path) -> float:
    run_dir = work / f"run-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "triarch.cli", "dpo", str(CONFIG), "--nproc", "1", "--run-dir", str(run_dir),
           f"data.path={data}", f"train.steps={steps}", "logging.log_interval=1", *COMMON]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in records if "loss" in r][steps // 5:]
    return PAIRS / statistics.median(times)


def run_plain(data: Path, steps: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--plain", str(data), "--steps", str(steps)], check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def plain_loop(data: Path, steps: int) -> float:
    """The reference: the same Llama, pairs, reference values, AdamW, clipping and DPO loss, written plainly."""
    import torch
    import torch.nn.functional as F

    from triarch.config import load_config
    from triarch.data_pipeline.stream.preferences import PreferenceStream
    from triarch.engine.model_args import llama_args
    from triarch.models.llama import Llama
    from triarch.parallel.init import full_init_value

    cfg = load_config(CONFIG, [f"data.path={data}", *COMMON])
    torch.manual_seed(cfg.train.seed)
    stream = PreferenceStream(data, "train", cfg.model.seq_len, global_batch_size=PAIRS, seed=cfg.train.seed,
                              dp_rank=0, dp_size=1)
    batches = [stream.batch_for_step(i) for i in range(steps)]  # all in memory before timing
    model = Llama(llama_args(cfg))
    with torch.no_grad():  # triarch's initial weights, so both sides follow the same trajectory
        for name, param in model.named_parameters():
            param.copy_(full_init_value(name, param.shape, seed=cfg.train.seed, std=cfg.model.init_std,
                                        n_layers=cfg.model.n_layers))

    def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mask = labels != -100
        picked = torch.gather(logits.float().log_softmax(-1), 2, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (picked * mask).sum(-1)

    with torch.no_grad():  # the reference values, computed before timing (as triarch's precompute does)
        references = [sequence_logps(model(b["input_ids"]), b["labels"]).view(-1, 2) for b in batches]
    t, beta = cfg.train, cfg.objective.beta
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=True)
    times = []
    for batch, ref in zip(batches, references):
        start = time.perf_counter()
        logps = sequence_logps(model(batch["input_ids"]), batch["labels"]).view(-1, 2)
        h = (logps[:, 0] - logps[:, 1]) - (ref[:, 0] - ref[:, 1])
        loss = -F.logsigmoid(beta * h).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return PAIRS / statistics.median(times[steps // 5:])


def ensure_data(path: Path) -> Path:
    if not (path / "train" / "manifest.json").is_file():
        from triarch.data_pipeline.prepare.synthetic_preferences import make_synthetic_preferences

        make_synthetic_preferences(path, seed=0, pairs=1000, eval_fraction=0.1, max_len=128)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "preferences-bench")
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
    print(f"triarch dpo (1 rank, reference precomputed, data loading included): {tri:,.2f} pairs/s  "
          f"runs {[round(x, 2) for x in triarch_runs]}")
    print(f"plain PyTorch DPO loop (same model and pairs, data in memory): {plain:,.2f} pairs/s  "
          f"runs {[round(x, 2) for x in plain_runs]}")
    print(f"ratio triarch / plain: {tri / plain:.3f} (goal >= 0.95)")
    print(json.dumps({"triarch_pairs_per_s": round(tri, 3), "plain_pairs_per_s": round(plain, 3),
                      "ratio": round(tri / plain, 4)}))


if __name__ == "__main__":
    main()
