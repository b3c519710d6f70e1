"""SFT data: loss masks (prompt/response, built-in and tokenizer chat templates), bad-record counts, the
held-out split and the output folder, packing (whole examples, labels inside one example, restarting
positions), DP slices, resume, integrity, and the ``triarch prepare-sft`` CLI's one-line errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from tokenizers import Tokenizer

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.prepare.sft import prepare_sft
from triarch.data_pipeline.prepare.tokenizer import train_byte_level_bpe
from triarch.data_pipeline.sft_format import read_sft_manifest
from triarch.data_pipeline.stream.sft import SFTStream
from triarch.labels import IGNORE_INDEX

MAX_LEN = 96
SEQ_LEN = 64  # the longest chats (65-68 tokens) are cut by the stream
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _pair(i: int) -> dict[str, str]:
    return {"prompt": f"Question {i}: how many shards does rank {i % 4} read?",
            "response": f"Rank {i % 4} reads {i} shards" + ", no more" * (i % 4) + "."}


def _chat(i: int) -> dict[str, list[dict[str, str]]]:
    return {"messages": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"It is {2 * i}."},
                         {"role": "user", "content": "And doubled" + " again" * (i % 3) + "?"},
                         {"role": "assistant", "content": f"Then {4 * i}" + ", surely" * (i % 5) + "."}]}


def _records(n: int) -> list[dict]:
    return [_pair(i) if i % 2 else _chat(i) for i in range(n)]


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sft_tok")
    texts = [json.dumps(r) for r in _records(200)] + [CHATML]
    train_byte_level_bpe(texts, 400, folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """60 examples, half prompt/response and half chats of two assistant turns, in 9 shards."""
    root = tmp_path_factory.mktemp("sft_mixed")
    _write_jsonl(root / "a.jsonl", _records(60))
    prepare_sft(root / "a.jsonl", tokenizer_dir / "tokenizer.json", root / "out", max_len=MAX_LEN, shard_records=7)
    return root / "out"


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of 1s in ``mask``."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int64), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def test_prompt_response_mask_is_exactly_the_response(mixed: Path, tokenizer: Tokenizer) -> None:
    stream = SFTStream(mixed, "train", SEQ_LEN, global_batch_size=2)
    eos = stream.eos_id
    for index in range(1, 60, 2):  # storage order is input order; odd records are prompt/response
        tokens, mask = stream.example(index)
        record = _pair(index)
        assert _runs(mask) == [(_runs(mask)[0][0], len(tokens))]  # one trained run, to the end
        start = _runs(mask)[0][0]
        assert tokens[-1] == eos and tokenizer.decode(tokens[start:-1].tolist()) == record["response"]
        assert tokenizer.decode(tokens[:start].tolist()) == record["prompt"]


def test_builtin_chat_masks_both_assistant_turns_only(mixed: Path, tokenizer: Tokenizer) -> None:
    stream = SFTStream(mixed, "train", SEQ_LEN, global_batch_size=2)
    manifest = read_sft_manifest(mixed)
    assert manifest["template"]["kind"] == "builtin" and manifest["records"] == 60 and manifest["truncated"] == 0
    for index in range(0, 60, 2):
        tokens, mask = stream.example(index)
        assistant = [m["content"] for m in _chat(index)["messages"] if m["role"] == "assistant"]
        runs = _runs(mask)
        assert len(runs) == 2
        for (start, stop), content in zip(runs, assistant):
            assert tokens[stop - 1] == stream.eos_id
            assert tokenizer.decode(tokens[start:stop - 1].tolist()) == content
        untrained = tokenizer.decode(tokens[mask == 0].tolist())
        user = [m["content"] for m in _chat(index)["messages"] if m["role"] != "assistant"]
        assert untrained == ("<|system|>\n{}\n<|user|>\n{}\n<|assistant|>\n<|user|>\n{}\n<|assistant|>\n"
                             .format(*user))


def test_tokenizer_chat_template(tmp_path: Path, tokenizer_dir: Path) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    with_specials = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    with_specials.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # as a ChatML tokenizer has them
    with_specials.save(str(folder / "tokenizer.json"))
    refusing = CHATML.replace("{% for m in messages %}",
                              "{% for m in messages %}{% if 'forbidden' in m.content %}"
                              "{{ raise_exception('no') }}{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": refusing, "eos_token": "<|im_end|>"}))
    chats = [_chat(i) for i in range(6)]
    bad = _chat(7)
    bad["messages"][1]["content"] = "forbidden words"
    _write_jsonl(tmp_path / "chat.jsonl", [*chats, bad])
    manifests = prepare_sft(tmp_path / "chat.jsonl", folder, tmp_path / "out", max_len=MAX_LEN * 2)
    manifest = manifests["train"]
    assert manifest["template"]["kind"] == "tokenizer" and manifest["records"] == 6
    assert manifest["bad_records"]["template_error"] == 1
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()  # the folder carries its template
    stream = SFTStream(tmp_path / "out", "train", MAX_LEN * 2, global_batch_size=1)
    for index, chat in enumerate(chats):
        tokens, mask = stream.example(index)
        runs = _runs(mask)
        assistant = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
        decoded = [with_specials.decode(tokens[a:b].tolist(), skip_special_tokens=False) for a, b in runs]
        assert decoded == [f"{c}<|im_end|>\n" for c in assistant]
        assert [int(tokens[b - 2]) for a, b in runs] == [with_specials.token_to_id("<|im_end|>")] * 2  # one token
        rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat["messages"])
        assert with_specials.decode(tokens.tolist(), skip_special_tokens=False) == rendered
    builtin = prepare_sft(tmp_path / "chat.jsonl", folder, tmp_path / "builtin", template="builtin")["train"]
    assert builtin["template"]["kind"] == "builtin" and builtin["records"] == 7
    with pytest.raises(DataError, match="needs a chat_template"):
        prepare_sft(tmp_path / "chat.jsonl", tokenizer_dir, tmp_path / "none", template="tokenizer")


def test_bad_records_counted_per_reason(tmp_path: Path, tokenizer_dir: Path) -> None:
    good = [_pair(i) for i in range(5)]
    chat = _chat(1)["messages"]
    lines = [json.dumps(r).encode() for r in good] + [
        b'{"prompt": "unterminated',  # bad_json
        b"[1, 2, 3]",  # bad_json
        b'{"prompt": "\xff\xfe", "response": "r"}',  # invalid_utf8
        b'{"prompt": "\\ud800", "response": "r"}',  # invalid_utf8: a lone surrogate
        json.dumps({"prompt": "p"}).encode(),  # missing_field
        json.dumps({"messages": [{"role": "user"}]}).encode(),  # missing_field
        json.dumps({"prompt": "p", "response": 5}).encode(),  # wrong_type
        json.dumps({"messages": "hello"}).encode(),  # wrong_type
        json.dumps({"prompt": "p", "response": "  "}).encode(),  # empty
        json.dumps({"messages": []}).encode(),  # empty
        json.dumps({"messages": [*chat[:2], {"role": "tool", "content": "x"}, chat[2]]}).encode(),  # unknown_role
        json.dumps({"messages": chat[:2]}).encode(),  # no_assistant_turn
        json.dumps({"prompt": "Question 3?", "response": "Rank 1 reads 3 shards, no more." * 30}).encode(),  # too_long
        b"",
    ]
    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / "mixed.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    payload = gzip.compress("".join(json.dumps(_pair(i)) + "\n" for i in range(300)).encode())
    (tmp_path / "in" / "cut.jsonl.gz").write_bytes(payload[: len(payload) * 2 // 3])

    dropped = prepare_sft(tmp_path / "in", tokenizer_dir, tmp_path / "drop", max_len=MAX_LEN, too_long="drop")["train"]
    assert dropped["bad_records"] == {"bad_json": 2, "invalid_utf8": 2, "missing_field": 2, "wrong_type": 2,
                                      "empty": 2, "unknown_role": 1, "no_assistant_turn": 1, "template_error": 0,
                                      "too_long": 1, "truncated_file": 1}
    assert dropped["bad_examples"]["missing_field"] == f"{source}:10"
    from_gzip = dropped["records"] - 5
    assert 0 < from_gzip < 300 and dropped["truncated"] == 0

    kept = prepare_sft(tmp_path / "in", tokenizer_dir, tmp_path / "trunc", max_len=MAX_LEN)["train"]
    assert kept["bad_records"]["too_long"] == 0 and kept["truncated"] == 1 and kept["records"] == dropped["records"] + 1
    stream = SFTStream(tmp_path / "trunc", "train", SEQ_LEN, global_batch_size=1)
    lengths = [len(stream.example(i)[0]) for i in range(len(stream))]
    assert max(lengths) == MAX_LEN and stream.truncated_examples == sum(n > SEQ_LEN for n in lengths) >= 1
    # a cut that leaves nothing to train on drops the example, counted as too_long
    _write_jsonl(tmp_path / "long_prompt.jsonl", [{"prompt": "word " * 200, "response": "yes"}, _pair(1)])
    only = prepare_sft(tmp_path / "long_prompt.jsonl", tokenizer_dir, tmp_path / "lp", max_len=MAX_LEN)["train"]
    assert only["records"] == 1 and only["bad_records"]["too_long"] == 1


def _segments(positions: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) of each pseudo-document of a row (position ids restarting at 0)."""
    starts = (positions == 0).nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [len(positions)]))


