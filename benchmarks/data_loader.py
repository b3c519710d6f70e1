"""Data pipeline figures, each against its reference in the same run and on the same tokens.

1. Loader tokens/s: ``TokenStream`` (shuffled, packed, batches of the training shape, 0 workers: the
   trainer's path) against (a) the floor, a plain numpy memmap reader in Megatron's indexed-dataset style
   (one flat uint32 token file plus the same list of shuffled window starts, fancy-index gather into a
   LongTensor), and (b) Hugging Face ``datasets`` the way its Trainer consumes data (the same T + 1 token
   rows saved with ``save_to_disk``, loaded, ``with_format("torch")``, a shuffled torch ``DataLoader`` of
   the same batch size). All three hand out the same ``input_ids`` / ``labels`` LongTensors per step.
2. Prepare throughput: triarch's prepare pipeline (what ``triarch prepare`` runs, 2 tokenizer threads in
   one process) on the stdlib docstrings with a BPE trained on them, against
   ``Dataset.from_dict(...).map(batched=True, num_proc=2)`` (2 processes) with the same ``tokenizers``
   tokenizer (ids + EOS) on the same text. ``TOKENIZERS_PARALLELISM=false``: each side uses 2 cores.
3. Data wait: the trainer's per-step data time at the tiny demo's shape over the tiny demo's measured step
   time (``examples/tiny.yaml`` model, one rank, ``NativeEngine.train_step``).
4. Peak RSS of a fresh process streaming a whole epoch of a ~2 GB synthetic token set at T=2048.

Synthetic token sets are written directly in the prepared-folder format (Arrow shards of 1M tokens in
record batches of 64K, manifest through ``write_manifest``) under ``runs/`` (or ``--tmp``) and removed at
the end. Last line: JSON with ``vs_memmap`` (goal >= 0.8), ``vs_hf_datasets`` (goal >= 3),
``prepare_vs_hf`` (goal >= 1), ``peak_rss_mb`` (goal <= 300), ``data_wait_fraction`` (goal < 0.01).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from triarch.data_pipeline.manifest import FORMAT_NAME, FORMAT_VERSION, write_manifest
from triarch.data_pipeline.shard_format import SCHEMA
from triarch.data_pipeline.stream import TokenStream

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
EOS = 0
VOCAB = 2048  # the tiny demo's vocabulary, so its train_step can consume the same batches
SHARD_TOKENS = 1 << 20  # the prepare defaults
BATCH_TOKENS = 1 << 16
Batch = dict[str, torch.Tensor]


# --- synthetic prepared folders ---------------------------------------------------------------------------


def _shard_bytes(rng: np.random.Generator, budget: int) -> tuple[bytes, list[int], int, int]:
    """One shard of random documents (8..1023 tokens, EOS last) closing at the first document end at or past
    ``budget``, record batches likewise at ``BATCH_TOKENS``: (IPC file bytes, batch tokens, docs, max id)."""
    lengths = rng.integers(8, 1024, budget // 500 + 64)
    while lengths.sum() < budget:
        lengths = np.concatenate([lengths, rng.integers(8, 1024, 64)])
    ends = np.cumsum(lengths)
    docs = int(np.searchsorted(ends, budget)) + 1
    ends = ends[:docs]
    tokens = rng.integers(1, VOCAB, int(ends[-1]), dtype=np.uint32)
    tokens[ends - 1] = EOS
    sink = pa.BufferOutputStream()
    counts = []
    with pa.ipc.new_file(sink, SCHEMA) as writer:
        first, base = 0, 0
        while first < docs:
            last = min(docs, int(np.searchsorted(ends, base + BATCH_TOKENS)) + 1)
            offsets = np.concatenate([[0], ends[first:last] - base]).astype(np.int32)
            column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens[base:ends[last - 1]]))
            writer.write_batch(pa.record_batch([column], schema=SCHEMA))
            counts.append(int(ends[last - 1] - base))
            first, base = last, int(ends[last - 1])
    return sink.getvalue().to_pybytes(), counts, docs, int(tokens.max())


def write_synthetic_folder(root: Path, total_tokens: int, seed: int = 0) -> Path:
    """A prepared folder (split ``train``) of about ``total_tokens`` random tokens; returns ``root``."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    tokenizer = root / "tokenizer.json"
    tokenizer.write_text('{"synthetic": true}\n')
    entries, written = [], 0
    while written < total_tokens:
        data, counts, docs, max_id = _shard_bytes(rng, min(SHARD_TOKENS, total_tokens - written))
        path = root / "train" / f"shard_{len(entries):05d}.arrow"
        path.write_bytes(data)
        entries.append({"file": path.relative_to(root).as_posix(), "documents": docs, "tokens": sum(counts),
                        "max_token_id": max_id, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                        "batch_tokens": counts})
        written += sum(counts)
    documents = sum(e["documents"] for e in entries)
    write_manifest(root, {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "dtype": "uint32", "shard_tokens": SHARD_TOKENS,
        "record_batch_tokens": BATCH_TOKENS,
        "tokenizer": {"file": tokenizer.name, "sha256": hashlib.sha256(tokenizer.read_bytes()).hexdigest(),
                      "vocab_size": VOCAB, "eos_id": EOS, "model": "synthetic"},
        "source": {"name": "synthetic", "seed": seed}, "sources": [],
        "split": {"method": "given", "validation_fraction": None},
        "splits": {"train": {"documents": documents, "tokens": written, "source_sha256": "synthetic",
                             "shards": entries}},
        "bad_documents": {}, "totals": {"documents": documents, "tokens": written, "bad_documents": 0}})
    return root


