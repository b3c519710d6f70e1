"""Prepare preference data for the alignment stages: JSONL -> Arrow shards + manifest.

Inputs are JSONL (``.jsonl`` / ``.jsonl.gz``) records of ``{"prompt", "chosen", "rejected"}`` (a *pairs*
set, for reward modelling and DPO) or of ``{"prompt"}`` alone (a *prompts* set, for PPO generation).
The prompt and each response are tokenized separately (no special tokens unless asked for the prompt)
and EOS is appended to each response, so the prompt/response boundary is exact.

``prepare_preferences`` writes ``shard_NNNNN.arrow`` files (columns ``prompt``, and ``chosen`` /
``rejected`` for pairs, each ``list<uint32>``) and a copy of the tokenizer, then ``manifest.json`` last
(temp file + rename; the format: ``preference_format``). Bad records are counted per reason, never a crash
(see ``BAD_REASONS``). ``stream.preferences.PreferenceDataset`` reads the folder back as padded batches.

``prepare_preference_splits`` writes a held-out split too: ``OUT/train`` and ``OUT/validation``, each a
folder as above; a record is held out when a stable hash of its prompt falls below ``eval_fraction``
(``pydocs.split_of``), so records with the same prompt stay together.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from tokenizers import Tokenizer

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.fileio import file_sha256, is_temp, replace_atomically, temp_path
from triarch.data_pipeline.manifest import MANIFEST_NAME
from triarch.data_pipeline.preference_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PAIRS,
    PROMPTS,
    TOKENIZER_NAME,
    read_preference_manifest,
)
from triarch.data_pipeline.prepare.jsonl_inputs import count_bad, find_inputs, jsonl_lines
from triarch.data_pipeline.prepare.pydocs import TRAIN, VALIDATION, split_of
from triarch.data_pipeline.prepare.tokenizer import eos_id, load_tokenizer

TRUNCATE, DROP = "truncate", "drop"
BAD_REASONS = ("bad_json", "invalid_utf8", "missing_field", "non_string", "bad_margin", "empty", "too_long",
               "truncated_file")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
DEFAULT_SHARD_RECORDS = 50_000
MARGIN = "margin"
ENCODE_BATCH_RECORDS = 1024


def shard_name(index: int) -> str:
    """File name of the ``index``-th shard."""
    return f"shard_{index:05d}.arrow"








def _texts(files: list[Path], fields: list[str], bad: dict[str, int], examples: dict[str, str],
           keep: Callable[[str], bool] | None = None,
           margin_field: str | None = None) -> Iterator[tuple[str, list[str], float | None]]:
    """(``file:line``, text fields, margin) of every good record whose prompt ``keep`` accepts, in input
    order; bad ones are counted by reason. With ``margin_field`` every record needs a finite number there."""
    for path in files:
        for number, line in jsonl_lines(path, 'preference', bad, examples):
            where = f"{path}:{number}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                count_bad(bad, examples, "invalid_utf8", where)
                continue
            except json.JSONDecodeError:
                count_bad(bad, examples, "bad_json", where)
                continue
            if not isinstance(record, dict):
                count_bad(bad, examples, "bad_json", where)
            elif any(name not in record for name in fields):
                count_bad(bad, examples, "missing_field", where)
            elif any(not isinstance(record[name], str) for name in fields):
                count_bad(bad, examples, "non_string", where)
            elif any(not record[name].strip() for name in fields):
                count_bad(bad, examples, "empty", where)
            elif margin_field is not None and margin_field not in record:
                count_bad(bad, examples, "missing_field", where)
            elif margin_field is not None and not _finite_number(record[margin_field]):
                count_bad(bad, examples, "bad_margin", where)
            elif keep is None or keep(record[fields[0]]):
                yield where, [record[name] for name in fields], \
                    float(record[margin_field]) if margin_field is not None else None


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _first_object(files: list[Path]) -> dict[str, Any]:
    """The first JSON object record of the inputs (the set's kind and optional fields follow it)."""
    bad = dict.fromkeys(BAD_REASONS, 0)
    for path in files:
        for _, line in jsonl_lines(path, 'preference', bad, {}):
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(record, dict):
                return record
    raise DataError(f"no JSON object records in {', '.join(str(f) for f in files)}")


def _fit(prompt: list[int], responses: list[list[int]], max_len: int, max_prompt_len: int,
         too_long: str) -> tuple[list[int], list[list[int]], bool] | None:
    """Make prompt + each response fit ``max_len``: None to drop, else (prompt, responses, truncated).

    Truncation keeps the end of the prompt (at least ``max_prompt_len`` tokens of it, more if the
    responses leave room) and the start of each response; a cut response loses its EOS.
    """
    longest = max((len(r) for r in responses), default=0)
    if len(prompt) + longest <= max_len:
        return prompt, responses, False
    if too_long == DROP:
        return None
    if not responses:
        return prompt[-max_len:], responses, True
    keep = max(min(len(prompt), max_len - longest), min(len(prompt), max_prompt_len))
    budget = max_len - keep
    return prompt[len(prompt) - keep:], [r[:budget] for r in responses], True


def _tokenized(tokenizer: Tokenizer, eos: int, batches: Iterator[list[tuple[str, list[str], float | None]]],
               prompt_special_tokens: bool) -> Iterator[tuple[str, list[list[int]], float | None]]:
    """(where, [prompt ids, response ids + EOS, ...], margin) per record, encoded a batch of records at a
    time."""
    for records in batches:
        texts = [r[1] for r in records]
        prompts = tokenizer.encode_batch([t[0] for t in texts], add_special_tokens=prompt_special_tokens)
        columns = [[e.ids for e in prompts]]
        for col in range(1, len(texts[0])):
            encoded = tokenizer.encode_batch([t[col] for t in texts], add_special_tokens=False)
            columns.append([e.ids + [eos] if e.ids else [] for e in encoded])
        for (where, _, margin), *parts in zip(records, *columns, strict=True):
            yield where, parts, margin


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


def _write_shard(path: Path, root: Path, columns: list[str], rows: list[list[list[int]]],
                 margins: list[float] | None = None) -> dict[str, Any]:
    """Write one shard (temp file + rename) and return its manifest entry (token columns, then ``margin``)."""
    token_columns = [c for c in columns if c != MARGIN]
    arrays = [pa.array([row[i] for row in rows], type=pa.list_(pa.uint32())) for i in range(len(token_columns))]
    if margins is not None:
        arrays.append(pa.array(margins, type=pa.float64()))
    table = pa.Table.from_arrays(arrays, names=columns)
    tmp = temp_path(path)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    replace_atomically(tmp, path)
    flat = [max(part) for row in rows for part in row if part]
    return {"file": path.relative_to(root).as_posix(), "records": len(rows),
            "tokens": sum(len(part) for row in rows for part in row), "max_token_id": max(flat, default=-1),
            "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _pad_id(tokenizer: Tokenizer, eos: int) -> int:
    """The tokenizer's padding token if it has one of ``PAD_CANDIDATES``, else EOS."""
    for token in PAD_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return eos


def _install_tokenizer(tokenizer_path: Path, out_dir: Path) -> None:
    """Copy the tokenizer into the prepared folder (temp file + rename) so the folder is self-contained."""
    target = out_dir / TOKENIZER_NAME
    if target.exists() and target.resolve() == tokenizer_path.resolve():
        return
    tmp = temp_path(target)
    shutil.copyfile(tokenizer_path, tmp)
    replace_atomically(tmp, target)


def _write_records(records: Iterator[tuple[str, list[list[int]]]], out_dir: Path, columns: list[str],
                   request: dict[str, Any], bad: dict[str, int],
                   examples: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
    """Fit tokenized records to ``request["max_len"]`` and write them in shards; return (entries, truncated)."""
    shards: list[dict[str, Any]] = []
    pending: list[list[list[int]]] = []
    margins: list[float] | None = [] if MARGIN in columns else None
    truncated = 0
    for where, parts, margin in records:
        if not all(parts):  # text that encodes to no tokens
            count_bad(bad, examples, "empty", where)
            continue
        fitted = _fit(parts[0], parts[1:], request["max_len"], request["max_prompt_len"], request["too_long"])
        if fitted is None:
            count_bad(bad, examples, "too_long", where)
            continue
        truncated += fitted[2]
        pending.append([fitted[0], *fitted[1]])
        if margins is not None:
            margins.append(margin)
        if len(pending) == request["shard_records"]:
            shards.append(_write_shard(out_dir / shard_name(len(shards)), out_dir, columns, pending, margins))
            pending, margins = [], [] if margins is not None else None
    if pending:
        shards.append(_write_shard(out_dir / shard_name(len(shards)), out_dir, columns, pending, margins))
    return shards, truncated


def prepare_preferences(inputs: str | Path | Sequence[str | Path], tokenizer_path: str | Path,
                        out_dir: str | Path, max_len: int, *, kind: str = "auto", too_long: str = TRUNCATE,
                        max_prompt_len: int | None = None, prompt_field: str = "prompt",
                        chosen_field: str = "chosen", rejected_field: str = "rejected",
                        prompt_special_tokens: bool = False, shard_records: int = DEFAULT_SHARD_RECORDS,
                        split: str | None = None, eval_fraction: float | None = None,
                        margin_field: str = MARGIN) -> dict[str, Any]:
    """Tokenize preference JSONL into ``out_dir`` (see the module docstring); return the manifest.

    ``kind``: ``pairs``, ``prompts`` or ``auto`` (from the first JSON object). ``max_len`` bounds
    prompt + response (EOS included) of each pair, or the prompt of a prompts set. Longer records are
    truncated (``too_long="truncate"``: see ``_fit``; ``max_prompt_len`` defaults to ``max_len // 2``)
    and counted in ``truncated``, or dropped and counted as ``too_long`` (``too_long="drop"``).
    ``split`` (``train`` or ``validation``, with ``eval_fraction`` in (0, 1)) keeps only the records of that
    side of the prompt-hash split (module docstring). If ``out_dir`` already holds a manifest of the same
    request, returns it without work; one of another request is a DataError. A pairs set whose first record
    has ``margin_field`` (a number) keeps it per pair in a ``margin`` column (for a reward model's margin
    loss); every record then needs a finite number there.
    """
    out_dir, tokenizer_path = Path(out_dir), Path(tokenizer_path)
    max_prompt_len = max_len // 2 if max_prompt_len is None else max_prompt_len
    if too_long not in (TRUNCATE, DROP) or kind not in ("auto", PAIRS, PROMPTS):
        raise DataError(f"too_long ({too_long!r}) must be truncate or drop, kind ({kind!r}) auto, pairs or prompts")
    if max_len < 2 or not 1 <= max_prompt_len < max_len or shard_records < 1:
        raise DataError(f"need max_len >= 2 (got {max_len}), 1 <= max_prompt_len ({max_prompt_len}) < max_len, "
                        f"shard_records >= 1 (got {shard_records})")
    keep = _split_filter(split, eval_fraction)
    files = find_inputs(inputs, 'preference')
    first = _first_object(files)
    if kind == "auto":
        kind = PAIRS if chosen_field in first or rejected_field in first else PROMPTS
    fields = [prompt_field, chosen_field, rejected_field] if kind == PAIRS else [prompt_field]
    with_margin = kind == PAIRS and margin_field in first
    tokenizer = load_tokenizer(tokenizer_path)
    eos = eos_id(tokenizer, tokenizer_path)
    request = {"kind": kind, "fields": fields, "max_len": max_len, "max_prompt_len": max_prompt_len,
               "too_long": too_long, "prompt_special_tokens": prompt_special_tokens, "shard_records": shard_records,
               "tokenizer_sha256": file_sha256(tokenizer_path),
               "sources": [{"file": str(f.resolve()), "bytes": f.stat().st_size, "sha256": file_sha256(f)}
                           for f in files]}
    if split is not None:
        request["split"] = {"name": split, "method": "prompt_sha256", "eval_fraction": eval_fraction}
    if with_margin:
        request["margin_field"] = margin_field
    manifest_file = out_dir / MANIFEST_NAME
    if manifest_file.is_file():
        existing = read_preference_manifest(out_dir)
        if existing["request"] == request:
            return existing
        raise DataError(f"{manifest_file} was prepared from another request (inputs, tokenizer or options); "
                        "use a new folder or delete this one")
    out_dir.mkdir(parents=True, exist_ok=True)
    bad, examples = dict.fromkeys(BAD_REASONS, 0), {}
    columns = ["prompt", "chosen", "rejected"] if kind == PAIRS else ["prompt"]
    if with_margin:
        columns.append(MARGIN)
    texts = _texts(files, fields, bad, examples, keep, margin_field if with_margin else None)
    records = _tokenized(tokenizer, eos, _chunks(texts, ENCODE_BATCH_RECORDS), prompt_special_tokens)
    shards, truncated = _write_records(records, out_dir, columns, request, bad, examples)
    total = sum(s["records"] for s in shards)
    if total == 0:
        held = f" for the {split} split (eval_fraction {eval_fraction}, by prompt hash)" if split else ""
        raise DataError(f"no usable preference records{held} in {', '.join(str(f) for f in files)} "
                        f"(bad: {', '.join(f'{k}={v}' for k, v in bad.items() if v) or 'none'})")
    keep = {shard_name(i) for i in range(len(shards))}
    for path in out_dir.glob("shard_*.arrow*"):
        if is_temp(path) or path.name not in keep:
            path.unlink()
    _install_tokenizer(tokenizer_path, out_dir)
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": kind, "columns": columns,
                "max_len": max_len, "records": total, "truncated": truncated, "bad_records": bad,
                "bad_examples": examples, "request": request, "shards": shards,
                "tokenizer": {"file": TOKENIZER_NAME, "sha256": request["tokenizer_sha256"],
                              "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True), "eos_id": eos,
                              "pad_id": _pad_id(tokenizer, eos)}}
    tmp = temp_path(manifest_file)
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    replace_atomically(tmp, manifest_file)
    return manifest


def _split_filter(split: str | None, eval_fraction: float | None) -> Callable[[str], bool] | None:
    """Whether a prompt belongs to ``split`` of the prompt-hash split; None keeps every record."""
    if split is None and eval_fraction is None:
        return None
    if split not in (TRAIN, VALIDATION) or eval_fraction is None or not 0.0 < eval_fraction < 1.0:
        raise DataError(f"split ({split!r}) must be {TRAIN} or {VALIDATION} and eval_fraction ({eval_fraction}) "
                        "in (0, 1)")
    return lambda prompt: split_of(prompt.encode("utf-8"), eval_fraction) == split


def prepare_preference_splits(inputs: str | Path | Sequence[str | Path], tokenizer_path: str | Path,
                              out_dir: str | Path, max_len: int, *, eval_fraction: float,
                              **options: Any) -> dict[str, dict[str, Any]]:
    """``prepare_preferences`` into ``out_dir/train`` and ``out_dir/validation`` (split by prompt hash, see the
    module docstring); ``options`` are its keywords. Returns the manifest of each split."""
    return {name: prepare_preferences(inputs, tokenizer_path, Path(out_dir) / name, max_len, split=name,
                                      eval_fraction=eval_fraction, **options) for name in (TRAIN, VALIDATION)}
