"""Document-boundary attention: per-document position ids make each packed document compute as if alone.

Unit: the model's logits for a row packing two documents equal each document's logits run alone; the
document kernels (``models.document_attention``) equal SDPA with the dense block-diagonal causal mask the
model used before (``document_mask`` below), forward and input gradients, while the bytes autograd saves
grow linearly in the sequence instead of quadratically; a compiled block does not recompile when the
documents change. Layouts:
with ``data.document_masks`` on, TP, sequence parallel and PP (position ids handed to every stage) match one
process, as in ``test_layout_parity``. Training: the flag trains end to end through the CLI and changes
the losses (the masks are really applied).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_layout_parity import REL_TOL, run_layout

from triarch.data_pipeline import prepare_pydocs
from triarch.data_pipeline.stream import document_positions
from triarch.models.document_attention import document_attention, document_blocks, document_segments
from triarch.models.llama import AttentionInputs, Llama, LlamaArgs, TransformerBlock

EOS = 0
ARGS = LlamaArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
         "model.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4", "train.steps=4",
         "train.warmup_steps=1", "train.eval_interval=2", "train.eval_batches=1", "logging.log_interval=1",
         "logging.progress=off", "logging.tensorboard=false"]
MASKED = ["data.document_masks=true", "train.grad_clip=0.5"]
LAYOUTS = {
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2_1f1b": (2, ["parallel.pp=2", "parallel.schedule=1f1b"]),
    "pp2_interleaved": (2, ["parallel.pp=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved_1f1b"]),
    "tp2_dp2": (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
}


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The dense reference: bool (batch, 1, seq, seq), query i sees key j when j <= i and no document starts
    (position id 0) after j up to i."""
    documents = (position_ids == 0).cumsum(dim=1)
    seq = position_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]


def _document(generator: torch.Generator, length: int, *, ends: bool) -> torch.Tensor:
    tokens = torch.randint(1, ARGS.vocab_size, (length,), generator=generator)
    if ends:
        tokens[-1] = EOS
    return tokens


def test_packed_documents_compute_as_if_alone() -> None:
    torch.manual_seed(0)
    model = Llama(ARGS).eval()
    gen = torch.Generator().manual_seed(1)
    first, second, third = _document(gen, 7, ends=True), _document(gen, 9, ends=False), _document(gen, 5, ends=True)
    rows = torch.stack([torch.cat([first, second]), torch.cat([third, _document(gen, 11, ends=False)])])
    positions = torch.from_numpy(document_positions(rows.numpy(), EOS))
    assert positions[0].tolist() == [*range(7), *range(9)]
    with torch.no_grad():
        packed = model(rows, position_ids=positions)
        alone = [model(doc[None])[0] for doc in (first, second, third)]
        unmasked = model(rows)
    torch.testing.assert_close(packed[0, :7], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0, 7:], alone[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1, :5], alone[2], rtol=1e-5, atol=1e-5)
    assert (unmasked[0, 7:] - alone[1]).abs().max() > 1e-2, "without position ids the second document sees the first"
    torch.testing.assert_close(model(rows, position_ids=torch.arange(16).expand(2, 16)), unmasked)


def test_document_mask_is_block_diagonal_and_causal() -> None:
    mask = document_mask(torch.tensor([[0, 1, 2, 0, 1, 0]]))[0, 0].int()
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0],
                             [0, 0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]])
    assert torch.equal(mask, expected)


