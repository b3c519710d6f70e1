"""Document-boundary attention: per-document position ids make each packed document compute as if alone.

Unit: the model's logits for a row packing two documents equal each document's logits run alone. Layouts:
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
from triarch.models.llama import Llama, LlamaArgs, document_mask

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
