"""Prepare supervised fine-tuning (SFT) data: JSONL -> Arrow shards of tokens and a loss mask, + manifest.

Inputs are JSONL (``.jsonl`` / ``.jsonl.gz``) files; each record is recognised on its own as one of

- ``{"prompt": str, "response": str}``: the prompt's tokens (not trained), then the response's tokens and
  EOS (trained). No template, no special tokens.
- ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``: a chat, rendered
  through a template (below); the tokens of every assistant turn are trained, nothing else is.

Chat templates (``template``):

- ``builtin``: each turn is a header line ``<|role|>`` + newline, then its content; a system or user turn
  ends with a newline, an assistant turn with the EOS token. Trained: every assistant turn's content and
  its EOS. Example (``⏎`` a newline)::

      <|system|>⏎Be brief.⏎<|user|>⏎Hi⏎<|assistant|>⏎Hello!<EOS><|user|>⏎Bye⏎<|assistant|>⏎Bye.<EOS>
                                                   ^^^^^^^^^^^^^                            ^^^^^^^^^^

  The headers are plain text: any tokenizer can encode them.
- ``tokenizer``: the Jinja ``chat_template`` of the tokenizer folder (``chat_template.jinja``, else the
  ``chat_template`` of ``tokenizer_config.json``), rendered the way Hugging Face renders it (variables
  ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``; ``raise_exception``). It is
  rendered at every turn boundary: assistant turn ``i`` trains on ``render(messages[:i + 1])`` minus
  ``render(messages[:i], add_generation_prompt=True)``, i.e. its content and whatever the template closes
  the turn with (``<|im_end|>``, ``<|eot_id|>``); everything else is not trained. No EOS is added: the
  template's own turn end is the stop token. A template whose renderings are not prefixes of one another
  (one that rewrites earlier turns) cannot be split this way; such records count as ``template_error``.
- ``auto`` (default): ``tokenizer`` when the folder has a chat template, else ``builtin``.

Every text piece is tokenized on its own without added special tokens (text a template renders, such as
``<|im_end|>``, still becomes that special token), so the trained / untrained boundary is exact. An example
longer than ``max_len`` tokens is cut to its first ``max_len`` (``too_long="truncate"``, counted in
``truncated``; one left with no trained token is dropped as ``too_long``) or dropped (``"drop"``). Bad
records are counted per reason in ``BAD_REASONS`` (the first place of each is kept), never a crash.

Held-out split: with ``eval_fraction`` > 0 an example goes to ``validation`` when a hash of ``seed`` and the
record's content falls below it (deterministic, independent of input order; duplicates land together), and
the output folder holds ``train/`` and ``validation/``, each a complete prepared folder. With 0 the output
folder itself is the prepared (train) folder. A prepared folder holds ``shard_NNNNN.arrow`` (columns
``tokens`` ``list<uint32>``, ``mask`` ``list<uint8>``), copies of the tokenizer files and ``manifest.json``,
written last (temp file + rename; format: ``sft_format``). ``stream.sft.SFTStream`` reads it back.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.fileio import file_sha256, is_temp, replace_atomically, temp_path
from triarch.data_pipeline.prepare.chat_templates import (
    AUTO,
    TEMPLATE_FILE,
    Part,
    Renderer,
    TemplateFailure,
    resolve_template,
)
from triarch.data_pipeline.prepare.jsonl_inputs import count_bad, find_inputs, jsonl_lines
from triarch.data_pipeline.prepare.preferences import PAD_CANDIDATES
from triarch.data_pipeline.prepare.tokenizer import eos_id, load_tokenizer
from triarch.data_pipeline.sft_format import (
    COLUMNS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MARKER_NAME,
    TOKENIZER_CONFIG_NAME,
    TOKENIZER_NAME,
    TRAIN,
    VALIDATION,
    is_sft_output,
    read_sft_manifest,
)

TRUNCATE, DROP = "truncate", "drop"
ROLES = ("system", "user", "assistant")
BAD_REASONS = ("bad_json", "invalid_utf8", "missing_field", "wrong_type", "empty", "unknown_role",
               "no_assistant_turn", "template_error", "too_long", "truncated_file")
DEFAULT_SHARD_RECORDS = 50_000
ENCODE_BATCH_RECORDS = 1024
_OWN_FILES = ("shard_*.arrow*", MANIFEST_NAME, TOKENIZER_NAME, TOKENIZER_CONFIG_NAME, TEMPLATE_FILE)
_HASH_SCALE = float(1 << 64)


def shard_name(index: int) -> str:
    """File name of the ``index``-th shard."""
    return f"shard_{index:05d}.arrow"


# --- inputs -------------------------------------------------------------------------------------------







def _valid_text(value: Any) -> str | None:
    """The bad-record reason of a text field (None when it is a usable string)."""
    if not isinstance(value, str):
        return "wrong_type"
    if not value.strip():
        return "empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \\ud800 escape
        return "invalid_utf8"
    return None


def _check_record(record: Any) -> str | None:
    """The bad-record reason of a parsed record (None when it is a usable SFT example)."""
    if not isinstance(record, dict):
        return "bad_json"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            return "wrong_type"
        if not messages:
            return "empty"
        for message in messages:
            if not isinstance(message, dict):
                return "wrong_type"
            if "role" not in message or "content" not in message:
                return "missing_field"
            if not isinstance(message["role"], str):
                return "wrong_type"
            if message["role"] not in ROLES:
                return "unknown_role"
            if reason := _valid_text(message["content"]):
                return reason
        if not any(m["role"] == "assistant" for m in messages):
            return "no_assistant_turn"
        return None
    if "prompt" not in record or "response" not in record:
        return "missing_field"
    return _valid_text(record["prompt"]) or _valid_text(record["response"])


def _records(files: list[Path], bad: dict[str, int], examples: dict[str, str]) -> Iterator[tuple[str, dict]]:
    """(``file:line``, record) of every well-formed record, in input order; bad ones are counted by reason."""
    for path in files:
        for number, line in jsonl_lines(path, 'SFT', bad, examples):
            where = f"{path}:{number}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                count_bad(bad, examples, "invalid_utf8", where)
                continue
            except json.JSONDecodeError:
                count_bad(bad, examples, "bad_json", where)
                continue
            reason = _check_record(record)
            if reason:
                count_bad(bad, examples, reason, where)
            else:
                yield where, record


# --- tokenizing and fitting ---------------------------------------------------------------------------

def _parts(record: dict[str, Any], renderer: Renderer) -> list[Part]:
    """The (text, trained, EOS after) parts of a checked record."""
    if "messages" in record:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        return renderer(messages)
    return [(record["prompt"], False, False), (record["response"], True, True)]


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Lists of up to ``size`` consecutive items."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _tokenized(tokenizer: Tokenizer, eos: int, renderer: Renderer, records: Iterator[tuple[str, dict]],
               bad: dict[str, int], examples: dict[str, str]
               ) -> Iterator[tuple[str, dict, np.ndarray, np.ndarray]]:
    """(where, record, tokens (uint32), mask (uint8)) per record, the texts of a batch of records encoded at
    once."""
    for chunk in _chunks(records, ENCODE_BATCH_RECORDS):
        rendered = []
        for where, record in chunk:
            try:
                rendered.append((where, record, [p for p in _parts(record, renderer) if p[0] or p[2]]))
            except TemplateFailure:
                count_bad(bad, examples, "template_error", where)
        texts = [text for _, _, parts in rendered for text, _, _ in parts]
        encoded = iter(tokenizer.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        for where, record, parts in rendered:
            tokens, mask = [], []
            for (_, trained, with_eos), enc in zip(parts, encoded):
                ids = np.asarray(enc.ids + [eos] if with_eos else enc.ids, dtype=np.uint32)
                tokens.append(ids)
                mask.append(np.full(len(ids), trained, dtype=np.uint8))
            yield where, record, np.concatenate(tokens), np.concatenate(mask)


def _held_out(record: dict[str, Any], seed: int, eval_fraction: float) -> bool:
    """Whether ``record`` belongs to the validation split: a hash of seed and content below the fraction."""
    if eval_fraction <= 0:
        return False
    content = json.dumps(record, sort_keys=True, ensure_ascii=True).encode("ascii")
    digest = hashlib.blake2b(content, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") / _HASH_SCALE < eval_fraction


# --- writing ------------------------------------------------------------------------------------------

class _SplitWriter:
    """Writes one split's examples into shards of ``shard_records`` rows (temp file + rename each)."""

    def __init__(self, folder: Path, shard_records: int) -> None:
        self.folder, self.shard_records = folder, shard_records
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.shards: list[dict[str, Any]] = []
        self.truncated = 0

    def add(self, tokens: np.ndarray, mask: np.ndarray) -> None:
        self.pending.append((tokens, mask))
        if len(self.pending) == self.shard_records:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / shard_name(len(self.shards))
        rows, self.pending = self.pending, []
        offsets = pa.array(np.concatenate([[0], np.cumsum([len(r[0]) for r in rows])]).astype(np.int32))
        tokens, mask = np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])
        table = pa.Table.from_arrays([pa.ListArray.from_arrays(offsets, pa.array(tokens)),
                                      pa.ListArray.from_arrays(offsets, pa.array(mask))], names=list(COLUMNS))
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        replace_atomically(tmp, path)
        self.shards.append({"file": path.name, "records": len(rows), "tokens": len(tokens),
                            "trained_tokens": int(mask.sum(dtype=np.int64)), "max_token_id": int(tokens.max()),
                            "bytes": path.stat().st_size, "sha256": file_sha256(path)})

    @property
    def records(self) -> int:
        return sum(s["records"] for s in self.shards)