@pytest.fixture(scope="module")
def masked_reference(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    return run_layout(tmp_path_factory.mktemp("masked_single"), 1, MASKED)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_masked_layout_matches_single_process(name: str, masked_reference, tmp_path: Path) -> None:
    ref_losses, ref_params = masked_reference
    nproc, overrides = LAYOUTS[name]
    losses, params = run_layout(tmp_path, nproc, [*MASKED, *overrides])
    for got, want in zip(losses["loss"] + losses["grad_norm"], ref_losses["loss"] + ref_losses["grad_norm"]):
        assert abs(got - want) <= REL_TOL * abs(want), f"{name}: {losses} vs {ref_losses}"
    for key, want in ref_params.items():
        rel = float((params[key] - want).norm() / want.norm())
        assert rel <= REL_TOL, f"{name}: {key} differs by {rel:.2e} relative after 3 steps"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_pydocs(tmp_path_factory.mktemp("data") / "pydocs", 2048, max_documents=600)


def _train(run_dir: Path, *overrides: str, nproc: int = 1) -> list[dict]:
    cmd = [sys.executable, "-m", "triarch.cli", "train", str(EXAMPLES / "tiny.yaml"), "--nproc", str(nproc),
           "--run-dir", str(run_dir), *SMALL, *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_training_with_document_masks(data: Path, tmp_path: Path) -> None:
    masked = _train(tmp_path / "masked", f"data.path={data}", "data.document_masks=true", "parallel.tp=2", nproc=2)
    plain = _train(tmp_path / "plain", f"data.path={data}", "parallel.tp=2", nproc=2)

    def losses(rows: list[dict], key: str) -> list[float]:
        return [r[key] for r in rows if key in r]

    assert len(losses(masked, "loss")) == 4 and len(losses(masked, "eval_loss")) == 3
    assert all(np.isfinite(losses(masked, "loss") + losses(masked, "eval_loss")))
    assert losses(masked, "loss")[0] != losses(plain, "loss")[0], "the masks should change the first loss"
    assert losses(masked, "eval_loss")[0] != losses(plain, "eval_loss")[0]


def _positions(*rows: list[int]) -> torch.Tensor:
    """Position ids of rows given as document lengths (a first length < 0: the row starts mid-document)."""
    out = []
    for lengths in rows:
        first = [*range(-lengths[0], -2 * lengths[0])] if lengths[0] < 0 else list(range(lengths[0]))
        out.append(first + [i for n in lengths[1:] for i in range(n)])
    return torch.tensor(out)


# several documents (one of a single token), one document spanning the row, a row starting mid-document
POSITIONS = _positions([5, 1, 9, 12, 13], [40], [-7, 20, 13])


def _qkv(kv_heads: int, seq: int, *, batch: int = 3, grad: bool = True) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(kv_heads)
    shapes = [(batch, 4, seq, 8), (batch, kv_heads, seq, 8), (batch, kv_heads, seq, 8)]
    return [torch.randn(shape, generator=gen).requires_grad_(grad) for shape in shapes]


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    mask = document_mask(positions)
    gqa = q.shape[1] != k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_segment_kernel_equals_dense_mask(kv_heads: int) -> None:
    q, k, v = _qkv(kv_heads, POSITIONS.shape[1])
    want = _dense(q, k, v, POSITIONS)
    got = document_attention(q, k, v, document_segments(POSITIONS))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cotangent = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), cotangent)
    got_grads = torch.autograd.grad(got, (q, k, v), cotangent)
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


