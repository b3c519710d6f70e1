"""Generation throughput: ``NativeEngine.generate`` (1 rank, KV cache, greedy, fp32, CPU) against Hugging Face
``transformers`` ``LlamaForCausalLM.generate`` (``use_cache=True``, greedy) on the same model and prompts,
measured in the same process.

The model is a randomly initialized Llama of ~30M parameters built with transformers, saved as an HF folder
and loaded into triarch through ``init.from: hf:`` (the path ``triarch generate --hf`` takes). Both sides
continue the same prompts (a batch of equal-length random token ids) by the same number of new tokens with
EOS disabled, so both produce exactly batch x new tokens; the tokens are compared. After a warm-up of each,
the sides alternate for several repeats; each figure is the median (``ratio_best`` compares the fastest
runs, which other load on the machine disturbs least). Last line: JSON with ``triarch_tokens_per_s``,
``hf_tokens_per_s`` and ``ratio`` (goal >= 1.0). ``--profile`` prints where
triarch's time goes (torch.profiler, one generation) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
         "num_key_value_heads": 4, "vocab_size": 8192, "max_position_embeddings": 512}


def build_hf(folder: Path, seed: int):
    """A random Llama saved as an HF folder (safetensors + config), and the model itself (fp32, eval)."""
    import transformers

    config = transformers.LlamaConfig(**MODEL, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(folder, safe_serialization=True)
    model.generation_config.eos_token_id = None  # EOS disabled: every row runs to max_new_tokens
    return model


def build_triarch(folder: Path):
    """A 1-rank frozen NativeEngine holding the HF folder's weights (as ``triarch generate --hf``)."""
    from triarch.checkpointing.hf_import import checked_hf_folder, hf_run_config
    from triarch.checkpointing.init_from import load_initial_weights
    from triarch.config import apply_overrides, config_from_dict, validate_for_world
    from triarch.engine.native import NativeEngine
    from triarch.launcher.distributed import init_distributed
    from triarch.parallel.topology import Topology

    args, _, _ = checked_hf_folder(folder)
    data = apply_overrides(hf_run_config(args, "bench"), ["train.micro_batch_size=1", "train.global_batch_size=1",
                                                          "train.device=cpu", "train.precision=fp32"])
    cfg = validate_for_world(config_from_dict(data), 1)
    device = torch.device("cpu")
    init_distributed(device)
    topo = Topology.build(device, pp=1, dp_replicate=1, dp_shard=1, tp=1)
    engine = NativeEngine(cfg, topo, trainable=False)
    load_initial_weights(engine, f"hf:{folder}", topo.host_group)
    return engine


def triarch_run(engine, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    from triarch.engine.generation import SamplingParams

    params = SamplingParams(max_new_tokens=new, temperature=0.0, eos_id=None)
    start = time.perf_counter()
    result = engine.generate(prompts, params)
    return time.perf_counter() - start, result.completions()


def hf_run(model, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    return time.perf_counter() - start, out[:, ids.shape[1]:].tolist()


def profile(engine, prompts: list[list[int]], new: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    triarch_run(engine, prompts, new)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        triarch_run(engine, prompts, new)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8, help="prompts (default 8)")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (default 32)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per prompt (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each side (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--profile", action="store_true", help="profile triarch's generate instead")
    args = parser.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    import transformers

    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, MODEL["vocab_size"], (args.batch, args.prompt_len), generator=gen).tolist()
    with tempfile.TemporaryDirectory() as work:
        hf_model = build_hf(Path(work), seed=0)
        engine = build_triarch(Path(work))
    params = sum(p.numel() for p in hf_model.parameters())
    if args.profile:
        profile(engine, prompts, args.new)
        return
    _, ours = triarch_run(engine, prompts, args.new)  # warm-up, and the tokens to compare
    _, theirs = hf_run(hf_model, prompts, args.new)
    tri_times, hf_times = [], []
    for _ in range(args.repeats):
        tri_times.append(triarch_run(engine, prompts, args.new)[0])
        hf_times.append(hf_run(hf_model, prompts, args.new)[0])
    tokens = args.batch * args.new
    tri, hf = tokens / statistics.median(tri_times), tokens / statistics.median(hf_times)
    tri_best, hf_best = tokens / min(tri_times), tokens / min(hf_times)  # robust to other load on the machine
    reference = (f"transformers {transformers.__version__} LlamaForCausalLM.generate (use_cache=True, greedy, "
                 f"attn {hf_model.config._attn_implementation})")
    print(f"model: Llama {params / 1e6:.1f}M parameters, fp32, CPU, {threads} threads; {args.batch} prompts x "
          f"{args.prompt_len} tokens, {args.new} new tokens each (EOS disabled)")
    print(f"triarch NativeEngine.generate (1 rank, KV cache): {tri:,.1f} tokens/s  "
          f"runs {[round(tokens / t, 1) for t in tri_times]}")
    print(f"{reference}: {hf:,.1f} tokens/s  runs {[round(tokens / t, 1) for t in hf_times]}")
    print(f"same tokens: {ours == theirs}; ratio triarch / transformers: {tri / hf:.3f} of medians (goal >= 1.0), "
          f"{tri_best / hf_best:.3f} of the best runs")
    print(json.dumps({"triarch_tokens_per_s": round(tri, 2), "hf_tokens_per_s": round(hf, 2),
                      "ratio": round(tri / hf, 4), "ratio_best": round(tri_best / hf_best, 4),
                      "same_tokens": ours == theirs, "params": params,
                      "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new,
                      "threads": threads, "dtype": "fp32", "device": "cpu", "reference": reference}))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown with a live process group (launcher.distributed.exit_process)


if __name__ == "__main__":
    main()
