"""Tokens/s of the trainer's default data path (TokenStream batches) against the same batches through the
DALI stage (``data.loader: dali``; CPU pipeline here, GPU where CUDA exists), in one run, same tokens.

The default stays whichever is faster: the ratio ``dali_vs_default`` is printed with both figures, and the
last line is JSON. Shapes: the tiny demo's (T=128, G=16) and a training shape (T=2048, G=8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_loader import write_synthetic_folder  # noqa: E402  (same synthetic token set as data_loader.py)

from triarch.data_pipeline.stream import TokenStream  # noqa: E402
from triarch.data_pipeline.stream.dali_stage import DaliStage  # noqa: E402


def tokens_per_s(make: Callable[[], Iterable[dict[str, torch.Tensor]]], repeats: int) -> float:
    """Median tokens/s over ``repeats`` full passes (each pass consumes every batch, touching its tensors)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = 0
        for batch in make():
            tokens += int(batch["input_ids"].numel())
            batch["labels"].sum()  # the consumer reads what it was given
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def compare(folder: Path, seq_len: int, batch: int, steps: int, repeats: int, device: str) -> dict[str, float]:
    def stream_batches() -> Iterable[dict[str, torch.Tensor]]:
        stream = TokenStream(str(folder), "train", seq_len, global_batch_size=batch, seed=0)
        return stream.batches(min(steps, stream.windows_per_epoch[0] // batch))

    default = tokens_per_s(stream_batches, repeats)
    dali = tokens_per_s(lambda: DaliStage(iter(stream_batches()), device=device), repeats)
    print(f"T={seq_len} G={batch}: default {default / 1e6:,.1f} M tokens/s, through DALI ({device}) "
          f"{dali / 1e6:,.1f} M tokens/s, dali_vs_default {dali / default:.3f}")
    return {"seq_len": seq_len, "batch": batch, "default_tokens_per_s": round(default),
            "dali_tokens_per_s": round(dali), "dali_vs_default": round(dali / default, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16 << 20)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "gpu" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as work:
        folder = write_synthetic_folder(Path(work) / "tokens", args.tokens, seed=0)
        results = [compare(folder, 128, 16, args.steps, args.repeats, device),
                   compare(folder, 2048, 8, args.steps, args.repeats, device)]
    faster = "dali" if all(r["dali_vs_default"] > 1 for r in results) else "default"
    print(f"faster path: {faster} (data.loader default stays 'default' unless DALI wins at every shape)")
    print(json.dumps({"device": device, "faster": faster, "shapes": results}))


if __name__ == "__main__":
    main()
