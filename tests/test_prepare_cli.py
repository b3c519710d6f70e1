"""`triarch prepare` on user files with any tokenizer.json, then a short training run reads the shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "triarch.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _word_level_tokenizer(path: Path, words: list[str]) -> None:
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_prepare_user_files_with_given_tokenizer_then_train(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(60)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(words[(i + j) % 60] for j in range(150)))
    with open(corpus / "more.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(words[(3 * i + j) % 60] for j in range(150))}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"other": "no text field"}) + "\n")
    _word_level_tokenizer(tmp_path / "tokenizer.json", words)
    out = tmp_path / "prepared"
    result = _cli("prepare", str(corpus), "--tokenizer", str(tmp_path / "tokenizer.json"), "--out", str(out),
                  "--validation-fraction", "0.2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    total_docs = sum(s["documents"] for s in manifest["splits"].values())
    total_tokens = sum(s["tokens"] for s in manifest["splits"].values())
    assert total_docs == 80 and total_tokens == 80 * 151  # 150 words + EOS each
    assert manifest["bad_documents"]["invalid_json"] == 1 and manifest["bad_documents"]["missing_field"] == 1
    assert "bad documents skipped: 2" in result.stdout
    run = _cli("train", str(EXAMPLES / "tiny.yaml"), f"data.path={out}", "--run-dir", str(tmp_path / "run"),
               "model.vocab_size=64", "model.seq_len=32", "train.steps=3", "train.warmup_steps=1",
               "train.eval_interval=3", "train.eval_batches=1", "logging.log_interval=1", "logging.progress=off",
               cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 5  # eval 0, 3 steps, eval 3


def test_prepare_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file")
    for args, message in [
        (["prepare", "broken.parquet", "--out", "o"], f"error: cannot read '{tmp_path / 'broken.parquet'}'"),
        (["prepare", "missing_dir", "--out", "o"], "error: input 'missing_dir' does not exist"),
        (["prepare", "--out", "o", "--validation-fraction", "1.5"], "error: --validation-fraction (1.5) must be between 0 and 1"),
        (["prepare", ".", "--out", "o", "--tokenizer", "nope.json"], "error: "),
    ]:
        result = _cli(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()  # progress log lines may come before the error
        errors = [line for line in lines if line.startswith("error:")]
        assert errors == [lines[-1]] and lines[-1].startswith(message), result.stderr
        assert "Traceback" not in result.stderr
