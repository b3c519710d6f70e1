"""Data pipeline: stdlib-docstring corpus, BPE tokenizer, Arrow shards + manifest, packed dataset.

prepare (tokenize -> Arrow shards, manifest written last) -> PackedTokenDataset (memory-mapped, packed,
deterministic global batches, resumable) -> dp_slice per data-parallel rank.
"""

from importlib import import_module
from typing import Any

# submodules load on first use, so importing one part (the stream reader in a training rank) does not pull
# in the others (prepare's tokenizer and compressors): resident memory counts every loaded library
_EXPORTS = {
    "DataError": "errors",
    "PackedTokenDataset": "dataset",
    "dp_slice": "dataset",
    "eos_id": "tokenizer",
    "load_tokenizer": "tokenizer",
    "prepare_corpus": "prepare",
    "prepare_pydocs": "prepare",
    "read_manifest": "manifest",
    "split_train_validation": "pydocs",
    "stdlib_docstrings": "pydocs",
    "train_byte_level_bpe": "tokenizer",
    "verify_files": "manifest",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = [
    "DataError",
    "PackedTokenDataset",
    "dp_slice",
    "eos_id",
    "load_tokenizer",
    "prepare_corpus",
    "prepare_pydocs",
    "read_manifest",
    "split_train_validation",
    "stdlib_docstrings",
    "train_byte_level_bpe",
    "verify_files",
]
