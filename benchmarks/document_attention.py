"""Memory of one attention forward + backward over packed documents: the dense-mask path the model used
before (a bool (batch, 1, seq, seq) block-diagonal causal mask into SDPA) against the document kernel
(``models.document_attention``: per-document causal SDPA on CPU, FlexAttention with a block mask on CUDA).

Per sequence length and path: the bytes autograd saves for backward (distinct storages), and the peak
memory above the inputs: on CPU the peak RSS growth of a fresh subprocess per case (VmHWM reset after the
inputs exist), on CUDA ``torch.cuda.max_memory_allocated`` growth (FlexAttention compiled and warmed up
first). Prints both paths and their ratio per length; the last line is JSON with ``seq``, ``dense_bytes``,
``kernel_bytes``, ``ratio`` (peak memory) and the saved-bytes figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from triarch.models.document_attention import document_attention, documents

PATHS = ("dense", "kernel")
WARMUP_SEQ = 64  # on CPU, one small run first so that lazily loaded kernels do not count as the case's memory


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The dense mask the model built before: bool (batch, 1, seq, seq), same document and causal."""
    ids = (position_ids == 0).cumsum(dim=1)
    seq = position_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]


def attention_fn(path: str) -> Callable[..., torch.Tensor]:
    def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(positions), enable_gqa=True)

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return document_attention(q, k, v, documents(positions))

    return dense if path == "dense" else kernel


def inputs(seq: int, args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    """q, k, v, position ids of one row holding documents of seq/2, seq/4, seq/8, seq/8 tokens."""
    gen = torch.Generator(device).manual_seed(0)
    q = torch.randn(1, args.heads, seq, args.head_dim, device=device, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, args.kv_heads, seq, args.head_dim, device=device, generator=gen, requires_grad=True)
            for _ in range(2))
    lengths = [seq // 2, seq // 4, seq // 8, seq - seq // 2 - seq // 4 - seq // 8]
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    return [q, k, v, positions]


def saved_bytes(run: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd saves while ``run()`` builds its graph, and its output."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(storages.values()), out


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _vm_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_case(path: str, seq: int, args: argparse.Namespace, device: torch.device) -> dict[str, int]:
    """One forward + backward; saved bytes and peak memory growth above the inputs."""
    fn = attention_fn(path)
    warm = inputs(seq if device.type == "cuda" else WARMUP_SEQ, args, device)
    fn(*warm).sum().backward()  # lazy initialization (and on CUDA compilation) outside the measurement
    del warm
    q, k, v, positions = inputs(seq, args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _vm_rss_bytes()
    saved, out = saved_bytes(lambda: fn(q, k, v, positions))
    out.backward(torch.ones_like(out))
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _vm_hwm_bytes() - base
    return {"saved_bytes": saved, "peak_bytes": peak}


def case_in_subprocess(path: str, seq: int, argv: list[str]) -> dict[str, int]:
    cmd = [sys.executable, __file__, *argv, "--case", path, "--seq", str(seq)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def all_cases(seqs: list[int], args: argparse.Namespace, device: torch.device) -> dict[tuple[str, int], dict]:
    """Every (path, seq) case: in this process on CUDA; on CPU a fresh subprocess each, two at a time (the
    figures are per process, so running them side by side changes only the wall time)."""
    if device.type == "cuda":
        return {(path, seq): run_case(path, seq, args, device) for seq in seqs for path in PATHS}
    shape = ["--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim)]
    keys = [(path, seq) for seq in seqs for path in PATHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = pool.map(lambda key: case_in_subprocess(key[0], key[1], shape), keys)
        return dict(zip(keys, results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--case", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.case:
        print(json.dumps(run_case(args.case, args.seq[0], args, device)))
        return
    peak_kind = "max_memory_allocated" if device.type == "cuda" else "peak RSS growth"
    print(f"one attention forward+backward on {device.type}: batch 1, {args.heads} heads, {args.kv_heads} KV heads, "
          f"head_dim {args.head_dim}, 4 documents per row; peak = {peak_kind}")
    figures: dict[str, list] = {key: [] for key in ("seq", "dense_bytes", "kernel_bytes", "ratio",
                                                    "dense_saved_bytes", "kernel_saved_bytes", "saved_ratio")}
    cases = all_cases(args.seq, args, device)
    for seq in args.seq:
        dense, kernel = cases["dense", seq], cases["kernel", seq]
        ratio = dense["peak_bytes"] / max(kernel["peak_bytes"], 1)
        saved_ratio = dense["saved_bytes"] / kernel["saved_bytes"]
        print(f"seq {seq:>6}: peak dense {dense['peak_bytes'] / 2**20:8.1f} MiB, kernel "
              f"{kernel['peak_bytes'] / 2**20:8.1f} MiB, ratio {ratio:6.2f} | saved for backward dense "
              f"{dense['saved_bytes'] / 2**20:8.1f} MiB, kernel {kernel['saved_bytes'] / 2**20:8.1f} MiB, "
              f"ratio {saved_ratio:6.2f}")
        for key, value in (("seq", seq), ("dense_bytes", dense["peak_bytes"]), ("kernel_bytes", kernel["peak_bytes"]),
                           ("ratio", round(ratio, 3)), ("dense_saved_bytes", dense["saved_bytes"]),
                           ("kernel_saved_bytes", kernel["saved_bytes"]), ("saved_ratio", round(saved_ratio, 3))):
            figures[key].append(value)
    figures["device"] = device.type
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
