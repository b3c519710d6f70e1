"""GPU checks (skipped without CUDA): a bf16 engine step on one GPU, the throughput script's smoke run,
document attention through FlexAttention (forward, gradients, selective AC, memory against the dense mask),
and generation plus a PPO iteration on CUDA (KV-cache greedy tokens equal full recomputation, rollout
log-probs equal to the training forward's)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_engine_step_on_cuda() -> None:
    from triarch.config import load_config, validate_for_world
    from triarch.engine.native import NativeEngine
    from triarch.launcher.distributed import init_distributed, shutdown_distributed
    from triarch.parallel.topology import Topology

    device = torch.device("cuda", 0)
    init_distributed(device)
    try:
        cfg = validate_for_world(load_config(None, [
            "model.vocab_size=512", "model.dim=128", "model.n_layers=2", "model.n_heads=4", "model.seq_len=64",
            "train.precision=bf16", "train.micro_batch_size=2", "train.global_batch_size=4", "train.warmup_steps=1",
            "train.steps=5"]), 1)
        topo = Topology.build(device, pp=1, dp_replicate=1, dp_shard=1, tp=1)
        engine = NativeEngine(cfg, topo)
        batch = torch.randint(0, 512, (4, 65), device=device)
        losses = [engine.train_step(batch[:, :-1], batch[:, 1:], step=s).loss for s in range(1, 6)]
        assert losses[-1] < losses[0]
    finally:
        shutdown_distributed()


def test_generation_and_a_ppo_iteration_on_cuda() -> None:
    """Greedy tokens with the KV cache on CUDA (fp32, TF32 off) equal the argmax of full forwards; one PPO
    iteration runs with the rollout log-probs equal to the training forward's (ratio 1, clip fraction 0 on
    the first optimizer step)."""
    from triarch.config import config_from_dict, validate_for_world
    from triarch.engine.generation import SamplingParams
    from triarch.engine.native import NativeEngine
    from triarch.launcher.distributed import init_distributed, shutdown_distributed
    from triarch.parallel.topology import Topology
    from triarch.rlhf.rl_loop import RLIteration, RLModels

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda", 0)
    init_distributed(device)
    try:
        cfg = validate_for_world(config_from_dict({
            "model": {"vocab_size": 512, "dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 256,
                      "seq_len": 48, "max_seq_len": 64},
            "train": {"steps": 4, "micro_batch_size": 2, "global_batch_size": 4, "warmup_steps": 0, "lr": 1e-4,
                      "tf32": False},
            "objective": {"kind": "ppo"}, "reward": {"kind": "model", "model": "seeded"},
            "rl": {"rollout": {"prompts": 4, "max_new_tokens": 12}, "critic_init": "policy"}}), 1)
        prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [3], [40, 41]]
        params = SamplingParams(max_new_tokens=12, temperature=0.0, eos_id=2)
        topo = Topology.build(device, pp=1, dp_replicate=1, dp_shard=1, tp=1)
        actor = NativeEngine(cfg, topo)
        greedy = actor.generate(prompts, params)
        with torch.no_grad():  # each greedy token is the argmax of a full forward (no cache) of what precedes it
            for prompt, completion in zip(prompts, greedy.completions()):
                row = torch.tensor([prompt + completion], device=device)
                logits = actor.chunks[0](row)[0, len(prompt) - 1:-1]
                assert logits.argmax(-1).tolist() == completion

        class Prompts:
            eos_id, pad_id = 2, 0

            def prompts(self, iteration: int, count: int) -> list[tuple[int, list[int]]]:
                return list(enumerate(prompts))[:count]

        models = RLModels(actor=actor, critic=NativeEngine(cfg, topo, head="score"),
                          reference=NativeEngine(cfg, topo, trainable=False),
                          reward=NativeEngine(cfg, topo, trainable=False, head="score"))
        result = RLIteration(cfg, topo, models, Prompts()).run(0)
        assert abs(result.extra["ratio"][0] - 1.0) < 1e-5 and result.extra["clip_fraction"][0] == 0.0
        assert abs(result.metrics["kl"]) < 1e-4
    finally:
        shutdown_distributed()


def _dense_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              positions: torch.Tensor) -> torch.Tensor:
    """The dense-mask reference: bool (batch, 1, seq, seq) same-document causal mask into SDPA."""
    ids = (positions == 0).cumsum(dim=1)
    seq = positions.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=positions.device).tril()
    mask = ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]
    gqa = q.shape[1] != k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


@pytest.mark.parametrize("kv_heads", [8, 2], ids=["mha", "gqa"])
def test_flex_document_attention_equals_dense_mask_on_cuda(kv_heads: int) -> None:
    """FlexAttention with the document block mask: forward and input gradients equal the dense-mask SDPA
    (seq 1000: not a multiple of the 128-token block; rows of several documents and of one)."""
    from triarch.models.document_attention import DocumentBlocks, document_attention, documents

    device = torch.device("cuda", 0)
    gen = torch.Generator(device).manual_seed(0)
    seq = 1000
    lengths = [[300, 1, 130, 400, 169], [seq], [77, 256, 667]]
    positions = torch.tensor([[i for n in row for i in range(n)] for row in lengths], device=device)
    q = torch.randn(3, 8, seq, 64, device=device, generator=gen, requires_grad=True)
    k, v = (torch.randn(3, kv_heads, seq, 64, device=device, generator=gen, requires_grad=True) for _ in range(2))
    docs = documents(positions)
    assert isinstance(docs, DocumentBlocks)
    got = document_attention(q, k, v, docs)
    want = _dense_document_attention(q, k, v, positions)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    cotangent = torch.randn(want.shape, device=device, generator=gen)
    for name, g, w in zip("qkv", torch.autograd.grad(got, (q, k, v), cotangent),
                          torch.autograd.grad(want, (q, k, v), cotangent)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


def test_flex_document_attention_under_selective_checkpointing_on_cuda() -> None:
    """A Llama with packed documents under selective AC (FlexAttention's output kept) has the plain model's
    gradients."""
    from triarch.models.llama import Llama, LlamaArgs
    from triarch.parallel.activation_checkpoint import apply_activation_checkpointing

    device = torch.device("cuda", 0)
    args = LlamaArgs(vocab_size=128, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=512, max_seq_len=512)
    torch.manual_seed(0)
    plain = Llama(args).to(device)
    checkpointed = Llama(args).to(device)
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed, "selective")
    positions = torch.tensor([[*range(200), *range(312)], [*range(512)]], device=device)
    tokens = torch.randint(0, args.vocab_size, positions.shape, device=device)
    for model in (plain, checkpointed):
        model(tokens, position_ids=positions).logsumexp(-1).sum().backward()
    for (name, p), c in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(c.grad, p.grad, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_document_attention_benchmark_memory_on_cuda() -> None:
    """benchmarks/document_attention.py on CUDA: at seq 4096 the flex path's peak memory of one attention
    forward + backward is well below the dense-mask path's (which falls back to the math kernel)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "document_attention.py"
    result = subprocess.run([sys.executable, str(script), "--seq", "2048", "4096"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["device"] == "cuda"
    assert figures["seq"] == [2048, 4096]
    assert figures["ratio"][-1] > 4, figures
    assert figures["kernel_bytes"][1] < 2.5 * figures["kernel_bytes"][0], figures


# ------------------------------------------------------------------------------------------------
# The trainer on CUDA/NCCL through the CLI: checkpoints (whose agreement runs on the host group), resume,
# several GPUs, and the throughput script. Tolerances on GPUs: bit-exact resume is a CPU guarantee; on a
# GPU, atomics (embedding backward) and reduction order give small differences, so losses are compared to
# GPU_LOSS_RTOL (bf16) instead.

GPU_LOSS_RTOL = 2e-3
SMALL_CUDA = ["model.dim=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=256",
              "model.seq_len=128", "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=2",
              "train.eval_interval=0", "logging.log_interval=1", "logging.progress=off", "logging.tensorboard=false",
              "train.device=cuda", "train.precision=bf16"]


def _cli(*args: str, cwd, timeout: int = 900):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "triarch.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_data") / "pydocs"
    done = _cli("prepare", "--out", str(out), "--vocab-size", "2048", cwd=out.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _train(run_dir, data, *overrides: str, nproc: int = 1) -> dict[int, float]:
    import json
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml"
    done = _cli("train", str(config), "--nproc", str(nproc), "--run-dir", str(run_dir), f"data.path={data}",
                *SMALL_CUDA, *overrides, cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _close(got: dict[int, float], want: dict[int, float], rtol: float = GPU_LOSS_RTOL) -> None:
    assert sorted(got) == sorted(want)
    for step in want:
        assert abs(got[step] - want[step]) <= rtol * abs(want[step]), (step, got[step], want[step])


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_checkpoint_save_and_resume_on_nccl(async_save: bool, gpu_data, tmp_path) -> None:
    """The first checkpoint of an NCCL run used to raise (CPU-tensor agreement on the NCCL group); now a run
    saved at step 4 and resumed equals an uninterrupted run (within GPU tolerance)."""
    whole = _train(tmp_path / "whole", gpu_data, "train.steps=8")
    common = ["train.steps=8", "checkpoint.interval=2", f"checkpoint.async_save={str(async_save).lower()}"]
    first = _train(tmp_path / "resumed", gpu_data, *common, "train.exit_at_step=4")
    assert (tmp_path / "resumed" / "checkpoints" / "step_4" / "COMMITTED.json").is_file()
    second = _train(tmp_path / "resumed", gpu_data, *common)
    _close({**first, **second}, whole)
    records = (tmp_path / "resumed" / "metrics.jsonl").read_text()
    assert "peak_mem_reserved_bytes" in records


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")
def test_megatron_engine_on_cuda_tracks_the_native_engine(gpu_data, tmp_path) -> None:
    """engine: megatron on one GPU (bf16; TE's layers when TE imports, else megatron's local ones, and no CPU
    redirects): 8 steps within the bf16 GPU tolerance of the native engine's losses, and a save/resume."""
    native = _train(tmp_path / "native", gpu_data, "train.steps=8", "train.precision=bf16")
    common = ["train.steps=8", "train.precision=bf16", "engine=megatron", "train.compile=false",
              "checkpoint.interval=4"]
    whole = _train(tmp_path / "megatron", gpu_data, *common)
    _close(whole, native, rtol=2e-2)
    first = _train(tmp_path / "resumed", gpu_data, *common, "train.exit_at_step=4")
    second = _train(tmp_path / "resumed", gpu_data, *common)
    _close({**first, **second}, whole)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL refuses two ranks on one GPU)")
@pytest.mark.parametrize("layout", [["parallel.dp_shard=2"], ["parallel.tp=2"], ["parallel.pp=2"]],
                         ids=["fsdp2", "tp2_fsdp_compile", "pp2"])
def test_two_gpu_layouts_match_one_gpu(layout: list[str], gpu_data, tmp_path) -> None:
    """FSDP, TP (+ FSDP's bf16 policy on a mesh of one, + compile) and PP on 2 GPUs give one GPU's losses
    within the bf16 GPU tolerance."""
    extra = ["train.compile=true"] if "parallel.tp=2" in layout else []
    one = _train(tmp_path / "one", gpu_data, "train.steps=6", *extra)
    two = _train(tmp_path / "two", gpu_data, "train.steps=6", *extra, *layout, nproc=2)
    _close(two, one, rtol=5e-3)


def test_gpu_throughput_smoke() -> None:
    """benchmarks/gpu_throughput.py --steps 3: both loops run and the last line is the JSON of figures."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"
    done = subprocess.run([sys.executable, str(script), "--steps", "3"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["triarch_tokens_per_s"] > 0 and figures["baseline_tokens_per_s"] > 0
    assert 0 < figures["triarch_mfu"] < 1


def test_tf32_is_on_for_fp32_cuda_runs(gpu_data, tmp_path) -> None:
    """fp32 on CUDA trains with TF32 matmuls and reports MFU against the TF32 peak (or the FP32 one when off)."""
    import json

    for tf32 in ("true", "false"):
        run = tmp_path / f"tf32_{tf32}"
        _train(run, gpu_data, "train.steps=2", "train.precision=fp32", f"train.tf32={tf32}")
        source = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["mfu_source"]
        assert ("tf32" in source) == (tf32 == "true"), source


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs FP8 tensor cores (compute capability 8.9+)")
def test_fp8_native_engine_tracks_bf16_on_cuda() -> None:
    """train.precision=fp8 (torchao tensorwise) on a GPU: the block linears are Float8Linear, the loss falls and
    stays within 2% of the bf16 run's from the same weights and batches."""
    pytest.importorskip("torchao")
    from triarch.config import load_config, validate_for_world
    from triarch.engine.native import NativeEngine
    from triarch.launcher.distributed import init_distributed, shutdown_distributed
    from triarch.parallel.topology import Topology

    device = torch.device("cuda", 0)
    init_distributed(device)
    try:
        losses = {}
        for precision in ("bf16", "fp8"):
            cfg = validate_for_world(load_config(None, [
                "model.vocab_size=512", "model.dim=256", "model.n_layers=2", "model.n_heads=4", "model.seq_len=128",
                "model.ffn_hidden=512", f"train.precision={precision}", "train.micro_batch_size=4",
                "train.global_batch_size=4", "train.warmup_steps=1", "train.steps=8"]), 1)
            engine = NativeEngine(cfg, Topology.build(device, pp=1, dp_replicate=1, dp_shard=1, tp=1))
            if precision == "fp8":
                assert type(engine.chunks[0].layers["0"].feed_forward.w1).__name__ == "Float8Linear"
            batch = torch.randint(0, 512, (4, 129), device=device, generator=torch.Generator(device).manual_seed(0))
            losses[precision] = [engine.train_step(batch[:, :-1], batch[:, 1:], step=s).loss for s in range(1, 9)]
            del engine
        assert losses["fp8"][-1] < losses["fp8"][0]
        for a, b in zip(losses["fp8"], losses["bf16"]):
            assert abs(a - b) <= 0.02 * b, losses
    finally:
        shutdown_distributed()
