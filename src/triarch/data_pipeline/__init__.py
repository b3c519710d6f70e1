"""The data layer, in two halves that share only a file format.

    inputs (files, fsspec URLs, the embedded corpus)
      -> prepare/   offline, ``triarch prepare``: read, split, tokenize, write shards, manifest last
      -> a prepared folder: ``tokenizer.json``, ``<split>/shard_*.arrow``, ``manifest.json``
      -> stream/    in every training rank: blended, shuffled, packed, DP-sharded, resumable batches
      -> the engine

Shared by both halves (and importing neither): ``errors`` (DataError), ``fileio`` (atomic writes, hashes),
``manifest`` (the prepared folder's manifest: format, validation, the one reader for local and fsspec
paths), ``shard_format`` (the Arrow token-shard schema), ``preference_format`` (the preference-data
manifest), ``sft_format`` (the SFT-data manifest), and ``verify`` (``triarch data verify``, built from those
alone). Picture and details: ``docs/data.md``.

The names below load their module on first use, so a training rank that imports the stream never loads
prepare's tokenizer and compressor libraries (resident memory counts every loaded library).
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DataError": "errors",
    "PreferenceDataset": "stream.preferences",
    "SFTStream": "stream.sft",
    "TokenStream": "stream.token_stream",
    "dp_slice": "stream.preferences",
    "eos_id": "prepare.tokenizer",
    "load_tokenizer": "prepare.tokenizer",
    "make_synthetic_preferences": "prepare.synthetic_preferences",
    "prepare_corpus": "prepare.corpus",
    "prepare_files": "prepare.corpus",
    "prepare_preference_splits": "prepare.preferences",
    "prepare_preferences": "prepare.preferences",
    "prepare_pydocs": "prepare.corpus",
    "prepare_sft": "prepare.sft",
    "read_manifest": "manifest",
    "split_train_validation": "prepare.pydocs",
    "stdlib_docstrings": "prepare.pydocs",
    "train_byte_level_bpe": "prepare.tokenizer",
    "verify_files": "manifest",
    "verify_folder": "verify",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = sorted(_EXPORTS)