# --- 1. loader throughput ---------------------------------------------------------------------------------


def _split(rows: np.ndarray) -> Batch:
    """``input_ids`` / ``labels`` LongTensors of rows of T + 1 tokens (what every reader hands out)."""
    return {"input_ids": torch.from_numpy(np.ascontiguousarray(rows[:, :-1], dtype=np.int64)),
            "labels": torch.from_numpy(np.ascontiguousarray(rows[:, 1:], dtype=np.int64))}


def build_memmap(folder: Path, stream: TokenStream, steps: int, out: Path) -> tuple[Path, np.ndarray]:
    """Megatron-style reference data: epoch 0's shards concatenated into one flat uint32 file, and the start
    offset of every window the stream hands out in ``steps`` steps (the same shuffled order)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    with open(out, "wb") as f:
        for shard in stream.shard_order(0).tolist():
            table = pa.ipc.open_file(str(folder / shards[shard]["file"])).read_all()
            chunks = table.column("tokens").chunks
            f.writelines(np.asarray(chunk.flatten(), dtype=np.uint32).tobytes() for chunk in chunks)
    origins = [stream.origin(g) for g in range(steps * stream.global_batch_size)]
    if any(epoch != 0 for _, epoch, _ in origins):
        raise SystemExit("the measured steps must stay within one epoch; use fewer --steps")
    return out, np.array([window for _, _, window in origins], dtype=np.int64) * stream.seq_len


def memmap_batches(path: Path, starts: np.ndarray, seq_len: int, batch: int) -> Iterator[Batch]:
    """The floor: fancy-index gather of each step's windows from a memmap (no shuffle buffer, no Arrow)."""
    tokens = np.memmap(path, dtype=np.uint32, mode="r")
    columns = np.arange(seq_len + 1)

    def steps() -> Iterator[Batch]:
        for first in range(0, len(starts), batch):
            yield _split(tokens[starts[first:first + batch, None] + columns])

    return steps()


def build_hf(rows: np.ndarray, out: Path) -> Path:
    """The same sequences (rows of T + 1 tokens) as a Hugging Face dataset saved with ``save_to_disk``."""
    from datasets import Dataset, Features, Sequence, Value

    features = Features({"input_ids": Sequence(Value("int32"))})
    Dataset.from_dict({"input_ids": rows.astype(np.int32)}, features=features).save_to_disk(str(out))
    return out


def hf_batches(path: Path, batch: int, seed: int) -> Iterator[Batch]:
    """How the HF Trainer feeds a causal LM: torch-formatted dataset, shuffled DataLoader, 0 workers.
    The dataset is loaded now; the returned iterator only reads."""
    from datasets import load_from_disk

    dataset = load_from_disk(str(path)).with_format("torch")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))

    def steps() -> Iterator[Batch]:
        for item in loader:
            rows = item["input_ids"]
            yield {"input_ids": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()}

    return steps()


def timed_pass(batches: Iterator[Batch]) -> tuple[float, int]:
    """(seconds, input tokens) to draw every batch (each reader is opened before: setup is not timed)."""
    start = time.perf_counter()
    tokens = 0
    for batch in batches:
        tokens += batch["input_ids"].numel()
    return time.perf_counter() - start, tokens


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


