"""The SFT-data format both halves agree on: manifest names, columns, split folders, reading the manifest.

A prepared SFT folder holds ``shard_NNNNN.arrow`` files (columns ``tokens``: ``list<uint32>`` and ``mask``:
``list<uint8>``, one row per example; mask 1 where the token is trained on), a copy of the tokenizer, and
``manifest.json`` (written last; ``prepare.sft`` writes it, ``stream.sft`` reads the folder back). Prepared
with a held-out split, the output folder holds one such folder per split (``train/``, ``validation/``);
without one, the output folder itself is the ``train`` split. Either way the output folder holds
``MARKER_NAME``, which marks it as SFT output that a later ``prepare_sft`` may rewrite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.manifest import MANIFEST_NAME, load_manifest_json, manifest_where, open_folder
from triarch.data_pipeline.split_folders import TRAIN, VALIDATION, split_folder

FORMAT_NAME = "triarch.sft"
FORMAT_VERSION = 1
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
MARKER_NAME = ".triarch-sft"
COLUMNS = ("tokens", "mask")




def read_sft_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read ``data_dir/manifest.json`` of an SFT folder (through ``manifest``'s one reader); a missing or
    foreign one is a one-line DataError."""
    where = manifest_where(data_dir)
    manifest = load_manifest_json(*open_folder(data_dir), where, missing="run triarch prepare-sft first")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME \
            or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{where} is not a {FORMAT_NAME} version {FORMAT_VERSION} manifest")
    return manifest


def is_sft_output(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` is (or was on its way to being) an SFT output folder."""
    return (Path(out_dir) / MARKER_NAME).is_file()


__all__ = ["COLUMNS", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "MARKER_NAME", "TOKENIZER_CONFIG_NAME",
           "TOKENIZER_NAME", "TRAIN", "VALIDATION", "is_sft_output", "read_sft_manifest", "split_folder"]
