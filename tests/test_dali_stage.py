"""DALI stage: the same batches as the default path, clean end, clear errors (speed: benchmarks/dali_stage.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from triarch.data_pipeline import DataError, prepare_corpus, train_byte_level_bpe
from triarch.data_pipeline.stream import TokenStream
from triarch.data_pipeline.stream.dali_stage import DaliStage, loader_stage

SEQ_LEN = 32
GLOBAL_BATCH = 8
STEPS = 6


@pytest.fixture
def dali() -> object:
    return pytest.importorskip("nvidia.dali")


def _texts(count: int) -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "pipeline", "tensor", "shard", "token", "batch", "rank"]
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(5 + i % 23)) + f" {i}." for i in range(count)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dali_tokens")
    texts = _texts(400)
    tokenizer_path = root / "tok" / "tokenizer.json"
    train_byte_level_bpe(texts, 300, tokenizer_path)
    prepare_corpus({"train": texts}, tokenizer_path, root / "data", shard_tokens=2_000)
    return root / "data"


def _default_steps(data: Path, dp_rank: int, dp_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The default path the trainer uses: this rank's batches of the token stream (with document positions)."""
    stream = TokenStream(str(data), "train", SEQ_LEN, global_batch_size=GLOBAL_BATCH, seed=3, dp_rank=dp_rank,
                         dp_size=dp_size, position_ids=True)
    yield from stream.batches(STEPS)


def _assert_same(got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert list(a) == list(b), step
        for name in b:
            assert a[name].dtype == b[name].dtype, (step, name)
            assert a[name].shape == b[name].shape, (step, name)
            assert torch.equal(a[name].cpu(), b[name]), (step, name)


@pytest.mark.parametrize("dp_rank,dp_size", [(0, 1), (1, 2)])
@pytest.mark.parametrize("prefetch", [1, 3])
def test_dali_delivers_default_batches(dali: object, packed: Path, dp_rank: int, dp_size: int,
                                       prefetch: int) -> None:
    want = [{k: v.clone() for k, v in b.items()} for b in _default_steps(packed, dp_rank, dp_size)]
    got = list(DaliStage(_default_steps(packed, dp_rank, dp_size), device="cpu", prefetch_queue_depth=prefetch))
    _assert_same(got, want)
    assert all(b["input_ids"].dtype == torch.int64 and b["input_ids"].shape == (GLOBAL_BATCH // dp_size, SEQ_LEN)
               for b in got)


def test_dali_mixed_fields_and_short_last_step(dali: object) -> None:
    g = torch.Generator().manual_seed(0)
    want = [{"input_ids": torch.randint(0, 50_000, (rows, 16), generator=g),
             "labels": torch.randint(-100, 50_000, (rows, 16), generator=g),
             "mask": torch.rand(rows, 16, generator=g) > 0.5,
             "weights": torch.rand(rows, generator=g)} for rows in (4, 4, 4, 2)]
    got = list(DaliStage(iter(want), device="cpu"))
    _assert_same(got, want)


def test_dali_ends_cleanly(dali: object) -> None:
    assert list(DaliStage(iter([]), device="cpu")) == []
    batches = [{"input_ids": torch.full((2, 4), i)} for i in range(10)]
    stage = DaliStage(iter(batches), device="cpu", prefetch_queue_depth=2)
    for i, batch in enumerate(stage):
        assert int(batch["input_ids"][0, 0]) == i
        if i == 3:
            break  # the consumer stops early: the pipeline is released, nothing hangs
    with pytest.raises(DataError, match="iterated once"):
        list(stage)
    assert [int(b["input_ids"][0, 0]) for b in DaliStage(iter(batches), device="cpu")] == list(range(10))


def test_dali_rejects_inconsistent_steps(dali: object) -> None:
    steps = [{"input_ids": torch.zeros(2, 4, dtype=torch.int64)}, {"labels": torch.zeros(2, 4, dtype=torch.int64)}]
    with pytest.raises(DataError, match="has fields"):
        list(DaliStage(iter(steps), device="cpu"))
    steps = [{"input_ids": torch.zeros(2, 4, dtype=torch.int64)}, {"input_ids": torch.zeros(3, 4, dtype=torch.int64)}]
    with pytest.raises(DataError, match="rows"):
        list(DaliStage(iter(steps), device="cpu"))
    with pytest.raises(DataError, match="batch dimension"):
        list(DaliStage(iter([{"x": torch.tensor(1)}]), device="cpu"))


def test_loader_stage_choice(dali: object) -> None:
    batches = [{"input_ids": torch.ones(1, 2, dtype=torch.int64)}]
    assert loader_stage(batches, "default") is batches
    assert isinstance(loader_stage(batches, "dali", device="cpu"), DaliStage)
    with pytest.raises(DataError, match="data.loader 'fast'"):
        loader_stage(batches, "fast")


def test_missing_dali_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(DataError, match=r"pip install 'triarch\[dali\]'") as info:
        DaliStage(iter([]), device="cpu")
    assert "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dali_gpu_output(dali: object, packed: Path) -> None:
    want = [{k: v.clone() for k, v in b.items()} for b in _default_steps(packed, 0, 1)]
    got = list(DaliStage(_default_steps(packed, 0, 1), device="gpu"))
    assert all(t.is_cuda for b in got for t in b.values())
    _assert_same(got, want)


def test_dali_gpu_without_cuda_is_one_line(dali: object) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(DataError, match="needs CUDA"):
        DaliStage(iter([]), device="gpu")