def _pad_id(tokenizer: Tokenizer, eos: int) -> int:
    """The tokenizer's padding token if it has one of ``PAD_CANDIDATES``, else EOS."""
    for token in PAD_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return eos


def resolve_tokenizer(path: str | Path) -> Path:
    """The ``tokenizer.json`` that ``path`` names: the file itself, or the one in the folder ``path``."""
    path = Path(path)
    if path.is_dir():
        if not (path / TOKENIZER_NAME).is_file():
            raise DataError(f"tokenizer folder {path} holds no {TOKENIZER_NAME}")
        return path / TOKENIZER_NAME
    if not path.is_file():
        raise DataError(f"tokenizer not found: {path} (give a {TOKENIZER_NAME} or a folder holding one)")
    return path


def _copy_atomically(source: Path, target: Path) -> None:
    if target.exists() and target.resolve() == source.resolve():
        return
    tmp = temp_path(target)
    shutil.copyfile(source, tmp)
    replace_atomically(tmp, target)


def _clear(folder: Path) -> None:
    """Delete this module's files in ``folder`` (shards, manifest, tokenizer copies), and the folder if that
    leaves it empty; other files stay."""
    if not folder.is_dir():
        return
    for pattern in _OWN_FILES:
        for path in folder.glob(pattern):
            if path.is_file():
                path.unlink()
    if folder.name in (TRAIN, VALIDATION) and not any(folder.iterdir()):
        folder.rmdir()


