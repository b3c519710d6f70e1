"""Pipeline-parallel decoding: micro-batches in flight (``engine.pipelined_decode``) against decoding the
whole batch stage after stage, on 2 ranks (pp2, gloo, CPU, one thread each), same model, prompts and
tokens, measured in the same processes.

A random ~30M-parameter Llama (seeded; the same weights on both sides since both are the same engine),
16 prompts of 32 tokens, 48 new tokens, greedy, EOS disabled (every row generates every token). After a
warm-up of each, the two modes alternate for several repeats; figures are medians. The tokens of both modes
are compared. Last line (rank 0): JSON with ``pipelined_tokens_per_s``, ``sequential_tokens_per_s`` and
``ratio``. With ``pp`` stages, sequential decoding keeps one stage busy at a time; micro-batches in flight
keep all of them busy, so the ideal ratio is ``pp`` (2 here) less the per-message overhead.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

ROWS, PROMPT, NEW, REPEATS = 64, 32, 24, 3
MODEL = {"vocab_size": 8192, "dim": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 4, "ffn_hidden": 1408,
         "seq_len": 128, "max_seq_len": 256}


def rank_main() -> None:
    import torch.distributed as dist

    from triarch.config import config_from_dict, validate_for_world
    from triarch.engine.generation import SamplingParams
    from triarch.engine.native import NativeEngine
    from triarch.launcher.distributed import exit_process, init_distributed, pick_device, shutdown_distributed
    from triarch.parallel.topology import Topology

    torch.set_num_threads(1)
    device = pick_device("cpu")
    init_distributed(device)
    cfg = validate_for_world(config_from_dict({
        "model": MODEL, "parallel": {"pp": 2},
        "train": {"steps": 10, "micro_batch_size": 1, "global_batch_size": 2, "warmup_steps": 0}}), 2)
    topo = Topology.build(device, pp=2, dp_replicate=1, dp_shard=1, tp=1)
    engine = NativeEngine(cfg, topo, trainable=False)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, MODEL["vocab_size"], (ROWS, PROMPT), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=NEW, temperature=0.0, eos_id=None)
    times: dict[bool, list[float]] = {True: [], False: []}
    tokens = {}
    for repeat in range(REPEATS + 1):
        for pipelined in (True, False):
            dist.barrier()
            start = time.perf_counter()
            out = engine.generate(prompts, params, micro_batches=pipelined)
            elapsed = time.perf_counter() - start
            if repeat:  # the first round warms up
                times[pipelined].append(elapsed)
            tokens[pipelined] = out.tokens
    if dist.get_rank() == 0:
        rate = {mode: ROWS * NEW / statistics.median(ts) for mode, ts in times.items()}
        print(json.dumps({"pipelined_tokens_per_s": rate[True], "sequential_tokens_per_s": rate[False],
                          "ratio": rate[True] / rate[False], "same_tokens": bool(torch.equal(tokens[True],
                                                                                            tokens[False])),
                          "rows": ROWS, "prompt_tokens": PROMPT, "new_tokens": NEW, "pp": 2,
                          "reference": "the same engine decoding the whole batch stage after stage"}))
    shutdown_distributed(sync=True)
    exit_process(0)


def main() -> None:
    from triarch.launcher.local import launch_local

    launch_local(2, [__file__, "--rank"])


if __name__ == "__main__":
    if "--rank" in sys.argv:
        rank_main()
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        main()
