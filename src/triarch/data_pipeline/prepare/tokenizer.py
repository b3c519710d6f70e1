"""Byte-level BPE tokenizers (Hugging Face ``tokenizers``): train, load, find the end-of-text id."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.fileio import replace_atomically, temp_path
from triarch.data_pipeline.prepare.long_documents import in_pieces

EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")


MAX_VOCAB_SIZE = 1 << 24  # 16.8M; the largest vocabularies in use are about 256k


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, path: Path) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` and save it to ``path`` (temp file + rename).

    ``<|endoftext|>`` is id 0 and serves as EOS; the 256 byte symbols are always in the vocabulary, so
    any text can be encoded. The result is deterministic for the same texts and vocabulary size. Long texts
    are fed in pieces (``long_documents``) that pre-tokenize exactly like the whole text.
    """
    min_vocab = len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if vocab_size < min_vocab:
        raise DataError(f"vocab_size ({vocab_size}) must be at least {min_vocab} (256 bytes + EOS)")
    if vocab_size > MAX_VOCAB_SIZE:  # the BPE trainer allocates by the requested size (1e11: a Rust abort)
        raise DataError(f"vocab_size ({vocab_size}) must be at most {MAX_VOCAB_SIZE}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(in_pieces(texts), trainer=trainer)  # bounded memory, the same merges
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tokenizer.save(str(tmp))
    replace_atomically(tmp, path)
    return tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    """Load any Hugging Face ``tokenizer.json``; a missing or unreadable file is a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot load tokenizer {path}: {first_line}") from exc


def eos_id(tokenizer: Tokenizer, path: Path | str | None = None) -> int:
    """The end-of-text id of ``tokenizer`` (first of ``EOS_CANDIDATES`` present); ``path`` names it in errors."""
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    where = path if path is not None else "tokenizer"
    raise DataError(f"{where} has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")