def _check_out(out_dir: Path) -> None:
    """``out_dir`` must be missing, empty, or an earlier SFT output; else a one-line DataError."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output folder {out_dir} is a file; give a folder (a missing one is created)")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_sft_output(out_dir):
        raise DataError(f"output folder {out_dir} is not empty and not an earlier SFT output; use a new or empty "
                        "folder")


def _existing(out_dir: Path, split_names: list[str], request: dict[str, Any]) -> dict[str, dict] | None:
    """The manifests of an earlier run of the same request in ``out_dir``, if every split is complete."""
    found = {}
    for split in split_names:
        folder = out_dir / split if len(split_names) > 1 else out_dir
        if not (folder / MANIFEST_NAME).is_file():
            return None
        try:
            manifest = read_sft_manifest(folder)
        except DataError:  # damaged or foreign: rewritten like any other request
            return None
        if manifest.get("request") != request:
            return None
        found[split] = manifest
    return found


def _reset_out(out_dir: Path, split_names: list[str]) -> dict[str, Path]:
    """Make ``out_dir`` an SFT output about to be (re)written: marked, its manifests removed first (so nothing
    in it looks complete), the other layout's files and old shards gone; return each split's folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER_NAME).write_text("triarch prepare-sft output\n", encoding="utf-8")
    candidates = (out_dir, out_dir / TRAIN, out_dir / VALIDATION)
    for folder in candidates:
        (folder / MANIFEST_NAME).unlink(missing_ok=True)
    folders = {split: (out_dir / split if len(split_names) > 1 else out_dir) for split in split_names}
    for folder in candidates:
        if folder not in folders.values():
            _clear(folder)
    for folder in folders.values():
        for old in folder.glob("shard_*.arrow*"):
            old.unlink()
    return folders


def _write_examples(examples_in: Iterator[tuple[str, dict, np.ndarray, np.ndarray]], writers: dict[str, _SplitWriter],
                    request: dict[str, Any], bad: dict[str, int], examples: dict[str, str]) -> None:
    """Fit each tokenized example to ``max_len`` (module docstring) and hand it to its split's writer."""
    max_len, too_long = request["max_len"], request["too_long"]
    for where, record, tokens, mask in examples_in:
        if not mask.any():
            count_bad(bad, examples, "empty", where)
            continue
        cut = len(tokens) > max_len
        if cut and too_long == DROP:
            count_bad(bad, examples, "too_long", where)
            continue
        tokens, mask = tokens[:max_len], mask[:max_len]
        if not mask.any():  # the cut left nothing to train on
            count_bad(bad, examples, "too_long", where)
            continue
        writer = writers[VALIDATION if _held_out(record, request["seed"], request["eval_fraction"]) else TRAIN]
        writer.truncated += cut
        writer.add(tokens, mask)
    for writer in writers.values():
        writer.flush()


