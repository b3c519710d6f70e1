"""Two ``triarch prepare`` runs into one output folder: the second is a one-line error, the first finishes
intact; a finished folder is still reusable while locked. (A killed holder leaves the folder unlocked:
``test_prepare_resume`` resumes a SIGKILLed prepare in place.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from triarch.data_pipeline import DataError, prepare_corpus, read_manifest
from triarch.data_pipeline.prepare.folder_lock import LOCK_NAME, prepare_lock

WORDS = [f"w{i}" for i in range(50)]
WAIT_S = 120
DOCUMENTS = 10_000


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lock")
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(DOCUMENTS):
            f.write(json.dumps({"text": " ".join(WORDS[(i * 7 + j) % 50] for j in range(40 + i % 60))}) + "\n")
    return root / "corpus.jsonl", root / "tokenizer.json"


def _prepare_cmd(inputs: tuple[Path, Path], out: Path) -> list[str]:
    corpus, tokenizer = inputs
    return [sys.executable, "-m", "triarch.cli", "prepare", str(corpus), "--out", str(out), "--tokenizer",
            str(tokenizer), "--shard-tokens", "5000", "--workers", "1", "--no-progress"]


def _wait_for_lock_holder(out: Path, pid: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            if (out / LOCK_NAME).read_text().strip() == str(pid):
                return
        except OSError:
            pass
        time.sleep(0.002)
    raise AssertionError(f"prepare (pid {pid}) never took the lock of {out}")


def test_second_prepare_into_the_same_folder_is_refused(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = subprocess.Popen(_prepare_cmd(inputs, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock_holder(out, first.pid)
        os.kill(first.pid, signal.SIGSTOP)  # frozen while holding the lock: the second run surely overlaps it
        try:
            assert first.poll() is None and not (out / "manifest.json").exists(), "the first run ended too soon"
            second = subprocess.run(_prepare_cmd(inputs, out), capture_output=True, text=True, timeout=WAIT_S)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=WAIT_S)
    finally:
        first.kill()
    assert second.returncode != 0
    assert second.stderr.strip().splitlines() == [
        f"error: {out} is being prepared by another process (pid {first.pid}); wait for it to finish or choose "
        f"another output folder"]
    assert first.returncode == 0, stderr[-2000:]
    assert read_manifest(out)["totals"]["documents"] == DOCUMENTS
    again = subprocess.run(_prepare_cmd(inputs, out), capture_output=True, text=True, timeout=WAIT_S)
    assert again.returncode == 0 and f"{DOCUMENTS} documents" in again.stdout, again.stderr[-2000:]


def test_lock_is_held_only_while_writing(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    _, tokenizer = inputs
    texts = {"train": [" ".join(WORDS[i:i + 20]) for i in range(30)]}
    out = tmp_path / "in_process"
    with prepare_lock(out), pytest.raises(DataError, match=f"pid {os.getpid()}"):
        prepare_corpus(texts, tokenizer, out, workers=0, progress=False)
    assert not (out / "manifest.json").exists()
    prepare_corpus(texts, tokenizer, out, workers=0, progress=False)
    with prepare_lock(out):  # a finished folder is reused without taking the lock
        assert prepare_corpus(texts, tokenizer, out, workers=0, progress=False) == out
