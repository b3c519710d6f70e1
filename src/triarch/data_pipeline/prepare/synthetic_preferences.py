"""An embedded synthetic preference set, "more helpful and less verbose", built from the stdlib docstrings.

Each pair comes from one docstring whose first sentence is short, plain English:

- ``prompt``: its first 3 to 6 words (at most ``MAX_PROMPT_TOKENS`` tokens);
- ``chosen``: the true rest of that sentence (at most ``judge.CONCISE_WORDS`` words, ending the sentence);
- ``rejected``, one of ``KINDS`` (the rarest so far that can be built, so the kinds are balanced). The four
  verbose kinds are always at least ``MIN_EXTRA_WORDS`` words longer than ``chosen`` and at least
  ``MIN_REJECTED_WORDS`` long: ``filler`` (the true rest + sentences of filler phrases), ``repetition`` (the
  true rest said again and again), ``off_topic`` (the rest of an unrelated docstring's opening sentence and
  what follows it, then other unrelated docstrings' sentences if it is still short) and ``rambling`` (the true
  rest and the docstring's next sentence, then sentence after sentence of unrelated docstrings, up to the
  token budget). "Unrelated" docstrings share no content stem (``judge.content_stems``) with prompt + chosen.
  ``too_short`` is the other side of "helpful": the true rest cut after 0 to ``MAX_TOO_SHORT_WORDS`` words
  and closed with a full stop (" ." or " the file."), so a model trained on the set learns that an answer can
  be too short as well as too long (without it, every rejected response was the longer one, and a reward
  model trained on them scored one-word answers highest).

Responses start with a space (they continue the prompt's text, so a byte-level BPE tokenizes them as in
running text). Every pair fits ``max_len`` tokens: prompt + the longer response + EOS. The judge
(``triarch.rlhf.judge``) must prefer ``chosen`` over ``rejected``: a built pair it does not prefer is
discarded and the docstring tried with the next kind (counted as ``judge.discarded``), so the finished set
agrees with the judge on every pair (checked again on the written set). Prompts are unique.

Held-out pairs are those whose prompt hashes below ``eval_fraction`` (``pydocs.split_of``, the rule of
``prepare_preference_splits``); docstrings are taken in a seeded order until each split has its quota
(``round(pairs * eval_fraction)`` held out, at least 1), so the split sizes are exact.

``make_synthetic_preferences`` writes into an empty ``out_dir``: ``pairs.jsonl`` (every pair: prompt, chosen,
rejected, kind, split, source docstring index), ``sft.jsonl`` (``{"prompt", "response"}`` = the train
pairs' chosen responses), ``tokenizer.json`` when none is given, ``train/`` and ``validation/`` (prepared by
``prepare_preference_splits``) and ``synthetic.json`` last (seed, counts, kinds, lengths, judge agreement).
Everything is a function of the seed, the arguments and the standard library's docstrings: the same seed
into the same ``out_dir`` gives byte-identical files (the manifests record the absolute path of
``pairs.jsonl``).
"""

from __future__ import annotations

import itertools
import json
import platform
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.fileio import file_sha256, replace_atomically, temp_path
from triarch.data_pipeline.preference_format import TOKENIZER_NAME
from triarch.data_pipeline.prepare.preferences import DROP, prepare_preference_splits
from triarch.data_pipeline.prepare.pydocs import TRAIN, VALIDATION, split_of, split_train_validation, \
    stdlib_docstrings
from triarch.data_pipeline.prepare.tokenizer import load_tokenizer, train_byte_level_bpe
from triarch.rlhf.judge import CONCISE_WORDS, content_stems, count_fillers, judge, judge_parts

KINDS = ("filler", "repetition", "off_topic", "rambling", "too_short")
VERBOSE_KINDS = KINDS[:4]
DEFAULT_PAIRS = 2000
DEFAULT_MAX_LEN = 128  # the demo's seq_len
DEFAULT_EVAL_FRACTION = 0.1
MIN_PAIRS = 10
MIN_MAX_LEN = 96  # below this a rambling response of MIN_RAMBLING_WORDS rarely fits
PROMPT_WORDS = (3, 6)
MAX_PROMPT_TOKENS = 16
MIN_CHOSEN_WORDS = 3
MIN_EXTRA_WORDS = 12
MAX_TOO_SHORT_WORDS = 2  # below MIN_CHOSEN_WORDS: a too-short answer is always shorter than the chosen one
MIN_REJECTED_WORDS = CONCISE_WORDS + 8
MIN_RAMBLING_WORDS = 2 * MIN_REJECTED_WORDS
DONOR_TRIES = 20
DRIFT_DONORS = 8
# The demo corpus's tokenizer (``make demo``: ``triarch prepare --vocab-size 2048``): a BPE of this size
# trained on the train split of the docstrings.
DEMO_VOCAB_SIZE = 2048
DEMO_VALIDATION_FRACTION = 0.05
FORMAT_NAME = "triarch.synthetic_preferences"
SUMMARY_NAME = "synthetic.json"

