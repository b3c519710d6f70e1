"""The offline step, ``triarch prepare``: input files (or the embedded corpus) -> Arrow token shards + manifest.

``corpus`` runs it: ``sources`` finds the input files, ``readers`` yields each file's documents (bad ones
counted), ``documents`` assigns them to train / validation, ``tokenizer`` trains or loads the BPE,
``tokenize_pool`` encodes on threads (``long_documents`` cuts huge documents into exact pieces),
``shard_writer`` cuts each split into shards that ``shards`` encodes and writes, ``journal`` lets a killed run
resume, ``folder_lock`` and ``out_folder`` guard the output folder, ``progress`` shows how far it got,
``pydocs`` is the embedded stdlib-docstring corpus. ``preferences`` prepares preference JSONL for the
alignment stages, ``sft`` (with ``chat_templates``) SFT JSONL. Nothing here is imported by a training rank;
what both sides share (errors, file I/O, the manifest and shard formats) lives one level up.
"""

from triarch.data_pipeline.manifest import read_manifest
from triarch.data_pipeline.prepare.corpus import (
    DEFAULT_BATCH_TOKENS,
    DEFAULT_SHARD_TOKENS,
    prepare_corpus,
    prepare_files,
    prepare_pydocs,
)

__all__ = ["DEFAULT_BATCH_TOKENS", "DEFAULT_SHARD_TOKENS", "prepare_corpus", "prepare_files", "prepare_pydocs",
           "read_manifest"]