def _block_flags(count: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    flags = torch.zeros(count.shape[0], n, n, dtype=torch.bool)
    for b in range(count.shape[0]):
        for i in range(n):
            flags[b, i, indices[b, 0, i, :count[b, 0, i]].long()] = True
    return flags


@pytest.mark.parametrize("block", [4, 16])  # 40 tokens: whole blocks, then a last block cut short
def test_document_blocks_equal_create_block_mask(block: int) -> None:
    """The block classification from per-block ids equals flex's own, computed from the dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    dense = document_mask(POSITIONS)[:, 0]
    mask = document_blocks(POSITIONS, block).block_mask
    want = create_block_mask(lambda b, h, q, kv: dense[b, q, kv], POSITIONS.shape[0], None, *dense.shape[1:],
                             device="cpu", BLOCK_SIZE=block)
    n = -(-POSITIONS.shape[1] // block)
    for kind in ("kv", "full_kv"):
        got_flags = _block_flags(getattr(mask, f"{kind}_num_blocks"), getattr(mask, f"{kind}_indices"), n)
        want_flags = _block_flags(getattr(want, f"{kind}_num_blocks"), getattr(want, f"{kind}_indices"), n)
        assert torch.equal(got_flags, want_flags), kind
    assert mask.seq_lengths == want.seq_lengths


@pytest.mark.timeout(180)
def test_flex_kernel_forward_equals_dense_mask_on_cpu() -> None:
    """The CUDA path's forward through compiled FlexAttention on CPU (its backward needs a GPU)."""
    from triarch.models.document_attention import _compiled_flex_attention

    positions = _positions([5, 1, 9, 12, 17], [44], [-7, 24, 13])  # 44 tokens: the last 8-token block is cut
    q, k, v = _qkv(2, positions.shape[1], grad=False)
    flex = _compiled_flex_attention()
    with torch.no_grad():
        got = flex(q, k, v, block_mask=document_blocks(positions, 8).block_mask, enable_gqa=True)
        torch.testing.assert_close(got, _dense(q, k, v, positions), rtol=1e-5, atol=1e-5)
        other = _positions([44], [1, 43], [-1, 8, 8, 8, 19])
        with torch._dynamo.config.patch(error_on_recompile=True):  # new documents, same shape: no recompile
            got = flex(q, k, v, block_mask=document_blocks(other, 8).block_mask, enable_gqa=True)
        torch.testing.assert_close(got, _dense(q, k, v, other), rtol=1e-5, atol=1e-5)


def _saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``run()`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def test_saved_memory_grows_linearly_not_quadratically() -> None:
    seqs = [512, 1024, 2048]
    dense, kernel = [], []
    for seq in seqs:
        positions = _positions([seq // 4, seq // 2, seq // 4], [seq])
        q, k, v = _qkv(2, seq, batch=2)
        dense.append(_saved_bytes(lambda: _dense(q, k, v, positions)))
        kernel.append(_saved_bytes(lambda: document_attention(q, k, v, document_segments(positions))))
    dense_growth = [b / a for a, b in zip(dense, dense[1:])]
    kernel_growth = [b / a for a, b in zip(kernel, kernel[1:])]
    assert all(g > 3.5 for g in dense_growth), (dense, dense_growth)
    assert all(g < 2.1 for g in kernel_growth), (kernel, kernel_growth)
    assert kernel[-1] * 4 < dense[-1], (kernel, dense)


def test_compiled_block_does_not_recompile_when_documents_change() -> None:
    torch.manual_seed(0)
    block = torch.compile(TransformerBlock(ARGS), backend="aot_eager")
    rope = Llama(ARGS).rope
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lengths in ([[5, 11], [16]], [[1, 2, 3, 10], [8, 8]], [[16], [-3, 4, 9]]):
            positions = _positions(*lengths)
            inputs = AttentionInputs(rope[positions], document_segments(positions))
            block(torch.randn(2, 16, ARGS.dim), inputs).sum().backward()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_selective_checkpointing_keeps_document_results(compiled: bool) -> None:
    """Selective AC (the segment kernel's SDPA outputs saved, the rest recomputed), also under compile."""
    from triarch.parallel.activation_checkpoint import apply_activation_checkpointing

    torch.manual_seed(0)
    plain = Llama(ARGS)
    checkpointed = Llama(ARGS)
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed, "selective")
    if compiled:
        for key, block in list(checkpointed.layers.items()):
            checkpointed.layers[key] = torch.compile(block, backend="aot_eager")
    positions = _positions([5, 11], [-3, 4, 9])
    tokens = torch.randint(0, ARGS.vocab_size, positions.shape, generator=torch.Generator().manual_seed(2))
    for model in (plain, checkpointed):
        model(tokens, position_ids=positions).logsumexp(-1).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