FILLER_SENTENCES = (
    "It is worth noting that this is how it works.",
    "In other words, that is basically what it does.",
    "Needless to say, there is more that could be said about this.",
    "As mentioned above, this is more or less the whole idea.",
    "Generally speaking, it does what you would expect it to do.",
    "To be honest, it is essentially the same thing as before.",
    "At the end of the day, that is all there is to it.",
    "All things considered, this is the usual way of doing it.",
    "Long story short, it works the way it is supposed to work.",
    "Just to be clear, nothing else happens here, so to speak.",
    "By and large, this is what most people would want, you know.",
    "In a nutshell, it does what the name says.",
    "For what it is worth, this behaviour is rarely surprising.",
    "If you think about it, this is basically the obvious approach.",
)
REPEAT_OPENERS = ("Again,", "That is,", "Once more,", "To repeat,", "Put differently,", "As said,")

_SENTENCE = re.compile(r"\S.*?[.!?](?=\s|$)")
_PLAIN = re.compile(r"^[A-Za-z0-9 ,;:'\"()\-./]+$")
_CODE_HINTS = (">>>", "::", "...", "()", "__", "e.g", "i.e")


def _sentences(doc: str) -> list[str]:
    """The plain-English sentences of ``doc`` (whitespace collapsed), in order; other text breaks the run."""
    text = " ".join(doc.split())
    out = []
    for match in _SENTENCE.finditer(text):
        sentence = match.group(0)
        if not _PLAIN.match(sentence) or any(h in sentence for h in _CODE_HINTS) or len(sentence.split()) < 3:
            break
        out.append(sentence)
    return out


@dataclass(frozen=True)
class _Source:
    """One docstring cut into a prompt and its true continuation, plus the sentences after it."""

    index: int
    prompt: str
    chosen: str
    after: tuple[str, ...]  # the docstring's next plain sentences
    stems: frozenset[str]


def _cut(index: int, doc: str, rng: random.Random) -> _Source | None:
    """Cut docstring ``doc`` into a prompt and a concise continuation, or None if it does not suit."""
    sentences = _sentences(doc)
    if not sentences:
        return None
    words = sentences[0].split()
    k = rng.randint(*PROMPT_WORDS)
    k = min(k, len(words) - MIN_CHOSEN_WORDS)
    if k < PROMPT_WORDS[0] or len(words) - k > CONCISE_WORDS:
        return None
    prompt, chosen = " ".join(words[:k]), " " + " ".join(words[k:])
    if count_fillers(chosen) or judge_parts(prompt, chosen).wordlike < 0.8:
        return None
    return _Source(index, prompt, chosen, tuple(sentences[1:]), frozenset(content_stems(prompt + chosen)))


class _Builder:
    """Builds the rejected responses of one set: holds the docstrings' sentences, the tokenizer, the budget."""

    def __init__(self, sentences: list[list[str]], tokenizer: Tokenizer, max_len: int, rng: random.Random) -> None:
        self.sentences = sentences
        self.donors = [i for i, s in enumerate(sentences) if s]
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.rng = rng

    def tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def budget(self, source: _Source) -> int:
        """Response tokens that fit after the prompt, EOS included in the count."""
        return self.max_len - self.tokens(source.prompt) - 1

    def _donor(self, source: _Source) -> list[str]:
        """The sentences of a random docstring sharing no content stem with the source's prompt + chosen
        (none after ``DONOR_TRIES`` draws)."""
        for _ in range(DONOR_TRIES):
            index = self.donors[self.rng.randrange(len(self.donors))]
            sentences = self.sentences[index]
            if index != source.index and not content_stems(" ".join(sentences)) & source.stems:
                return sentences
        return []

    def _drift(self, source: _Source, donors: int) -> Iterator[str]:
        """The sentences of up to ``donors`` unrelated docstrings, one docstring after another."""
        for _ in range(donors):
            yield from self._donor(source)

    def _grow(self, source: _Source, start: str, pieces: Iterator[str], min_words: int, fill: bool) -> str | None:
        """``start`` + pieces until at least ``min_words`` words (all that fit the budget if ``fill``)."""
        text, budget = start, self.budget(source)
        for piece in pieces:
            longer = f"{text} {piece}"
            if self.tokens(longer) > budget:
                break
            text = longer
            if not fill and len(text.split()) >= min_words:
                break
        return text if len(text.split()) >= min_words and self.tokens(text) <= budget else None

    def filler(self, source: _Source) -> str | None:
        order = self.rng.sample(FILLER_SENTENCES, len(FILLER_SENTENCES))
        return self._grow(source, source.chosen, iter(order), _min_rejected_words(source), False)

    def repetition(self, source: _Source) -> str | None:
        openers = (f"{self.rng.choice(REPEAT_OPENERS)}{source.chosen}" for _ in range(64))
        return self._grow(source, source.chosen, openers, _min_rejected_words(source), False)

    def off_topic(self, source: _Source) -> str | None:
        donor = self._donor(source)
        words = donor[0].split() if donor else []
        skip = min(len(source.prompt.split()), len(words) - MIN_CHOSEN_WORDS)
        if skip < 1:
            return None
        start = " " + " ".join(words[skip:])
        more = itertools.chain(donor[1:], self._drift(source, DRIFT_DONORS))
        return self._grow(source, start, more, _min_rejected_words(source), False)

    def rambling(self, source: _Source) -> str | None:
        more = itertools.chain(source.after[:1], self._drift(source, DRIFT_DONORS))
        return self._grow(source, source.chosen, more, MIN_RAMBLING_WORDS, True)

    def too_short(self, source: _Source) -> str | None:
        words = source.chosen.split()[:self.rng.randint(0, MAX_TOO_SHORT_WORDS)]
        return " " + " ".join([*words[:-1], words[-1].rstrip(".,;:!?") + "."] if words else ["."])


