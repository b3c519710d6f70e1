"""FP8 against bf16 matmuls on this device: ``torch._scaled_mm`` (e4m3 operands, one scale each, bf16 out; what
train.precision=fp8 runs through torchao) against a bf16 ``@``, measured in the same run on the block GEMM shapes
of the tiny model (tokens x dim x ffn) and, with ``--large``, of the 886M model.

On CPU torch's float8 matmul is a reference kernel: the ratio says how much slower it is (the native engine
warns when fp8 runs on CPU). On a GPU with FP8 tensor cores the ratio is the speed-up. Last line: JSON with the
shapes and ``fp8_over_bf16`` per shape (time ratio; > 1 means fp8 is slower).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

TINY = [(1024, 192, 512), (1024, 512, 192)]  # 8 x 128 tokens; dim 192, ffn 512 (examples/tiny.yaml)
LARGE = [(8192, 2048, 5632), (8192, 5632, 2048)]  # 4 x 2048 tokens; the 886M model


def _best_time(fn, repeats: int, device: torch.device) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", action="store_true", help="also the 886M model's shapes (GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for m, k, n in TINY + (LARGE if args.large else []):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=gen).to(device)
        w = torch.randn(n, k, generator=gen).to(device)
        x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        xb, wb = x.bfloat16(), w.bfloat16()
        fp8 = _best_time(lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                         args.repeats, device)
        bf16 = _best_time(lambda: xb @ wb.t(), args.repeats, device)
        flops = 2 * m * k * n
        rows.append({"shape": [m, k, n], "fp8_gflops": round(flops / fp8 / 1e9, 3),
                     "bf16_gflops": round(flops / bf16 / 1e9, 3), "fp8_over_bf16": round(fp8 / bf16, 2)})
        print(f"{m}x{k}x{n}: fp8 {flops / fp8 / 1e9:10.3f} GFLOP/s   bf16 {flops / bf16 / 1e9:10.3f} GFLOP/s   "
              f"fp8 time / bf16 time {fp8 / bf16:8.2f}")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(json.dumps({"device": name, "shapes": rows}))


if __name__ == "__main__":
    main()
