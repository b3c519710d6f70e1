"""The preference-data format both halves agree on: manifest names, set kinds, and reading the manifest.

A prepared preference folder holds ``shard_NNNNN.arrow`` files (columns ``prompt``, and ``chosen`` /
``rejected`` for a *pairs* set, each ``list<uint32>``), a copy of the tokenizer, and ``manifest.json``
(written last; ``prepare.preferences`` writes it, ``stream.preferences`` reads the folder back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.manifest import load_manifest_json, manifest_where, open_folder

FORMAT_NAME = "triarch.preferences"
FORMAT_VERSION = 1
TOKENIZER_NAME = "tokenizer.json"
PAIRS, PROMPTS = "pairs", "prompts"


def read_preference_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read ``data_dir/manifest.json`` of a preference set (through ``manifest``'s one reader); a missing or
    foreign one is a one-line DataError."""
    where = manifest_where(data_dir)
    manifest = load_manifest_json(*open_folder(data_dir), where, missing="run prepare_preferences first")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME \
            or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{where} is not a {FORMAT_NAME} version {FORMAT_VERSION} manifest")
    return manifest
