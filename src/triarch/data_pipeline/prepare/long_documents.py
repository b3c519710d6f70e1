"""Cut long documents into pieces that tokenize, one after another, exactly like the whole document.

A tokenizer's working memory is about 170 bytes per character of the text it encodes at once (offsets,
alignments and token strings for every position), so a 50 MB document would need 8 GB. ``prepare``
therefore encodes a document longer than ``PIECE_CHARS`` characters in pieces and concatenates the ids;
EOS follows only the last piece.

Where to cut (searching back from ``PIECE_CHARS`` past the previous cut, nearest first):

1. before a whitespace run that follows a non-space character (preferably a run starting with ``' '``,
   then ``'\\n'``);
2. between a letter or digit and a following punctuation or other symbol;
3. otherwise at ``PIECE_CHARS`` (a hard cut, only in text with neither within half a piece).

For the byte-level BPE ``prepare`` trains (GPT-2 pre-tokenizer regex, no normalizer) cuts 1 and 2 always
fall on a pre-token boundary, and nothing before them looks past them, so the ids are exactly the whole
document's. For a given ``tokenizer.json`` each cut is checked: the text ``VERIFY_CHARS`` either side of it
must encode the same whole as in two parts; otherwise the next candidate is tried (``TRIES`` in all). A
cut that no candidate makes exact is taken anyway and counted (``inexact``): it happens with tokenizers
that add something at the start of every input (a ``Prepend`` normalizer or a ``Metaspace`` pre-tokenizer
with ``prepend_scheme: always``, as in converted SentencePiece models such as Llama 2), where each piece
after the first gains a leading-space token, and at hard cuts, where a merge across the cut is lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer

PIECE_CHARS = 1 << 18  # 256 Ki characters: about 45 MB of tokenizer memory per worker thread
VERIFY_CHARS = 512
TRIES = 4
_SEARCH_SYMBOLS = 4096  # characters scanned back for a letter/symbol boundary (rule 2)


def _space_cuts(text: str, lo: int, hi: int, space: str) -> Iterator[int]:
    """Positions ``i`` in ``(lo, hi]`` (nearest ``hi`` first) where ``text[i] == space`` follows a non-space."""
    end = hi + 1
    while (i := text.rfind(space, lo + 1, end)) > lo:
        if not text[i - 1].isspace():
            yield i
        end = i


def _symbol_cuts(text: str, lo: int, hi: int) -> Iterator[int]:
    """Positions in ``(lo, hi]`` (nearest ``hi`` first) between a letter or digit and a following symbol."""
    for i in range(hi, max(lo, hi - _SEARCH_SYMBOLS), -1):
        after = text[i]
        if text[i - 1].isalnum() and not after.isalnum() and not after.isspace():
            yield i


class DocumentPieces:
    """Cuts texts longer than ``piece_chars`` into pieces (see the module docstring). With ``tokenizer``,
    each cut is checked for exactness and ``inexact`` counts the cuts taken without being exact."""

    def __init__(self, tokenizer: Tokenizer | None = None, piece_chars: int = PIECE_CHARS) -> None:
        self.tokenizer = tokenizer
        self.piece_chars = piece_chars
        self.inexact = 0
        self.cuts_made = 0

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def exact_at(self, text: str, cut: int) -> bool:
        """Whether ``text`` around ``cut`` encodes to the same ids whole as in two parts."""
        if self.tokenizer is None:
            return True
        left = text[max(0, cut - VERIFY_CHARS):cut]
        right = text[cut:cut + VERIFY_CHARS]
        return self._ids(left + right) == self._ids(left) + self._ids(right)

    def _candidates(self, text: str, lo: int, hi: int) -> Iterator[int]:
        floor = lo + (hi - lo) // 2  # keep pieces at least half the budget
        yield from _space_cuts(text, floor, hi, " ")
        yield from _space_cuts(text, floor, hi, "\n")
        yield from _symbol_cuts(text, floor, hi)
        yield hi

    def _cut(self, text: str, lo: int) -> int:
        hi = lo + self.piece_chars
        last = hi
        for tries, cut in enumerate(self._candidates(text, lo, hi), 1):
            last = cut
            if self.exact_at(text, cut):
                return cut
            if tries == TRIES:
                break
        self.inexact += 1
        return last

    def cuts(self, text: str) -> list[int]:
        """Where ``text`` is cut: positions strictly inside it, ascending (empty for a short text)."""
        cuts: list[int] = []
        lo = 0
        while len(text) - lo > self.piece_chars:
            lo = self._cut(text, lo)
            cuts.append(lo)
        self.cuts_made += len(cuts)
        return cuts

    def pieces(self, text: str) -> list[str]:
        """``text`` as pieces of at most ``piece_chars`` characters (``[text]`` when it is short)."""
        if len(text) <= self.piece_chars:
            return [text]
        bounds = [0, *self.cuts(text), len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def in_pieces(texts: Iterable[str], piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """Every text, long ones as pieces (cut without a tokenizer to check): for training a byte-level BPE,
    whose pre-tokenizer makes the word counts of the pieces those of the whole text."""
    cutter = DocumentPieces(None, piece_chars)
    for text in texts:
        yield from cutter.pieces(text)