def _write_manifest(split: str, writer: _SplitWriter, common: dict[str, Any]) -> dict[str, Any]:
    """Write ``writer.folder/manifest.json`` last (temp file + rename); return it."""
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "split": split, "columns": list(COLUMNS),
                "records": writer.records, "tokens": sum(s["tokens"] for s in writer.shards),
                "trained_tokens": sum(s["trained_tokens"] for s in writer.shards), "truncated": writer.truncated,
                "shards": writer.shards, **common}
    manifest_file = writer.folder / MANIFEST_NAME
    tmp = temp_path(manifest_file)
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    replace_atomically(tmp, manifest_file)
    return manifest


def prepare_sft(inputs: str | Path | Sequence[str | Path], tokenizer: str | Path, out_dir: str | Path, *,
                template: str = AUTO, max_len: int = 2048, too_long: str = TRUNCATE, eval_fraction: float = 0.0,
                seed: int = 0, shard_records: int = DEFAULT_SHARD_RECORDS) -> dict[str, dict[str, Any]]:
    """Tokenize SFT JSONL into ``out_dir`` (see the module docstring); return ``{split: manifest}``.

    ``tokenizer``: a ``tokenizer.json`` or a folder holding one (its chat template, if any, lives beside it).
    ``out_dir`` must be missing, empty, or an earlier SFT output: the same request there returns its
    manifests without work, another one is rewritten (old manifests removed first, so a half-rewritten
    folder is never complete).
    """
    out_dir = Path(out_dir)
    if too_long not in (TRUNCATE, DROP):
        raise DataError(f"too_long ({too_long!r}) must be truncate or drop")
    if max_len < 2 or shard_records < 1:
        raise DataError(f"need max_len >= 2 (got {max_len}) and shard_records >= 1 (got {shard_records})")
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction ({eval_fraction}) must be in [0, 1)")
    files = find_inputs(inputs, 'SFT')
    tokenizer_path = resolve_tokenizer(tokenizer)
    tok = load_tokenizer(tokenizer_path)
    eos = eos_id(tok, tokenizer_path)
    folder = tokenizer_path.parent
    used, renderer, template_sha = resolve_template(template, folder, tok, eos)
    request = {"template": used, "template_sha256": template_sha, "max_len": max_len, "too_long": too_long,
               "eval_fraction": eval_fraction, "seed": seed, "shard_records": shard_records,
               "tokenizer_sha256": file_sha256(tokenizer_path),
               "sources": [{"file": str(f.resolve()), "bytes": f.stat().st_size, "sha256": file_sha256(f)}
                           for f in files]}
    split_names = [TRAIN, VALIDATION] if eval_fraction > 0 else [TRAIN]
    _check_out(out_dir)
    existing = _existing(out_dir, split_names, request)
    if existing is not None:
        return existing
    folders = _reset_out(out_dir, split_names)
    writers = {split: _SplitWriter(folders[split], shard_records) for split in split_names}
    bad, examples = dict.fromkeys(BAD_REASONS, 0), {}
    _write_examples(_tokenized(tok, eos, renderer, _records(files, bad, examples), bad, examples), writers, request,
                    bad, examples)
    _check_counts(writers, files, bad, eval_fraction)
    common = {"max_len": max_len, "bad_records": bad, "bad_examples": examples, "request": request,
              "template": {"kind": used, "sha256": template_sha},
              "tokenizer": {"file": TOKENIZER_NAME, "sha256": request["tokenizer_sha256"],
                            "vocab_size": tok.get_vocab_size(with_added_tokens=True), "eos_id": eos,
                            "pad_id": _pad_id(tok, eos)}}
    tokenizer_files = [tokenizer_path, *(p for p in (folder / TOKENIZER_CONFIG_NAME, folder / TEMPLATE_FILE)
                                         if p.is_file())]
    manifests = {}
    for split, writer in writers.items():
        for source in tokenizer_files:
            _copy_atomically(source, writer.folder / source.name)
        manifests[split] = _write_manifest(split, writer, common)
    for path in out_dir.rglob("*"):
        if is_temp(path):
            path.unlink()
    return manifests


def _check_counts(writers: dict[str, _SplitWriter], files: list[Path], bad: dict[str, int],
                  eval_fraction: float) -> None:
    """Every split must hold an example; else a one-line DataError saying why."""
    total = sum(w.records for w in writers.values())
    if total == 0:
        raise DataError(f"no usable SFT records in {', '.join(str(f) for f in files)} "
                        f"(bad: {', '.join(f'{k}={v}' for k, v in bad.items() if v) or 'none'})")
    for split, writer in writers.items():
        if writer.records == 0:
            raise DataError(f"eval_fraction {eval_fraction} leaves the {split} split empty ({total} examples); "
                            f"change it or add data")
