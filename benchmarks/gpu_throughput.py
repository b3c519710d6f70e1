"""GPU throughput and MFU: triarch's native engine (1 rank, bf16, compiled blocks) against a plain
torch.compile training loop of the same Llama shape, measured in the same process; with megatron-core
installed also the megatron engine (bf16; Transformer Engine's layers when TE imports, megatron's local ones
otherwise).

Default shape: the 886M model (d 2048, 16 layers, 16 heads / 8 KV heads, SwiGLU 5632, vocab 32000,
seq 2048, micro batch 4). ``--small`` runs a tiny shape (for a CPU smoke run). Last line: JSON with
``triarch_tokens_per_s``, ``baseline_tokens_per_s``, ``triarch_mfu``, ``baseline_mfu``, ``ratio``, and
``megatron_tokens_per_s``, ``megatron_mfu``, ``megatron_layers`` ("te" or "local"), ``megatron_vs_native``
when the megatron engine ran, and ``fp8_tokens_per_s``, ``fp8_mfu_of_fp8_peak``, ``fp8_vs_bf16`` for the native
engine at train.precision=fp8 on a GPU with FP8 tensor cores (torchao installed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from triarch.config import ConfigError, load_config, validate_for_world
from triarch.engine.build import build_engine
from triarch.engine.model_args import llama_args
from triarch.launcher.distributed import init_distributed, pick_device, shutdown_distributed
from triarch.models.llama import Llama
from triarch.parallel.topology import Topology
from triarch.training.mfu import device_peak_flops, flops_per_token, mfu

SHAPE_886M = ["model.vocab_size=32000", "model.dim=2048", "model.n_layers=16", "model.n_heads=16",
              "model.n_kv_heads=8", "model.ffn_hidden=5632", "model.seq_len=2048", "model.max_seq_len=2048",
              "train.micro_batch_size=4", "train.global_batch_size=4"]
SHAPE_SMALL = ["model.vocab_size=512", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
               "model.ffn_hidden=128", "model.seq_len=64", "model.max_seq_len=64", "train.micro_batch_size=2",
               "train.global_batch_size=2"]


def _time(step, batches: list[torch.Tensor], warmup: int, device: torch.device) -> float:
    for b in batches[:warmup]:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (len(batches) - warmup)


def baseline_step_time(cfg, batches, warmup, device) -> float:
    model = Llama(llama_args(cfg)).to(device)
    compiled = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")

    def step(b):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = compiled(b[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), b[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time(step, batches, warmup, device)  # the model is freed with this frame


def engine_step_time(cfg, batches, warmup, device) -> float:
    """One rank's ``train_step`` time on the engine ``cfg`` names."""
    cfg = validate_for_world(cfg, 1)
    topo = Topology.build(device, pp=1, dp_replicate=1, dp_shard=1, tp=1)
    engine = build_engine(cfg, topo)
    counter = iter(range(1, 10**9))
    return _time(lambda b: engine.train_step(b[:, :-1], b[:, 1:], step=next(counter)), batches, warmup, device)


def megatron_step_time(cfg, batches, warmup, device) -> float | None:
    """The megatron engine's step time (no torch.compile: megatron's own kernels), or None without megatron-core."""
    import importlib.util

    if importlib.util.find_spec("megatron") is None:
        return None
    train = cfg.train.model_copy(update={"compile": False})
    return engine_step_time(cfg.model_copy(update={"engine": "megatron", "train": train}), batches, warmup, device)


def fp8_step_time(cfg, batches, warmup, device) -> float | None:
    """The native engine's step time at train.precision=fp8 (torchao float8 block matmuls, compiled), or None
    where FP8 tensor cores (compute capability 8.9+) or torchao are missing."""
    import importlib.util

    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return None
    if importlib.util.find_spec("torchao") is None:
        return None
    train = cfg.train.model_copy(update={"precision": "fp8"})
    return engine_step_time(cfg.model_copy(update={"train": train}), batches, warmup, device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    args = parser.parse_args()
    if args.steps < 2:
        sys.exit(f"error: --steps ({args.steps}) must be at least 2 (one warm-up step and one timed)")
    args.warmup = max(1, min(args.warmup, args.steps - 1))  # a smoke run (--steps 3) still times a step
    device = pick_device("auto")  # cuda:LOCAL_RANK (an index init_process_group accepts), else the CPU
    shape = SHAPE_SMALL if args.small else SHAPE_886M
    cfg = load_config(None, [*shape, "train.precision=bf16", "train.compile=true", "train.warmup_steps=0",
                             f"train.steps={args.steps}"])
    init_distributed(device)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len + 1),
                             generator=gen).to(device) for _ in range(args.steps)]
    tokens = cfg.train.micro_batch_size * cfg.model.seq_len
    peak = device_peak_flops(device, "bf16")
    fpt = flops_per_token(cfg.model)
    base = tokens / baseline_step_time(cfg, batches, args.warmup, device)
    tri = tokens / engine_step_time(cfg, batches, args.warmup, device)
    megatron_time = megatron_step_time(cfg, batches, args.warmup, device)
    fp8_time = fp8_step_time(cfg, batches, args.warmup, device)
    shutdown_distributed()
    base_mfu, tri_mfu = mfu(base, fpt, peak, 1), mfu(tri, fpt, peak, 1)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, peak {peak.flops:.3g} FLOP/s ({peak.source})")
    print(f"plain torch.compile baseline: {base:,.0f} tokens/s, MFU {base_mfu:.1%}")
    print(f"triarch native engine:        {tri:,.0f} tokens/s, MFU {tri_mfu:.1%}")
    print(f"ratio triarch / baseline: {tri / base:.3f}")
    result = {"triarch_tokens_per_s": round(tri, 1), "baseline_tokens_per_s": round(base, 1),
              "triarch_mfu": round(tri_mfu, 4), "baseline_mfu": round(base_mfu, 4), "ratio": round(tri / base, 4)}
    if megatron_time is not None:
        from triarch.engine.megatron_model import uses_transformer_engine

        meg = tokens / megatron_time
        meg_mfu = mfu(meg, fpt, peak, 1)
        layers = "te" if uses_transformer_engine(device) else "local"
        print(f"triarch megatron engine ({layers} layers): {meg:,.0f} tokens/s, MFU {meg_mfu:.1%}; "
              f"megatron / native {meg / tri:.3f}")
        result.update({"megatron_tokens_per_s": round(meg, 1), "megatron_mfu": round(meg_mfu, 4),
                       "megatron_layers": layers, "megatron_vs_native": round(meg / tri, 4)})
    if fp8_time is not None:
        fp8 = tokens / fp8_time
        fp8_peak = device_peak_flops(device, "fp8")
        print(f"triarch native engine, fp8 (torchao tensorwise): {fp8:,.0f} tokens/s, MFU {mfu(fp8, fpt, peak, 1):.1%} "
              f"of the bf16 peak, {mfu(fp8, fpt, fp8_peak, 1):.1%} of the fp8 peak; fp8 / bf16 {fp8 / tri:.3f}")
        result.update({"fp8_tokens_per_s": round(fp8, 1), "fp8_mfu_of_fp8_peak": round(mfu(fp8, fpt, fp8_peak, 1), 4),
                       "fp8_vs_bf16": round(fp8 / tri, 4)})
    print(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # e.g. a LOCAL_RANK without a GPU: one line, not a traceback
        sys.exit(f"error: {err}")
