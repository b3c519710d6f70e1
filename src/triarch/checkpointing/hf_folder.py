"""Reading a Hugging Face model folder defensively: ``config.json``, safetensors headers, the shard index.

Names, dtypes, shapes and sizes are checked from the headers before any tensor data is read. Every
problem is one :class:`CheckpointError` line naming the file and the field or tensor. Which weight files
count follows ``transformers``: ``model.safetensors`` when present, else the shards that
``model.safetensors.index.json`` names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from triarch.checkpointing.commit import CheckpointError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_LENGTH_BYTES = 8  # a safetensors file starts with its header's length, little-endian u64
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_LISTED_ENTRIES = 4  # how many of a non-empty folder's entries an error message names


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives and what its header says."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class HFWeights:
    """The tensors of a folder's weight files; ``source`` is the single file or the index (for messages)."""

    source: Path
    entries: dict[str, TensorEntry]


def folder_entries(folder: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Names in ``folder`` (folders with a trailing ``/``), sorted; none when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name not in ignore)


def listing(entries: list[str]) -> str:
    """A few entry names for a one-line message."""
    more = len(entries) - _LISTED_ENTRIES
    return ", ".join(entries[:_LISTED_ENTRIES]) + (f" and {more} more" if more > 0 else "")


def read_json(path: Path) -> Any:
    """A JSON file's content; unreadable or malformed is a one-line error naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err.msg}: line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not valid JSON: not UTF-8 text") from None
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read: {err.strerror}") from None


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict."""
    if not hf_dir.is_dir():
        raise CheckpointError(f"--hf {hf_dir} is not a folder")
    path = hf_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{hf_dir} has no {CONFIG_FILE} (a Hugging Face model folder needs one)")
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config


def _raw_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header object of a safetensors file and the offset where its data begins."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_LENGTH_BYTES)
        if len(head) < _LENGTH_BYTES:
            raise CheckpointError(f"{path} is truncated: {size} bytes, not even the 8-byte header length")
        length = int.from_bytes(head, "little")
        if length > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{path} is not a safetensors file: header length {length} is implausible")
        if length > size - _LENGTH_BYTES:
            raise CheckpointError(f"{path} is truncated: {size} bytes, its header alone needs {length + _LENGTH_BYTES}")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file: its header is not a JSON object")
    return header, _LENGTH_BYTES + length


def _entry(path: Path, name: str, info: Any) -> tuple[TensorEntry, int, int]:
    """One header record checked: a float dtype and a byte range that fits its shape."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(f"{path}: header record of tensor {name} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _FLOAT_BYTES:
        raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}; only {sorted(_FLOAT_BYTES)} weights import")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name} has a malformed shape {shape!r} or data_offsets {offsets!r}")
    begin, end = offsets
    if end - begin != math.prod(shape) * _FLOAT_BYTES[dtype] or begin < 0:
        raise CheckpointError(f"{path}: tensor {name} spans bytes {begin}..{end}, which does not fit "
                              f"{dtype} {tuple(shape)}")
    return TensorEntry(path, dtype, tuple(shape)), begin, end


def safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of one safetensors file, with the file's size checked against its header."""
    header, data_start = _raw_header(path)
    entries: dict[str, TensorEntry] = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name], _, end = _entry(path, name, info)
        data_end = max(data_end, end)
    size, expected = path.stat().st_size, data_start + data_end
    if size < expected:
        raise CheckpointError(f"{path} is truncated: {size} bytes, its header describes {expected}")
    if size > expected:
        raise CheckpointError(f"{path} is damaged: {size} bytes, its header describes {expected}")
    return entries


def _shard_names(index_path: Path) -> dict[str, str]:
    """The index's ``weight_map`` (tensor -> shard file name), checked for shape and safe names."""
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: missing field 'weight_map' (tensor name -> shard file)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: weight_map entry {name} names {shard!r}, not a file in the folder")
    return weight_map


def _sharded(hf_dir: Path) -> HFWeights:
    """The tensors of every shard the index names, each where the index says it is."""
    index_path = hf_dir / INDEX_FILE
    weight_map = _shard_names(index_path)
    entries: dict[str, TensorEntry] = {}
    for shard in sorted(set(weight_map.values())):
        path = hf_dir / shard
        if not path.is_file():
            raise CheckpointError(f"{index_path} names shard {shard}, which is missing from {hf_dir}")
        for name, entry in safetensors_header(path).items():
            if name in entries:
                raise CheckpointError(f"{path}: tensor {name} is also in {entries[name].file.name}")
            entries[name] = entry
    for name, shard in weight_map.items():
        if name not in entries or entries[name].file.name != shard:
            raise CheckpointError(f"{index_path} places tensor {name} in {shard}, which does not hold it")
    return HFWeights(index_path, entries)


def hf_weights(hf_dir: Path) -> HFWeights:
    """The folder's weight tensors as ``transformers`` would pick them (headers only)."""
    single = hf_dir / SINGLE_FILE
    if single.is_file():
        return HFWeights(single, safetensors_header(single))
    if (hf_dir / INDEX_FILE).is_file():
        return _sharded(hf_dir)
    others = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    found = f" (found {', '.join(others[:3])}: only {SINGLE_FILE} or an index of safetensors shards imports)" \
        if others else ""
    raise CheckpointError(f"{hf_dir} has no {SINGLE_FILE} or {INDEX_FILE}{found}")


def load_tensors(weights: HFWeights, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors' data, as float32."""
    from safetensors import SafetensorError, safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(weights.entries[name].file, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, file_names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                out.update({name: f.get_tensor(name).float() for name in file_names})
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} cannot be read: {err}") from None
    return out