def test_the_launch_warns_when_examples_are_cut_to_seq_len(mixed: Path, capsys: pytest.CaptureFixture) -> None:
    """Cutting an example longer than model.seq_len is by design, but said before training, with the count."""
    from triarch.cli import check_sft_data
    from triarch.config import load_config

    cut = SFTStream(mixed, "train", SEQ_LEN, global_batch_size=4).truncated_examples
    overrides = [f"data.path={mixed}", "objective.kind=sft", "train.eval_interval=0", "model.vocab_size=4096",
                 "train.global_batch_size=4", "train.micro_batch_size=4"]
    check_sft_data(load_config(None, [*overrides, f"model.seq_len={SEQ_LEN}"]))
    assert capsys.readouterr().err.strip() == (
        f"warning: {cut} of 60 examples of split 'train' in data.path '{mixed}' are longer than model.seq_len "
        f"({SEQ_LEN}) and are cut to their first model.seq_len tokens")
    check_sft_data(load_config(None, [*overrides, f"model.seq_len={MAX_LEN}"]))
    assert capsys.readouterr().err == ""


def test_packing_keeps_examples_whole_and_labels_inside(mixed: Path) -> None:
    stream = SFTStream(mixed, "train", SEQ_LEN, global_batch_size=4, seed=3)
    n = len(stream)
    assert stream.truncated_examples > 0  # the longest chats are cut to seq_len, and still whole rows
    rows_epoch0, rows_epoch1 = stream.rows_in_epoch(0), stream.rows_in_epoch(1)
    batch = stream.rows(0, rows_epoch0 + rows_epoch1)
    seen: list[int] = []
    for r in range(rows_epoch0 + rows_epoch1):
        ids, labels, positions = batch["input_ids"][r], batch["labels"][r], batch["position_ids"][r]
        examples = stream.row_examples(r).tolist()
        seen += examples
        segments = _segments(positions)
        assert len(segments) in (len(examples), len(examples) + 1)  # + the padding, if any
        expected = torch.full((SEQ_LEN,), IGNORE_INDEX)
        for (start, stop), index in zip(segments, examples):
            tokens, mask = stream.example(index)
            tokens, mask = torch.from_numpy(tokens[:SEQ_LEN].astype(np.int64)), torch.from_numpy(mask[:SEQ_LEN].copy())
            assert stop - start == len(tokens) and torch.equal(ids[start:stop], tokens)  # whole, in one row
            expected[start:stop - 1] = torch.where(mask[1:] == 1, tokens[1:], IGNORE_INDEX)
        assert torch.equal(labels, expected)  # the next token of the same example, where trained
        if len(segments) > len(examples):
            start = segments[-1][0]
            assert (ids[start:] == stream.pad_id).all() and (labels[start:] == IGNORE_INDEX).all()
        if len(segments) > len(examples) and r + 1 not in (rows_epoch0, rows_epoch0 + rows_epoch1):
            assert start + len(stream.example(stream.row_examples(r + 1)[0])[0][:SEQ_LEN]) > SEQ_LEN  # did not fit
        counted = (labels != IGNORE_INDEX).nonzero().flatten()
        assert (positions[counted + 1] == positions[counted] + 1).all()  # never across a boundary
    assert sorted(seen[:len(seen) // 2]) == list(range(n)) == sorted(seen[len(seen) // 2:])  # each once per epoch
    assert seen[:n] == stream.permutation(0).tolist() and seen[n:] == stream.permutation(1).tolist()


def test_dp_slices_concatenate_to_the_global_batch(mixed: Path) -> None:
    whole = SFTStream(mixed, "train", SEQ_LEN, global_batch_size=4, seed=5)
    for step in (0, 3, whole.rows_in_epoch(0) // 4):  # the last one reaches into epoch 1
        expected = whole.global_batch(step)
        assert torch.equal(expected["input_ids"], whole.batch_for_step(step)["input_ids"])
        for dp in (2, 4):
            parts = [SFTStream(mixed, "train", SEQ_LEN, global_batch_size=4, seed=5, dp_rank=r,
                               dp_size=dp).batch_for_step(step) for r in range(dp)]
            for key in ("input_ids", "labels", "position_ids"):
                assert torch.equal(torch.cat([p[key] for p in parts]), expected[key]), (dp, key)
    with pytest.raises(DataError, match="divisible by dp_size"):
        SFTStream(mixed, "train", SEQ_LEN, global_batch_size=4, dp_size=3, dp_rank=0)


def test_resume_mid_epoch_equals_uninterrupted(mixed: Path) -> None:
    reference = SFTStream(mixed, "train", SEQ_LEN, global_batch_size=4, seed=7)
    steps = reference.rows_in_epoch(0) // 4 + 3  # crosses into epoch 1
    expected = list(reference.batches(steps))
    first = SFTStream(mixed, "train", SEQ_LEN, global_batch_size=4, seed=7)
    list(first.batches(5))
    state = json.loads(json.dumps(first.state_dict()))
    assert state["consumed_sequences"] == 20 and first.consumed_examples > 20
    for dp in (1, 2):
        resumed = [SFTStream(mixed, "train", SEQ_LEN, global_batch_size=4, seed=7, dp_rank=r, dp_size=dp)
                   for r in range(dp)]
        for stream in resumed:
            stream.load_state_dict(state)
        parts = [list(stream.batches(steps - 5)) for stream in resumed]
        for k in range(steps - 5):
            got = torch.cat([p[k]["input_ids"] for p in parts])
            assert torch.equal(got, expected[5 + k]["input_ids"]), (dp, k)
            assert torch.equal(torch.cat([p[k]["labels"] for p in parts]), expected[5 + k]["labels"])
    other_seed = SFTStream(mixed, "train", SEQ_LEN, global_batch_size=4, seed=8)
    with pytest.raises(DataError, match="seed=7") as info:
        other_seed.load_state_dict(state)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="data_sha256"):
        other_seed.load_state_dict({**state, "seed": 8, "data_sha256": "0" * 64})
    with pytest.raises(DataError, match="not an SFT stream"):
        other_seed.load_state_dict({"consumed_sequences": 3, "seed": 8, "datasets": []})


def test_trainer_interface(mixed: Path) -> None:
    from triarch.training.data_checks import integrity_problem, placeholder_batch

    stream = SFTStream(mixed, "train", SEQ_LEN, global_batch_size=4, dp_rank=1, dp_size=2, shuffle=False)
    batch = next(iter(stream.batches(1)))
    assert all(v.shape == (2, SEQ_LEN) and v.dtype == torch.int64 for v in batch.values())
    assert sorted(placeholder_batch(stream)) == sorted(batch)
    assert stream.consumed_sequences == 4 and stream.windows_per_epoch == (stream.rows_in_epoch(0),)
    assert stream.rows_in_epoch(0) == stream.rows_in_epoch(1)  # unshuffled: every epoch packs alike
    assert integrity_problem([stream], wait=True) is None and stream.vocab_size == 400
    stream.close()


def test_damaged_shard_is_reported(tmp_path: Path, tokenizer_dir: Path) -> None:
    _write_jsonl(tmp_path / "a.jsonl", _records(20))
    prepare_sft(tmp_path / "a.jsonl", tokenizer_dir, tmp_path / "out", shard_records=10)
    shard = tmp_path / "out" / "shard_00001.arrow"
    data = bytearray(shard.read_bytes())
    buffer = pa.py_buffer(bytes(data))
    values = pa.ipc.open_file(buffer).read_all().column("tokens").chunks[0].values.buffers()[1]
    data[values.address - buffer.address] ^= 1  # a token id, still a valid one: only the hash can tell
    shard.write_bytes(bytes(data))
    stream = SFTStream(tmp_path / "out", "train", SEQ_LEN, global_batch_size=2)
    stream.batch_for_step(0)
    assert "shard_00001.arrow has sha256" in (stream.wait_integrity() or "")
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(DataError, match="shard_00001.arrow is .* bytes, the manifest says"):
        SFTStream(tmp_path / "out", "train", SEQ_LEN, global_batch_size=2)


def test_held_out_split_and_output_folder(tmp_path: Path, tokenizer_dir: Path) -> None:
    _write_jsonl(tmp_path / "a.jsonl", _records(80))
    out = tmp_path / "out"
    manifests = prepare_sft(tmp_path / "a.jsonl", tokenizer_dir, out, eval_fraction=0.25, seed=1)
    train, validation = manifests["train"]["records"], manifests["validation"]["records"]
    assert train + validation == 80 and 8 <= validation <= 32
    for split in ("train", "validation"):
        assert {p.name for p in (out / split).iterdir()} == {"manifest.json", "shard_00000.arrow", "tokenizer.json"}
    assert len(SFTStream(out, "validation", SEQ_LEN, global_batch_size=1)) == validation
    assert len(SFTStream(out, "train", SEQ_LEN, global_batch_size=1)) == train
    again = prepare_sft(tmp_path / "a.jsonl", tokenizer_dir, tmp_path / "again", eval_fraction=0.25, seed=1)
    assert again["validation"]["shards"][0]["sha256"] == manifests["validation"]["shards"][0]["sha256"]
    mtime = (out / "train" / "manifest.json").stat().st_mtime_ns
    prepare_sft(tmp_path / "a.jsonl", tokenizer_dir, out, eval_fraction=0.25, seed=1)  # same request: no work
    assert (out / "train" / "manifest.json").stat().st_mtime_ns == mtime
    whole = prepare_sft(tmp_path / "a.jsonl", tokenizer_dir, out)["train"]  # another request rewrites it
    assert whole["records"] == 80 and not (out / "train").exists() and not (out / "validation").exists()
    with pytest.raises(DataError, match="no SFT split 'validation'"):
        SFTStream(out, "validation", SEQ_LEN, global_batch_size=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and not an earlier SFT output"):
        prepare_sft(tmp_path / "a.jsonl", tokenizer_dir, tmp_path / "busy")


def test_cli(tmp_path: Path, tokenizer_dir: Path, run_cli, capsys: pytest.CaptureFixture) -> None:
    _write_jsonl(tmp_path / "a.jsonl", _records(20))
    base = ["prepare-sft", tmp_path / "a.jsonl", "--tokenizer", tokenizer_dir]
    code, err = run_cli("prepare-sft", tmp_path / "nope.jsonl", "--tokenizer", tokenizer_dir, "--out", tmp_path / "x")
    assert code == 2 and err.strip().count("\n") == 0 and "SFT input not found" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, err = run_cli(*base, "--out", tmp_path / "busy")
    assert code == 2 and err.strip().count("\n") == 0 and "not an earlier SFT output" in err
    code, err = run_cli(*base, "--out", tmp_path / "y", "--eval-fraction", "1.5")
    assert code == 2 and err.strip().count("\n") == 0 and "--eval-fraction (1.5)" in err
    code, err = run_cli(*base, "--out", tmp_path / "y", "--max-len", "0")
    assert code == 2 and err.strip().count("\n") == 0
    from triarch.cli import build_parser, cmd_prepare_sft

    args = build_parser().parse_args([str(a) for a in [*base, "--out", tmp_path / "ok", "--eval-fraction", "0.2",
                                                       "--max-len", "32"]])
    capsys.readouterr()
    assert cmd_prepare_sft(args) == 0
    out = capsys.readouterr().out
    assert "prepared SFT data in" in out and "train " in out and "validation " in out and "truncated" in out
    assert read_sft_manifest(tmp_path / "ok" / "validation")["max_len"] == 32
