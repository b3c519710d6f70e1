"""Data pipeline: stdlib-docstring corpus, BPE tokenizer, Arrow shards + manifest, packed dataset.

prepare (tokenize -> Arrow shards, manifest written last) -> PackedTokenDataset (memory-mapped, packed,
deterministic global batches, resumable) -> dp_slice per data-parallel rank.
"""

from triarch.data_pipeline.dataset import PackedTokenDataset, dp_slice
from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.manifest import read_manifest, verify_files
from triarch.data_pipeline.prepare import prepare_corpus, prepare_pydocs
from triarch.data_pipeline.pydocs import split_train_validation, stdlib_docstrings
from triarch.data_pipeline.tokenizer import eos_id, load_tokenizer, train_byte_level_bpe

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
