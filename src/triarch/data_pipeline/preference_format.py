"""The preference-data format both halves agree on: manifest names, set kinds, and reading the manifest.

A prepared preference folder holds ``shard_NNNNN.arrow`` files (columns ``prompt``, and ``chosen`` /
``rejected`` for a *pairs* set, each ``list<uint32>``), a copy of the tokenizer, and ``manifest.json``
(written last; ``prepare.preferences`` writes it, ``stream.preferences`` reads the folder back).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from triarch.data_pipeline.errors import DataError

FORMAT_NAME = "triarch.preferences"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
PAIRS, PROMPTS = "pairs", "prompts"


def read_preference_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read ``data_dir/manifest.json`` of a preference set; a missing or foreign one is a one-line DataError."""
    path = Path(data_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"no manifest at {path} (run prepare_preferences first)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME \
            or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} is not a {FORMAT_NAME} version {FORMAT_VERSION} manifest")
    return manifest
