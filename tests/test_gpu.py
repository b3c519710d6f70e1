"""GPU checks (skipped without CUDA): a bf16 engine step on one GPU, the throughput script's smoke run, and
document attention through FlexAttention (forward, gradients, selective AC, memory against the dense mask)."""

from __future__ import annotations

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
