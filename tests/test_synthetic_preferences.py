"""The synthetic preference set (more helpful, less verbose), its judge, the prompt-hash split, and the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.preference_format import read_preference_manifest
from triarch.data_pipeline.prepare.preferences import prepare_preference_splits
from triarch.data_pipeline.prepare.pydocs import split_of, stdlib_docstrings
from triarch.data_pipeline.prepare.synthetic_preferences import (
    KINDS,
    MAX_TOO_SHORT_WORDS,
    MIN_EXTRA_WORDS,
    MIN_REJECTED_WORDS,
    make_synthetic_preferences,
)
from triarch.data_pipeline.stream.preferences import PreferenceDataset
from triarch.rlhf.judge import CONCISE_WORDS, judge, judge_parts, prefers

N_DOCS = 1500  # the first docstrings of the stdlib: enough for the pairs below, quick to parse
PAIRS = 120
EVAL_FRACTION = 0.15
MAX_LEN = 128


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return stdlib_docstrings(N_DOCS, workers=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, docs: list[str]) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "prefs"
    make_synthetic_preferences(out, seed=0, pairs=PAIRS, eval_fraction=EVAL_FRACTION, max_len=MAX_LEN, docs=docs)
    return out


def _pairs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(built: Path, docs: list[str], tmp_path: Path) -> None:
    first = _files(built)
    assert {"pairs.jsonl", "sft.jsonl", "synthetic.json", "tokenizer.json", "train/manifest.json",
            "validation/manifest.json", "train/tokenizer.json"} <= set(first)
    again = tmp_path / "again"
    shutil.copytree(built, again)  # keep the fixture's folder; rebuild into the same path
    shutil.rmtree(built)
    try:
        make_synthetic_preferences(built, seed=0, pairs=PAIRS, eval_fraction=EVAL_FRACTION, max_len=MAX_LEN,
                                   docs=docs)
        assert _files(built) == first
    finally:
        if not (built / "synthetic.json").is_file():
            shutil.rmtree(built, ignore_errors=True)
            shutil.copytree(again, built)
    other = tmp_path / "other"
    make_synthetic_preferences(other, seed=1, pairs=PAIRS, eval_fraction=EVAL_FRACTION, max_len=96, docs=docs)
    assert (other / "pairs.jsonl").read_bytes() != first["pairs.jsonl"]
    assert (other / "tokenizer.json").read_bytes() == first["tokenizer.json"]  # the seed picks pairs only
    assert {p["kind"] for p in _pairs(other)} == set(KINDS)
    for split in ("train", "validation"):  # a shorter budget is kept too
        dataset = PreferenceDataset(other / split, seed=0)
        for i in range(len(dataset)):
            rec = dataset.record(i)
            assert len(rec["prompt"]) + max(len(rec["chosen"]), len(rec["rejected"])) <= 96


def test_judge_prefers_chosen_on_every_pair(built: Path) -> None:
    pairs = _pairs(built)
    assert all(prefers(p["prompt"], p["chosen"], p["rejected"]) for p in pairs)
    summary = json.loads((built / "synthetic.json").read_text())
    assert summary["judge"]["agreed"] == PAIRS and summary["judge"]["agreement"] == 1.0
    for p in pairs:  # the differences the models must learn: length both ways, and filler / repetition / topic
        chosen, rejected = len(p["chosen"].split()), len(p["rejected"].split())
        assert chosen <= CONCISE_WORDS
        if p["kind"] == "too_short":
            assert rejected <= MAX_TOO_SHORT_WORDS < chosen and p["rejected"].endswith(".")
            assert p["chosen"].split()[:rejected - 1] == p["rejected"].split()[:-1]  # the true rest, cut
        else:
            assert rejected >= max(chosen + MIN_EXTRA_WORDS, MIN_REJECTED_WORDS)
        assert p["chosen"].startswith(" ") and p["rejected"].startswith(" ")
    shortest = {len(p["rejected"].split()) for p in pairs if p["kind"] == "too_short"}
    assert shortest == set(range(1, MAX_TOO_SHORT_WORDS + 1)), shortest  # " ." counts as one word


def test_splits_are_disjoint_and_sized_by_the_fraction(built: Path) -> None:
    pairs = _pairs(built)
    held_out = round(PAIRS * EVAL_FRACTION)
    by_split = {s: [p for p in pairs if p["split"] == s] for s in ("train", "validation")}
    assert len(by_split["validation"]) == held_out and len(by_split["train"]) == PAIRS - held_out
    prompts = {s: {p["prompt"] for p in ps} for s, ps in by_split.items()}
    assert not prompts["train"] & prompts["validation"] and len(prompts["train"]) == PAIRS - held_out
    assert all(split_of(p["prompt"].encode(), EVAL_FRACTION) == p["split"] for p in pairs)
    sft = [json.loads(line) for line in (built / "sft.jsonl").read_text().splitlines()]
    assert sft == [{"prompt": p["prompt"], "response": p["chosen"]} for p in by_split["train"]]
    summary = json.loads((built / "synthetic.json").read_text())
    assert summary["splits"] == {"train": PAIRS - held_out, "validation": held_out}


def test_prepared_folders_read_back_and_fit(built: Path) -> None:
    tokenizer = Tokenizer.from_file(str(built / "train" / "tokenizer.json"))
    pairs = _pairs(built)
    for split in ("train", "validation"):
        manifest = read_preference_manifest(built / split)
        assert manifest["truncated"] == 0 and not any(manifest["bad_records"].values())
        dataset = PreferenceDataset(built / split, seed=0)
        expected = [p for p in pairs if p["split"] == split]
        assert len(dataset) == len(expected) and dataset.max_len == MAX_LEN
        for i, pair in enumerate(expected):
            rec = dataset.record(i)
            assert len(rec["prompt"]) + max(len(rec["chosen"]), len(rec["rejected"])) <= MAX_LEN
            assert tokenizer.decode(rec["prompt"].tolist()) == pair["prompt"]
            for side in ("chosen", "rejected"):
                assert rec[side][-1] == dataset.eos_id and tokenizer.decode(rec[side][:-1].tolist()) == pair[side]
        batch = dataset.global_batch(0, 4)
        assert batch["chosen_input_ids"].shape == (4, MAX_LEN)


def test_every_kind_of_rejected_is_present_and_balanced(built: Path) -> None:
    pairs = _pairs(built)
    counts = {kind: sum(p["kind"] == kind for p in pairs) for kind in KINDS}
    assert set(counts) == set(KINDS) and max(counts.values()) - min(counts.values()) <= 1, counts
    summary = json.loads((built / "synthetic.json").read_text())
    assert {k: sum(v.values()) for k, v in summary["kinds"].items()} == counts
    assert summary["seed"] == 0 and summary["tokenizer"]["trained"]


def test_bad_requests_are_data_errors(built: Path, docs: list[str], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not empty"):
        make_synthetic_preferences(built, pairs=PAIRS, docs=docs)
    with pytest.raises(DataError, match="pairs \\(5\\)"):
        make_synthetic_preferences(tmp_path / "a", pairs=5, docs=docs)
    with pytest.raises(DataError, match="eval_fraction"):
        make_synthetic_preferences(tmp_path / "a", eval_fraction=1.0, docs=docs)
    with pytest.raises(DataError, match="only .* synthetic pairs"):
        make_synthetic_preferences(tmp_path / "b", pairs=5000, docs=docs[:300])


@pytest.mark.parametrize("response", ["", "   ", "\x00\ud800\n\t", "## ?? 123 === ", "ab" * 5000,
                                      "the the the the the the the the the", "日本語のテキスト。", "x" * 10 + ".",
                                      " ".join(["word"] * 3000)])
def test_judge_scores_anything(response: str) -> None:
    parts = judge_parts("Return the value of a key", response)
    assert math.isfinite(parts.score) and parts.score == judge("Return the value of a key", response)
    assert 0.0 <= parts.helpfulness <= 1.0 and parts.verbosity >= 0.0
    assert math.isclose(parts.score, parts.helpfulness - parts.verbosity)


def test_judge_states_the_goal() -> None:
    prompt = "Return the size of the terminal window"
    concise = " as a tuple of columns and lines."
    assert judge(prompt, concise) > judge(prompt, concise + " In other words, that is basically what it does.")
    assert judge(prompt, concise) > judge(prompt, concise + " Again," + concise + " Again," + concise)
    assert judge(prompt, concise) > judge(prompt, concise + " Parse the header and decode the payload." * 4)
    assert judge(prompt, concise) > judge(prompt, " qzx vbnm 8812 ## ;;")  # token soup
    assert judge(prompt, " in terminal columns.") > judge(prompt, " in raw bytes.")  # on topic wins a tie on length
    assert judge(prompt, concise) > judge(prompt, "")


def test_prompt_hash_split_of_any_jsonl(tmp_path: Path, built: Path) -> None:
    source = tmp_path / "in.jsonl"
    records = [{"prompt": f"Question {i % 50}", "chosen": f" answer {i}.", "rejected": f" a long answer {i}" * 3}
               for i in range(200)]
    source.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    manifests = prepare_preference_splits(source, built / "tokenizer.json", tmp_path / "out", 64, eval_fraction=0.2)
    assert manifests["train"]["records"] + manifests["validation"]["records"] == 200
    assert manifests["validation"]["bad_records"]["bad_json"] == 1
    assert manifests["validation"]["request"]["split"]["name"] == "validation"
    held = {r["prompt"] for r in records if split_of(r["prompt"].encode(), 0.2) == "validation"}
    assert manifests["validation"]["records"] == sum(r["prompt"] in held for r in records) > 0
    again = prepare_preference_splits(source, built / "tokenizer.json", tmp_path / "out", 64, eval_fraction=0.2)
    assert again == manifests  # the same request: nothing to do
    with pytest.raises(DataError, match="another request"):
        prepare_preference_splits(source, built / "tokenizer.json", tmp_path / "out", 64, eval_fraction=0.3)


def test_cli(run_cli, built: Path, tmp_path: Path) -> None:
    tok = built / "tokenizer.json"
    errors = {
        ("--synthetic", "--out", built): "is not empty",
        ("--synthetic", "--out", tmp_path / "n", "--pairs", "5"): "--pairs (5) must be at least 10",
        ("--synthetic", "--out", tmp_path / "n", "--eval-fraction", "0"): "--eval-fraction (0.0) must be",
        ("--synthetic", "--out", tmp_path / "n", "--tokenizer", tmp_path / "no.json"): "does not exist",
        ("--synthetic", built / "pairs.jsonl", "--out", tmp_path / "n"): "--synthetic takes no input files",
        (built / "pairs.jsonl", "--out", tmp_path / "n"): "give input files and --tokenizer",
        ("--out", tmp_path / "n", "--tokenizer", tok): "give input files and --tokenizer",
        (tmp_path / "missing.jsonl", "--out", tmp_path / "n", "--tokenizer", tok): "preference input not found",
        ("--synthetic", "--out", tmp_path / "n", "--max-len", "0"): "must be positive",
        ("--synthetic", "--out", tmp_path / "n", "--max-len", "64"): "max_len (64) must be at least 96",
    }
    for args, message in errors.items():
        code, err = run_cli("prepare-preferences", *args)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "n").exists()
    code, err = run_cli("prepare-preferences", built / "pairs.jsonl", "--tokenizer", tok, "--out", tmp_path / "j",
                        "--eval-fraction", str(EVAL_FRACTION))
    assert code == 0, err
    for split in ("train", "validation"):  # the synthetic split is the prompt-hash split of its pairs.jsonl
        assert (tmp_path / "j" / split / "shard_00000.arrow").read_bytes() == \
            (built / split / "shard_00000.arrow").read_bytes()


def test_cli_builds_the_synthetic_set(run_cli, tmp_path: Path) -> None:
    """The default path: every stdlib docstring, the demo corpus's BPE trained into OUT."""
    out = tmp_path / "synthetic"
    code, err = run_cli("prepare-preferences", "--synthetic", "--out", out, "--pairs", "40", "--seed", "3")
    assert code == 0, err
    summary = json.loads((out / "synthetic.json").read_text())
    assert summary["seed"] == 3 and summary["splits"] == {"train": 36, "validation": 4}
    assert summary["tokenizer"]["trained"] and summary["docstrings"] > N_DOCS
    assert read_preference_manifest(out / "train")["tokenizer"]["vocab_size"] == 2048  # the demo's model.vocab_size


def test_an_empty_held_out_split_is_named(tmp_path: Path, built: Path) -> None:
    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps({"prompt": "Only one", "chosen": " pair.", "rejected": " a worse pair."}) + "\n")
    split = split_of(b"Only one", 0.01)
    empty = "validation" if split == "train" else "train"
    with pytest.raises(DataError, match=f"no usable preference records for the {empty} split"):
        prepare_preference_splits(source, built / "tokenizer.json", tmp_path / "out", 64, eval_fraction=0.01)


def test_a_failed_preparation_leaves_no_folder_behind(run_cli, tmp_path: Path, built: Path) -> None:
    """One pair cannot fill both splits: the command fails part-way, after writing one split, and must leave
    --out as it found it, so the corrected command can run."""
    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps({"prompt": "Only one", "chosen": " pair.", "rejected": " a worse pair."}) + "\n")
    for out in (tmp_path / "absent", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        code, err = run_cli("prepare-preferences", source, "--tokenizer", built / "tokenizer.json", "--out", out)
        assert code == 2 and err.startswith("error: "), err
        assert (out.is_dir() and not any(out.iterdir())) if out.name == "empty" else not out.exists()