def _min_rejected_words(source: _Source) -> int:
    """The least words a rejected response of ``source`` has (``rambling``: ``MIN_RAMBLING_WORDS``)."""
    return max(len(source.chosen.split()) + MIN_EXTRA_WORDS, MIN_REJECTED_WORDS)


def demo_tokenizer(docs: Sequence[str], path: Path) -> Path:
    """Train the demo corpus's BPE (``DEMO_VOCAB_SIZE`` on the train split of ``docs``) into ``path``.

    On the full stdlib docstrings this is byte-identical to ``data/pydocs/tokenizer.json`` of ``make demo``.
    """
    train_byte_level_bpe(split_train_validation(list(docs), DEMO_VALIDATION_FRACTION)[TRAIN], DEMO_VOCAB_SIZE, path)
    return path


def _quotas(pairs: int, eval_fraction: float) -> dict[str, int]:
    held_out = min(pairs - 1, max(1, round(pairs * eval_fraction)))
    return {TRAIN: pairs - held_out, VALIDATION: held_out}


def _build_pairs(docs: Sequence[str], builder: _Builder, rng: random.Random, pairs: int,
                 eval_fraction: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The pairs (in seeded docstring order) and the counts for ``synthetic.json``."""
    quotas = _quotas(pairs, eval_fraction)
    taken = dict.fromkeys(quotas, 0)
    order = list(range(len(docs)))
    rng.shuffle(order)
    out: list[dict[str, Any]] = []
    prompts: set[str] = set()
    stats = {"eligible_seen": 0, "discarded_by_judge": 0, "no_kind_fits": 0, "split_full": 0}
    made = dict.fromkeys(KINDS, 0)
    for index in order:
        if len(out) == pairs:
            break
        source = _cut(index, docs[index], rng)
        if source is None or source.prompt in prompts or builder.tokens(source.prompt) > MAX_PROMPT_TOKENS:
            continue
        stats["eligible_seen"] += 1
        split = split_of(source.prompt.encode("utf-8"), eval_fraction)
        if taken[split] == quotas[split]:
            stats["split_full"] += 1
            continue
        for kind in sorted(KINDS, key=lambda k: (made[k], KINDS.index(k))):  # the rarest kind first
            rejected = getattr(builder, kind)(source)
            if rejected is None:
                continue
            if judge(source.prompt, source.chosen) <= judge(source.prompt, rejected):
                stats["discarded_by_judge"] += 1
                continue
            out.append({"prompt": source.prompt, "chosen": source.chosen, "rejected": rejected, "kind": kind,
                        "split": split, "source": index})
            prompts.add(source.prompt)
            taken[split] += 1
            made[kind] += 1
            break
        else:
            stats["no_kind_fits"] += 1
    if len(out) < pairs:
        raise DataError(f"only {len(out)} of {pairs} synthetic pairs could be built from {len(docs)} docstrings "
                        f"with eval_fraction {eval_fraction} (held out {taken[VALIDATION]} of "
                        f"{quotas[VALIDATION]}); ask for fewer pairs")
    return out, stats


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = temp_path(path)
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records),
                   encoding="utf-8")
    replace_atomically(tmp, path)


def _summary(records: list[dict[str, Any]], builder: _Builder, stats: dict[str, Any]) -> dict[str, Any]:
    """Counts per split and kind, token lengths, and the judge's agreement on the finished set."""
    kinds = {kind: {TRAIN: 0, VALIDATION: 0} for kind in KINDS}
    lengths: dict[str, list[int]] = {"prompt": [], "chosen": [], **{kind: [] for kind in KINDS}}
    longest = agreed = 0
    for r in records:
        kinds[r["kind"]][r["split"]] += 1
        prompt, chosen, rejected = (builder.tokens(r[k]) for k in ("prompt", "chosen", "rejected"))
        lengths["prompt"].append(prompt)
        lengths["chosen"].append(chosen)
        lengths[r["kind"]].append(rejected)
        longest = max(longest, prompt + max(chosen, rejected) + 1)
        agreed += judge(r["prompt"], r["chosen"]) > judge(r["prompt"], r["rejected"])
    return {"kinds": kinds, "longest_example_tokens": longest,
            "tokens": {name: {"mean": round(sum(v) / len(v), 2), "min": min(v), "max": max(v)}
                       for name, v in lengths.items() if v},
            "judge": {"agreed": agreed, "pairs": len(records), "agreement": agreed / len(records),
                      "discarded_candidates": stats["discarded_by_judge"]},
            "selection": stats}


def make_synthetic_preferences(out_dir: str | Path, *, seed: int = 0, pairs: int = DEFAULT_PAIRS,
                               eval_fraction: float = DEFAULT_EVAL_FRACTION, tokenizer: str | Path | None = None,
                               max_len: int = DEFAULT_MAX_LEN, docs: Sequence[str] | None = None,
                               workers: int | None = None) -> dict[str, Any]:
    """Build the synthetic set into the empty (or new) ``out_dir`` (module docstring); return ``synthetic.json``.

    ``tokenizer``: a ``tokenizer.json`` (default: the demo corpus's BPE, trained into ``out_dir``, about a
    second). ``docs``: the docstrings to use (default: the standard library's, parsed by ``workers``
    processes, a few seconds).
    """
    out_dir = Path(out_dir)
    if pairs < MIN_PAIRS:
        raise DataError(f"pairs ({pairs}) must be at least {MIN_PAIRS}")
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction ({eval_fraction}) must be in (0, 1)")
    if max_len < MIN_MAX_LEN:
        raise DataError(f"max_len ({max_len}) must be at least {MIN_MAX_LEN} (a prompt and a rambling response)")
    if tokenizer is not None:
        load_tokenizer(Path(tokenizer))  # missing or malformed: a DataError naming it
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"output folder {out_dir} is not empty; use a new folder or delete this one")
    docs = stdlib_docstrings(workers=workers) if docs is None else list(docs)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = demo_tokenizer(docs, out_dir / TOKENIZER_NAME) if tokenizer is None else Path(tokenizer)
    rng = random.Random(seed)
    builder = _Builder([_sentences(d) for d in docs], load_tokenizer(tokenizer_path), max_len, rng)
    records, stats = _build_pairs(docs, builder, rng, pairs, eval_fraction)
    _write_jsonl(out_dir / "pairs.jsonl", records)
    _write_jsonl(out_dir / "sft.jsonl", [{"prompt": r["prompt"], "response": r["chosen"]}
                                         for r in records if r["split"] == TRAIN])
    manifests = prepare_preference_splits(out_dir / "pairs.jsonl", tokenizer_path, out_dir, max_len,
                                          eval_fraction=eval_fraction, too_long=DROP)
    summary = {"format": FORMAT_NAME, "seed": seed, "pairs": pairs, "eval_fraction": eval_fraction,
               "max_len": max_len, "docstrings": len(docs), "python": platform.python_version(),
               "tokenizer": {"file": str(tokenizer_path.name if tokenizer is None else tokenizer_path),
                             "trained": tokenizer is None, "sha256": file_sha256(tokenizer_path)},
               "splits": {name: m["records"] for name, m in manifests.items()},
               **_summary(records, builder, stats)}
    expected = _quotas(pairs, eval_fraction)
    dropped = {name: sum(m["bad_records"].values()) for name, m in manifests.items()}
    if summary["splits"] != expected or any(dropped.values()):
        raise DataError(f"prepared splits hold {summary['splits']} pairs (expected {expected}; dropped {dropped})")
    missing = [kind for kind, counts in summary["kinds"].items() if not sum(counts.values())]
    if missing:
        raise DataError(f"no pairs of kind {', '.join(missing)} could be built")
    if summary["judge"]["agreement"] < 1.0:
        raise DataError(f"the judge prefers chosen on only {summary['judge']['agreed']} of {pairs} pairs")
    tmp = temp_path(out_dir / SUMMARY_NAME)
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    replace_atomically(tmp, out_dir / SUMMARY_NAME)
    return summary
