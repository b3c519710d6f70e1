"""What every training rank runs: prepared shards + manifest -> this rank's batches, resumable on any layout.

``token_stream.TokenStream`` is the trainer's reader: ``blend`` interleaves datasets by weight, ``index``
places every sequence in an epoch's shard order and shuffle block, ``span`` reads a block's tokens into one
buffer through ``source`` (memory-mapped local shards, or ranged reads through fsspec), and ``guard`` with
``shard_check`` checks what is read against the manifest (sizes, token ids, background sha256).
``dali_stage`` optionally runs the batches through NVIDIA DALI; ``preferences`` reads preference data as
padded batches for the alignment stages, ``sft`` packs SFT examples (tokens + loss mask) into rows. Nothing here imports ``prepare`` (its tokenizer and compressor
libraries would count in every rank's memory).
"""

from triarch.data_pipeline.stream.sft import SFTStream
from triarch.data_pipeline.stream.token_stream import TokenStream, document_positions

__all__ = ["SFTStream", "TokenStream", "document_positions"]