def loader_throughput(folder: Path, work: Path, seq_len: int, batch: int, steps: int, repeats: int) -> dict:
    def stream() -> TokenStream:
        return TokenStream(folder, "train", seq_len, global_batch_size=batch, seed=0)

    steps = min(steps, stream().windows_per_epoch[0] // batch)
    mm_path, starts = build_memmap(folder, stream(), steps, work / "tokens.bin")
    reference = stream().sequences(0, steps * batch)
    hf_path = build_hf(reference, work / "hf_rows")
    # the three readers deliver the same sequences (memmap: in the same order; HF: its own shuffle)
    def rows(batches: Iterator[Batch]) -> np.ndarray:
        return np.concatenate([torch.cat([b["input_ids"], b["labels"][:, -1:]], 1).numpy() for b in batches])

    same = {"triarch": np.array_equal(rows(stream().batches(steps)), reference),
            "memmap": np.array_equal(rows(memmap_batches(mm_path, starts, seq_len, batch)), reference),
            "hf": np.array_equal(_sorted_rows(rows(hf_batches(hf_path, batch, 0))), _sorted_rows(reference))}
    if not all(same.values()):
        raise SystemExit(f"readers disagree with TokenStream.sequences: {same}")
    del reference

    readers: dict[str, Callable[[int], Iterator[Batch]]] = {
        "triarch": lambda r: stream().batches(steps),
        "memmap": lambda r: memmap_batches(mm_path, starts, seq_len, batch),
        "hf": lambda r: hf_batches(hf_path, batch, r),
    }
    rates: dict[str, list[float]] = {name: [] for name in readers}
    for r in range(repeats):  # interleaved, so load from other jobs on the machine hits all three alike
        for name, make in readers.items():
            seconds, tokens = timed_pass(make(r))
            rates[name].append(tokens / seconds)
    return {"steps": steps, "tokens_per_pass": steps * batch * seq_len,
            "rates": rates, "median": {k: statistics.median(v) for k, v in rates.items()}}


# --- 3. data wait at the demo's step rate -----------------------------------------------------------------


def data_wait(folder: Path, steps: int, train_steps: int) -> dict:
    """Per-step data time of the trainer's path (TokenStream.batches, 0 workers) at the tiny demo's shape
    over the tiny demo's step time (engine built as in the engine tests: one rank, tiny.yaml).

    The data time is the larger of two measures on one stream: the mean over ``steps`` batches drawn back
    to back (the lazy block fills amortized as in a long run), then the mean wait for the next batch between
    ``train_steps`` real steps that continue the same stream, as the trainer's loop draws them (caches and
    cores disturbed by each step); the first two steps are warm-up.
    """
    from triarch.config import load_config, validate_for_world
    from triarch.engine.native import NativeEngine
    from triarch.launcher.distributed import init_distributed, shutdown_distributed
    from triarch.parallel.topology import Topology

    cfg = validate_for_world(load_config(TINY, ["logging.tensorboard=false"]), 1)
    seq_len, batch = cfg.model.seq_len, cfg.train.global_batch_size

    data = TokenStream(folder, "train", seq_len, global_batch_size=batch, seed=cfg.train.seed,
                       num_workers=cfg.data.num_workers, shuffle_block=cfg.data.shuffle_block)
    steps = max(1, min(steps, data.windows_per_epoch[0] // batch - train_steps - 2))
    batches = data.batches()
    loop_s, _ = timed_pass(next(batches) for _ in range(steps))
    device = torch.device("cpu")
    init_distributed(device)
    try:
        engine = NativeEngine(cfg, Topology.build(device, pp=1, dp_replicate=1, dp_shard=1, tp=1))
        waits, step_times = [], []
        for step in range(1, train_steps + 3):
            start = time.perf_counter()
            item = next(batches)
            fetched = time.perf_counter()
            engine.train_step(item["input_ids"], item["labels"], step=step)
            waits.append(fetched - start)
            step_times.append(time.perf_counter() - fetched)
    finally:
        shutdown_distributed()
    waits, step_times = waits[2:], step_times[2:]
    loop, interleaved = loop_s / steps, sum(waits) / len(waits)
    step_time = statistics.median(step_times)
    per_step = max(loop, interleaved)
    return {"seq_len": seq_len, "batch": batch, "steps": steps, "train_steps": train_steps, "loop_s": loop,
            "interleaved_s": interleaved, "data_s_per_step": per_step, "step_s": step_time,
            "fraction": per_step / step_time}


# --- 2. prepare throughput --------------------------------------------------------------------------------


def prepare_throughput(work: Path, repeats: int, scale: int, workers: int = 2) -> dict:
    """triarch's prepare pipeline vs ``datasets.map(batched=True, num_proc=2)``; same text, same tokenizer.

    Measured on the docstrings as they are (1.6 MB: start-up costs weigh), and, when ``scale`` > 1, on the
    docstrings repeated ``scale`` times (closer to steady-state throughput).
    """
    import datasets

    from triarch.data_pipeline.prepare.pydocs import split_train_validation, stdlib_docstrings
    from triarch.data_pipeline.prepare.tokenizer import (
        train_byte_level_bpe,
    )

    datasets.disable_progress_bars()
    docs = stdlib_docstrings(workers=workers)
    splits = split_train_validation(docs)  # what ``triarch prepare`` does to the docstrings
    tokenizer_path = work / "tokenizer.json"
    train_byte_level_bpe(splits["train"], 2048, tokenizer_path)  # the demo's stdlib BPE
    result = {"documents": len(docs), "text_mb": sum(len(t.encode("utf-8")) for t in docs) / 1e6,
              "x1": _prepare_pair(work, splits, tokenizer_path, repeats, workers)}
    if scale > 1:
        scaled = {name: texts * scale for name, texts in splits.items()}
        result[f"x{scale}"] = _prepare_pair(work, scaled, tokenizer_path, 1, workers)
    return result


def _prepare_pair(work: Path, splits: dict[str, list[str]], tokenizer_path: Path, repeats: int,
                  workers: int) -> dict:
    """Median seconds of both sides over ``repeats`` alternating runs; both must produce the same tokens."""
    import datasets

    from triarch.data_pipeline.prepare import prepare_corpus
    from triarch.data_pipeline.prepare.tokenizer import eos_id, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    eos = eos_id(tokenizer)
    texts = [t for part in splits.values() for t in part]

    def tokenize(batch: dict) -> dict:
        encodings = tokenizer.encode_batch(batch["text"], add_special_tokens=False)
        return {"input_ids": [e.ids + [eos] for e in encodings]}

    tri_s, hf_s, hf_saved_s = [], [], []
    tri_tokens = hf_tokens = 0
    for r in range(repeats):
        out = work / f"prepared_{r}"
        start = time.perf_counter()
        prepare_corpus(splits, tokenizer_path, out, workers=workers, progress=False)
        tri_s.append(time.perf_counter() - start)
        tri_tokens = json.loads((out / "manifest.json").read_text())["totals"]["tokens"]
        shutil.rmtree(out)

        start = time.perf_counter()
        mapped = datasets.Dataset.from_dict({"text": texts}).map(tokenize, batched=True, num_proc=workers,
                                                                 remove_columns=["text"])
        hf_s.append(time.perf_counter() - start)
        mapped.save_to_disk(str(work / f"hf_prepared_{r}"))
        hf_saved_s.append(time.perf_counter() - start)
        hf_tokens = sum(len(ids) for ids in mapped["input_ids"])
        del mapped
        shutil.rmtree(work / f"hf_prepared_{r}")
    if tri_tokens != hf_tokens:
        raise SystemExit(f"prepare sides disagree: triarch {tri_tokens} tokens, datasets.map {hf_tokens}")
    tri, hf, hf_saved = (statistics.median(x) for x in (tri_s, hf_s, hf_saved_s))
    return {"documents": len(texts), "tokens": tri_tokens, "triarch_tokens_per_s": tri_tokens / tri,
            "hf_tokens_per_s": hf_tokens / hf, "hf_saved_tokens_per_s": hf_tokens / hf_saved,
            "triarch_s": tri_s, "hf_s": hf_s, "ratio": hf / tri}


# --- 4. peak RSS ------------------------------------------------------------------------------------------

RSS_CHILD = """
import json, resource, sys, time
from triarch.data_pipeline.stream import TokenStream

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")

folder, seq_len, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
stream = TokenStream(folder, "train", seq_len, global_batch_size=batch, seed=0)
epoch = stream.windows_per_epoch[0] // batch
steps = min(steps, epoch) if steps > 0 else epoch
baseline = status_mb("VmRSS")
start, tokens = time.perf_counter(), 0
for item in stream.batches(steps):
    tokens += item["input_ids"].numel()
print(json.dumps({"baseline_mb": baseline, "end_mb": status_mb("VmRSS"), "hwm_mb": status_mb("VmHWM"),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "steps": steps, "tokens": tokens, "seconds": time.perf_counter() - start}))
"""


def peak_rss(folder: Path, seq_len: int, batch: int, steps: int) -> dict:
    """Stream ``steps`` steps (0: the whole epoch) in a fresh process and report its ru_maxrss.

    Linux carries the parent's memory high-water mark into a child's ru_maxrss through fork/vfork + exec,
    and this process is large (torch, datasets, a model), so the child is started by a small ``sh`` that
    forks it (``; exit`` keeps sh from exec'ing it in place). VmHWM is reported alongside as a cross-check.
    """
    command = [sys.executable, "-c", RSS_CHILD, str(folder), str(seq_len), str(batch), str(steps)]
    out = subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", *command], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- main -------------------------------------------------------------------------------------------------


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*.arrow")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128, help="loader benchmark T (default: the demo's)")
    parser.add_argument("--batch", type=int, default=16, help="loader benchmark global batch G (demo's)")
    parser.add_argument("--tokens", type=int, default=16 << 20, help="tokens of the loader-throughput set")
    parser.add_argument("--steps", type=int, default=4000, help="steps per loader pass (capped at one epoch)")
    parser.add_argument("--repeats", type=int, default=5, help="loader passes per reader (median)")
    parser.add_argument("--prepare-repeats", type=int, default=3)
    parser.add_argument("--prepare-scale", type=int, default=8,
                        help="also time prepare on the docstrings repeated this many times (<= 1: skip)")
    parser.add_argument("--train-steps", type=int, default=6, help="timed tiny-demo steps (after 2 warm-up)")
    parser.add_argument("--rss-tokens", type=int, default=500_000_000, help="tokens of the RSS set (~4 B each)")
    parser.add_argument("--rss-seq-len", type=int, default=2048)
    parser.add_argument("--rss-batch", type=int, default=16)
    parser.add_argument("--rss-steps", type=int, default=0, help="steps streamed for RSS (0: the whole epoch)")
    parser.add_argument("--quick", action="store_true", help="smoke run: ~200 MB RSS set, fewer repeats")
    parser.add_argument("--tmp", type=Path, default=ROOT / "runs", help="where temporary token sets go")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # prepare: 2 threads vs 2 processes, 2 cores each
    if args.quick:
        args.tokens = min(args.tokens, 4 << 20)
        args.steps, args.repeats, args.prepare_repeats, args.prepare_scale = min(args.steps, 1000), 3, 1, 0
        args.train_steps = min(args.train_steps, 3)
        args.rss_tokens = min(args.rss_tokens, 50_000_000)
    args.tmp.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_data_loader_", dir=args.tmp))
    print(f"machine: {os.cpu_count()} cores (shared), torch {torch.__version__}; temporary data in {work}")
    try:
        figures = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))


def run(args: argparse.Namespace, work: Path) -> dict:
    t0 = time.perf_counter()
    folder = write_synthetic_folder(work / "loader_set", args.tokens)
    print(f"\n[1] loader tokens/s, T={args.seq_len}, G={args.batch}, synthetic set of "
          f"{args.tokens / 1e6:.1f}M tokens ({_folder_mb(folder):.0f} MB Arrow), 0 workers, page cache warm")
    loader = loader_throughput(folder, work, args.seq_len, args.batch, args.steps, args.repeats)
    med = loader["median"]
    print(f"    (each pass: {loader['steps']} steps = {loader['tokens_per_pass'] / 1e6:.1f}M input tokens; "
          f"{args.repeats} passes each, interleaved; the three readers checked to hand out the same sequences)")
    for name, label in (("triarch", "triarch TokenStream (shuffled, packed)"),
                        ("memmap", "reference (a): numpy memmap gather, same windows"),
                        ("hf", "reference (b): HF datasets + shuffled DataLoader")):
        print(f"    {label:<52} {med[name] / 1e6:8.2f} M tokens/s   "
              f"passes {[round(x / 1e6, 2) for x in loader['rates'][name]]}")
    vs_memmap, vs_hf = med["triarch"] / med["memmap"], med["triarch"] / med["hf"]
    print(f"    vs_memmap = {vs_memmap:.3f} (goal >= 0.8)   vs_hf_datasets = {vs_hf:.2f} (goal >= 3)")

    # prepare first: datasets.map forks its workers, better before the engine's threads exist
    prep = prepare_throughput(work, args.prepare_repeats, args.prepare_scale)
    print(f"\n[2] prepare tokens/s, stdlib docstrings ({prep['documents']} docs, {prep['text_mb']:.2f} MB), the same "
          f"2048-token BPE, 2 cores each side (triarch: 2 threads, Arrow shards + hashes + manifest; "
          f"datasets: 2 processes)")
    for key, part in ((k, v) for k, v in prep.items() if k.startswith("x")):
        what = "the docstrings" if key == "x1" else f"the docstrings x{key[1:]}"
        print(f"    {what} ({part['tokens']} tokens with EOS):")
        print(f"      triarch prepare pipeline                       {part['triarch_tokens_per_s'] / 1e6:6.3f} "
              f"M tokens/s   runs {[round(x, 2) for x in part['triarch_s']]} s")
        print(f"      reference: Dataset.from_dict().map(num_proc=2) {part['hf_tokens_per_s'] / 1e6:6.3f} "
              f"M tokens/s   runs {[round(x, 2) for x in part['hf_s']]} s "
              f"(+ save_to_disk: {part['hf_saved_tokens_per_s'] / 1e6:.3f})")
        print(f"      ratio {part['ratio']:.2f}")
    prepare_vs_hf = prep["x1"]["ratio"]
    print(f"    prepare_vs_hf = {prepare_vs_hf:.2f} on the docstrings as they are (goal >= 1)")

    wait = data_wait(folder, steps=2000, train_steps=args.train_steps)
    print(f"\n[3] data wait at the tiny demo's shape (T={wait['seq_len']}, G={wait['batch']}): data "
          f"{wait['loop_s'] * 1e6:.1f} us/step back to back ({wait['steps']} steps), "
          f"{wait['interleaved_s'] * 1e6:.1f} us/step between {wait['train_steps']} real steps")
    print(f"    tiny-demo train_step (tiny.yaml model, 1 rank, median): {wait['step_s'] * 1e3:.1f} ms")
    print(f"    data_wait_fraction = {wait['fraction']:.5f} (goal < 0.01)")

    shutil.rmtree(folder)
    start = time.perf_counter()
    big = write_synthetic_folder(work / "rss_set", args.rss_tokens, seed=1)
    gen_s = time.perf_counter() - start
    big_gb = _folder_mb(big) / 1e3
    rss = peak_rss(big, args.rss_seq_len, args.rss_batch, args.rss_steps)
    print(f"\n[4] peak RSS streaming {rss['tokens'] / 1e6:.0f}M tokens ({rss['steps']} steps, T={args.rss_seq_len}, "
          f"G={args.rss_batch}) of a {big_gb:.2f} GB set (written in {gen_s:.0f} s) in a fresh process")
    print(f"    peak_rss_mb = {rss['peak_mb']:.0f} (goal <= 300; ru_maxrss, VmHWM {rss['hwm_mb']:.0f}); after "
          f"imports + stream setup {rss['baseline_mb']:.0f} MB, at the end {rss['end_mb']:.0f} MB; "
          f"{rss['tokens'] / rss['seconds'] / 1e6:.1f} M tokens/s")
    shutil.rmtree(big)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return {"vs_memmap": round(vs_memmap, 4), "vs_hf_datasets": round(vs_hf, 3),
            "prepare_vs_hf": round(prepare_vs_hf, 3), "peak_rss_mb": round(rss["peak_mb"], 1),
            "data_wait_fraction": round(wait["fraction"], 6),
            "triarch_tokens_per_s": round(med["triarch"]), "memmap_tokens_per_s": round(med["memmap"]),
            "hf_datasets_tokens_per_s": round(med["hf"]), "seq_len": args.seq_len, "batch": args.batch,
            "data_s_per_step": round(wait["data_s_per_step"], 7), "demo_step_s": round(wait["step_s"], 5),
            "data_s_per_step_interleaved": round(wait["interleaved_s"], 7),
            "prepare_triarch_tokens_per_s": round(prep["x1"]["triarch_tokens_per_s"]),
            "prepare_hf_tokens_per_s": round(prep["x1"]["hf_tokens_per_s"]),
            **{f"prepare_vs_hf_{k}": round(v["ratio"], 3) for k, v in prep.items() if k.startswith("x") and k != "x1"},
            "rss_baseline_mb": round(rss["baseline_mb"], 1), "rss_set_gb": round(big_gb, 3),
            "rss_vmhwm_mb": round(rss["hwm_mb"], 1), "rss_steps": rss["steps"]}


if __name__ == "__main__":
    main()
