"""Preference data: response-only loss masks, shapes, bad-record counts, prompt-only sets, order, DP slices."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.preference_format import read_preference_manifest
from triarch.data_pipeline.prepare import preferences as preference_module
from triarch.data_pipeline.prepare.preferences import prepare_preferences
from triarch.data_pipeline.prepare.tokenizer import train_byte_level_bpe
from triarch.data_pipeline.stream.preferences import PreferenceDataset, dp_slice_batch
from triarch.labels import IGNORE_INDEX

MAX_LEN = 48
N_PAIRS = 40


def _pair(i: int) -> dict[str, str]:
    return {"prompt": f"Question {i}: how many shards does rank {i % 4} read?",
            "chosen": f"Rank {i % 4} reads {i} shards, no more.",
            "rejected": f"It reads {i * 3} shards" + " maybe" * (i % 3)}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pref_tok") / "tokenizer.json"
    texts = [" ".join(_pair(i).values()) for i in range(200)]
    train_byte_level_bpe(texts, 400, path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_path))


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    _write_jsonl(root / "a.jsonl", [_pair(i) for i in range(N_PAIRS // 2)])
    _write_jsonl(root / "b.jsonl", [_pair(i) for i in range(N_PAIRS // 2, N_PAIRS)])
    prepare_preferences([root / "a.jsonl", root / "b.jsonl"], tokenizer_path, root / "out", MAX_LEN, shard_records=7)
    return root / "out"


def test_masks_cover_exactly_the_response(pairs: Path, tokenizer: Tokenizer) -> None:
    dataset = PreferenceDataset(pairs, seed=0)
    eos = dataset.eos_id
    assert len(dataset) == N_PAIRS
    for index in range(N_PAIRS):
        record = _pair(index)  # storage order is input order
        batch = dataset.examples([index])
        for side in ("chosen", "rejected"):
            ids, labels = batch[f"{side}_input_ids"][0], batch[f"{side}_labels"][0]
            counted = (labels != IGNORE_INDEX).nonzero().flatten()
            first, last = int(counted[0]), int(counted[-1])
            assert counted.tolist() == list(range(first, last + 1))  # one contiguous run
            target = labels[counted].tolist()
            assert target[-1] == eos and tokenizer.decode(target[:-1]) == record[side]
            assert tokenizer.decode(ids[:first + 1].tolist()) == record["prompt"]  # everything before is prompt
            assert torch.equal(labels[counted], ids[counted + 1])  # label = next token
            assert (ids[last + 2:] == dataset.pad_id).all()
            assert (labels[:first] == IGNORE_INDEX).all() and (labels[last + 1:] == IGNORE_INDEX).all()


def test_shapes_and_dtypes(pairs: Path) -> None:
    batch = PreferenceDataset(pairs, seed=1).global_batch(0, 8)
    assert sorted(batch) == ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
    assert all(v.shape == (8, MAX_LEN) and v.dtype == torch.int64 for v in batch.values())


def test_bad_records_counted_per_reason(tmp_path: Path, tokenizer_path: Path) -> None:
    good = [_pair(i) for i in range(5)]
    long_pair = {"prompt": "word " * 60, "chosen": "fine answer " * 20, "rejected": "short"}
    lines = [json.dumps(r).encode() for r in good] + [
        b'{"prompt": "unterminated',
        b"[1, 2, 3]",
        json.dumps({"prompt": "p", "chosen": "c"}).encode(),
        json.dumps({"prompt": "p", "chosen": 5, "rejected": "r"}).encode(),
        json.dumps({"prompt": "p", "chosen": "c", "rejected": "  "}).encode(),
        b'{"prompt": "\xff\xfe", "chosen": "c", "rejected": "r"}',
        b"",
        json.dumps(long_pair).encode(),
    ]
    source = tmp_path / "mixed.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    dropped = prepare_preferences(source, tokenizer_path, tmp_path / "drop", MAX_LEN, too_long="drop")
    assert dropped["bad_records"] == {"bad_json": 2, "invalid_utf8": 1, "missing_field": 1, "non_string": 1,
                                      "bad_margin": 0, "empty": 1, "too_long": 1, "truncated_file": 0}
    assert dropped["records"] == 5 and dropped["truncated"] == 0
    assert dropped["bad_examples"]["missing_field"] == f"{source}:8"

    kept = prepare_preferences(source, tokenizer_path, tmp_path / "trunc", MAX_LEN, too_long="truncate")
    assert kept["bad_records"]["too_long"] == 0 and kept["records"] == 6 and kept["truncated"] == 1
    dataset = PreferenceDataset(tmp_path / "trunc", seed=0)
    record = dataset.record(5)
    assert len(record["prompt"]) == MAX_LEN // 2  # the prompt keeps its end, max_prompt_len tokens
    for side in ("chosen", "rejected"):
        assert len(record["prompt"]) + len(record[side]) <= MAX_LEN
    assert record["chosen"][-1] != dataset.eos_id  # the cut response lost its EOS
    assert record["rejected"][-1] == dataset.eos_id  # the short one is whole


def test_truncated_gzip_and_missing_input(tmp_path: Path, tokenizer_path: Path) -> None:
    payload = gzip.compress("".join(json.dumps(_pair(i)) + "\n" for i in range(300)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(payload[: len(payload) * 2 // 3])
    manifest = prepare_preferences(tmp_path, tokenizer_path, tmp_path / "out", MAX_LEN)
    assert manifest["bad_records"]["truncated_file"] == 1 and 0 < manifest["records"] < 300
    with pytest.raises(DataError, match="not found: .*nope.jsonl") as info:
        prepare_preferences(tmp_path / "nope.jsonl", tokenizer_path, tmp_path / "x", MAX_LEN)
    assert "\n" not in str(info.value)


def test_prompt_only_set(tmp_path: Path, tokenizer_path: Path, tokenizer: Tokenizer) -> None:
    prompts = [{"prompt": _pair(i)["prompt"]} for i in range(10)] + [{"prompt": "tail " * 80 + "END"}]
    _write_jsonl(tmp_path / "prompts.jsonl", prompts)
    manifest = prepare_preferences(tmp_path / "prompts.jsonl", tokenizer_path, tmp_path / "out", MAX_LEN)
    assert manifest["kind"] == "prompts" and manifest["records"] == 11 and manifest["truncated"] == 1
    dataset = PreferenceDataset(tmp_path / "out", seed=0)
    batch = dataset.examples(list(range(11)))
    assert sorted(batch) == ["prompt_ids", "prompt_lengths"] and batch["prompt_ids"].shape == (11, MAX_LEN)
    for i in range(10):
        length = int(batch["prompt_lengths"][i])
        row = batch["prompt_ids"][i]
        assert (row[:MAX_LEN - length] == dataset.pad_id).all()  # left padding
        assert tokenizer.decode(row[MAX_LEN - length:].tolist()) == prompts[i]["prompt"]
    assert int(batch["prompt_lengths"][10]) == MAX_LEN
    assert tokenizer.decode(batch["prompt_ids"][10].tolist()).endswith("END")  # truncation keeps the end


def test_deterministic_seeded_order(pairs: Path) -> None:
    a, b, c = PreferenceDataset(pairs, seed=7), PreferenceDataset(pairs, seed=7), PreferenceDataset(pairs, seed=8)
    for step in range(6):  # 6 * 8 = 48 > 40: crosses into epoch 1
        first, second = a.global_batch(step, 8), b.global_batch(step, 8)
        assert all(torch.equal(first[k], second[k]) for k in first)
    assert a.global_indices(0, 8) != c.global_indices(0, 8)
    assert sorted(a.global_indices(0, N_PAIRS)) == list(range(N_PAIRS))  # an epoch sees each example once
    assert a.global_indices(N_PAIRS, N_PAIRS) != a.global_indices(0, N_PAIRS)  # epochs reshuffle
    resumed = PreferenceDataset(pairs, seed=7)
    resumed.load_state_dict(a.state_dict())
    assert resumed.consumed == 48
    after = resumed.next_global_batch(8)
    assert all(torch.equal(after[k], a.global_batch(6, 8)[k]) for k in after)  # resume continues the order
    with pytest.raises(DataError, match="seed"):
        c.load_state_dict(a.state_dict())


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_dp_slices_concatenate_to_global_batch(pairs: Path, dp_size: int) -> None:
    dataset = PreferenceDataset(pairs, seed=3)
    for step in range(3):
        whole = dataset.global_batch(step, 8)
        parts = [dp_slice_batch(whole, rank, dp_size) for rank in range(dp_size)]
        for key, value in whole.items():
            assert all(p[key].shape[0] == 8 // dp_size for p in parts)
            assert torch.equal(torch.cat([p[key] for p in parts]), value)


def test_manifest_last_and_idempotent(tmp_path: Path, tokenizer_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _write_jsonl(tmp_path / "p.jsonl", [_pair(i) for i in range(20)])
    out = tmp_path / "out"
    real_write = preference_module._write_shard
    calls = []

    def failing_write(*args: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(*args)

    monkeypatch.setattr(preference_module, "_write_shard", failing_write)
    with pytest.raises(OSError):
        prepare_preferences(source, tokenizer_path, out, MAX_LEN, shard_records=8)
    assert not (out / "manifest.json").exists()  # a half-written folder is never taken as finished
    with pytest.raises(DataError, match="no manifest"):
        PreferenceDataset(out, seed=0)
    monkeypatch.undo()
    manifest = prepare_preferences(source, tokenizer_path, out, MAX_LEN, shard_records=8)
    assert [s["records"] for s in manifest["shards"]] == [8, 8, 4]
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert prepare_preferences(source, tokenizer_path, out, MAX_LEN, shard_records=8) == manifest
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert read_preference_manifest(out)["records"] == 20
    with pytest.raises(DataError, match="another request"):
        prepare_preferences(source, tokenizer_path, out, MAX_LEN + 1, shard_records=8)


def test_margins_are_kept_per_pair_and_reach_both_rows(tokenizer_path: Path, tmp_path: Path) -> None:
    from triarch.data_pipeline.stream.preferences import PreferenceStream

    records = [{**_pair(i), "margin": i / 4} for i in range(8)]
    records += [{**_pair(8), "margin": "high"}, _pair(9), {**_pair(10), "margin": float("nan")}, {**_pair(11), "margin": True}]
    source = tmp_path / "margins.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = prepare_preferences(source, tokenizer_path, tmp_path / "out", MAX_LEN, shard_records=3)
    assert manifest["columns"] == ["prompt", "chosen", "rejected", "margin"] and manifest["records"] == 8
    assert manifest["bad_records"]["bad_margin"] == 3 and manifest["bad_records"]["missing_field"] == 1
    data = PreferenceDataset(tmp_path / "out", seed=0)
    assert [float(data.record(i)["margin"][0]) for i in range(8)] == [i / 4 for i in range(8)]
    stream = PreferenceStream(tmp_path / "out", "train", MAX_LEN, global_batch_size=4, seed=0, dp_rank=1, dp_size=2)
    batch = stream.batch_for_step(0)
    pairs = batch["example_ids"].view(-1, 2)[:, 0].tolist()
    assert batch["margin"].view(-1, 2).tolist() == [[p / 4, p / 4] for p in pairs]
    plain = prepare_preferences(_write_jsonl(tmp_path / "plain.jsonl", [_pair(i) for i in range(4)]), tokenizer_path,
                                tmp_path / "plain", MAX_LEN)
    assert "margin" not in plain["columns"] and "margin" not in PreferenceStream(
        tmp_path / "plain", "train", MAX_LEN, global_batch_size=2, seed=0, dp_rank=0, dp_size=1).batch_for_step(0)
