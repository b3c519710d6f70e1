"""`triarch prepare --out`: a file, a folder under a file, a read-only mount and a folder the user may not
write are one-line errors (exit 2); an output folder that is an input (or holds one) is refused; one inside
an input folder is never read as input, so a rerun is idempotent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = [f"w{i}" for i in range(40)]
NOBODY = "nobody"


def _cli(*args: str, cwd: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "triarch.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _one_error_line(result: subprocess.CompletedProcess, start: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], result.stderr
    assert lines[-1].startswith(start), lines[-1]
    return lines[-1]


def _make_corpus(root: Path) -> tuple[Path, Path]:
    """A folder of .txt documents and a word-level tokenizer.json beside it, readable by anyone."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(WORDS[(5 * i + j) % 40] for j in range(60)))
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    return corpus, root / "tokenizer.json"


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, Path]:
    return _make_corpus(tmp_path)


def _prepare(corpus: Path, tokenizer: Path, out: str, cwd: Path, *extra: str,
             prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return _cli("prepare", str(corpus), "--tokenizer", str(tokenizer), "--out", out, "--no-progress", *extra,
                cwd=cwd, prefix=prefix)


def test_out_that_is_a_file_or_under_a_file(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file, not a folder")
    line = _one_error_line(_prepare(*corpus, "taken", tmp_path), "error: output folder taken is a file")
    assert line == "error: output folder taken is a file; give a folder path (a missing folder is created)"
    line = _one_error_line(_prepare(*corpus, "taken/deeper/out", tmp_path), "error: cannot create output folder")
    assert line == "error: cannot create output folder taken/deeper/out: taken is a file, not a folder"
    assert (tmp_path / "taken").read_text() == "a file, not a folder"


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs mounted at ``tmp_path/ro`` (needs root with CAP_SYS_ADMIN; skipped otherwise)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_out_on_a_read_only_file_system(corpus: tuple[Path, Path], tmp_path: Path, read_only_mount: Path) -> None:
    line = _one_error_line(_prepare(*corpus, "ro/out", tmp_path), "error: cannot create output folder ro/out")
    assert line == "error: cannot create output folder ro/out: Read-only file system"
    line = _one_error_line(_prepare(*corpus, "ro", tmp_path), "error: output folder ro is not writable")
    assert line == "error: output folder ro is not writable: Read-only file system; prepare writes its shards there"


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A folder every user may read (pytest's own tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="triarch-out-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root)


def test_out_the_user_may_not_write(shared_root: Path) -> None:
    """Run as an unprivileged user (root passes every permission check): a folder owned by root, mode 755."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run prepare as an unprivileged user")
    corpus, tokenizer = _make_corpus(shared_root)
    locked = shared_root / "locked"
    locked.mkdir(mode=0o755)
    as_nobody = ("setpriv", f"--reuid={NOBODY}", "--regid=nogroup", "--clear-groups", "--")
    probe = subprocess.run([*as_nobody, sys.executable, "-c", "import triarch"], capture_output=True, text=True,
                           cwd=shared_root)
    if probe.returncode != 0:
        pytest.skip(f"the unprivileged user cannot import triarch here: {probe.stderr.strip()[-300:]}")
    result = _prepare(corpus, tokenizer, "locked/out", shared_root, prefix=as_nobody)
    assert _one_error_line(result, "error:") == "error: cannot create output folder locked/out: Permission denied"
    result = _prepare(corpus, tokenizer, "locked", shared_root, prefix=as_nobody)
    assert _one_error_line(result, "error:") == (
        "error: output folder locked is not writable: Permission denied; prepare writes its shards there")
    assert list(locked.iterdir()) == []


def test_out_that_is_an_input_or_holds_one_is_refused(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    folder, tokenizer = corpus
    line = _one_error_line(_prepare(folder, tokenizer, "corpus", tmp_path), "error: input ")
    assert line.startswith(f"error: input '{folder}' is the output folder corpus; prepare writes there")
    line = _one_error_line(_prepare(folder / "doc03.txt", tokenizer, "corpus", tmp_path), "error: input ")
    assert line.startswith(f"error: input '{folder / 'doc03.txt'}' lies in the output folder corpus;")
    line = _one_error_line(_prepare(Path("corpus/*.txt"), tokenizer, "corpus/", tmp_path), "error: input ")
    assert line.startswith("error: input 'corpus/*.txt' lies in the output folder corpus;")
    assert sorted(p.name for p in folder.iterdir()) == [f"doc{i:02d}.txt" for i in range(12)]


@pytest.mark.parametrize("given", ["folder", "glob"])
def test_out_inside_an_input_folder_is_not_an_input(corpus: tuple[Path, Path], tmp_path: Path, given: str) -> None:
    folder, tokenizer = corpus
    source = str(folder) if given == "folder" else f"{folder}/*"
    for attempt in range(2):  # the second run finds its own shards inside the input folder and ignores them
        result = _cli("prepare", source, "--tokenizer", str(tokenizer), "--out", "corpus/prepared",
                      "--no-progress", cwd=tmp_path)
        assert result.returncode == 0, (attempt, result.stderr[-2000:])
        assert "12 documents" in result.stdout and "bad documents skipped: 0" in result.stdout, result.stdout
    manifest = json.loads((folder / "prepared" / "manifest.json").read_text())
    assert [Path(s["path"]).name for s in manifest["sources"]] == [f"doc{i:02d}.txt" for i in range(12)]


def test_an_existing_folder_no_prepare_wrote_is_refused(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    """An SFT folder, a run directory, any folder of files: prepare would write its shards among them (it
    replaced an SFT folder's train shard and deleted its validation shard). Refused, nothing touched; an
    earlier prepare's own folder is still a no-op rerun."""
    docs, tokenizer = corpus
    sft = tmp_path / "sft"
    (sft / "train").mkdir(parents=True)
    (sft / "train" / "shard_00000.arrow").write_bytes(b"sft examples")
    (sft / ".triarch-sft").write_text("")
    before = {p: p.read_bytes() for p in sft.rglob("*") if p.is_file()}
    line = _one_error_line(_prepare(docs, tokenizer, str(sft), tmp_path), f"error: output folder {sft} holds")
    assert "train" in line and "new or empty --out" in line
    assert {p: p.read_bytes() for p in sft.rglob("*") if p.is_file()} == before
    ours = tmp_path / "ours"
    assert _prepare(docs, tokenizer, str(ours), tmp_path).returncode == 0
    again = _prepare(docs, tokenizer, str(ours), tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-tokens", "99999999999999999999", "batch_tokens (99999999999999999999) must be in [1, "),
    ("--vocab-size", "99999999999", "--vocab-size (99999999999) must be at most 16777216"),
])
def test_budgets_past_their_range_are_one_line(flag: str, value: str, message: str, corpus: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    docs, _ = corpus
    result = _cli("prepare", str(docs), "--out", str(tmp_path / "out"), "--no-progress", flag, value, cwd=tmp_path)
    assert message in _one_error_line(result, "error: ")
