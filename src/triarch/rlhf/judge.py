"""A deterministic rule-based judge of "more helpful and less verbose", for preference data and evaluation.

``judge(prompt, response)`` scores any pair of strings (empty, non-English, or garbage from a tiny model:
never an exception, always a finite float) as ``helpfulness - verbosity``. Words are the whitespace-separated
tokens of the response; *content stems* are lower-case alphabetic runs of 3+ letters that are not stop words,
cut to their first ``STEM_CHARS`` letters after dropping a plural / -ed / -ing ending.

helpfulness, in [0, 1] = ``substance * (0.5 * wordlike + 0.3 * on_topic + 0.2 * complete)``

- ``substance`` = min(1, words / ``MIN_WORDS``): an answer needs a few words;
- ``wordlike``: the fraction of words that look like English words (letters, at least one vowel, at most
  ``MAX_WORD_CHARS`` letters, surrounding punctuation allowed), so token soup scores low;
- ``on_topic`` = min(1, shared content stems with the prompt / ``TOPIC_STEMS``);
- ``complete``: 1 if the response ends a sentence (``. ! ?``, optionally followed by a closing quote or
  bracket), else 0.

verbosity, >= 0 = ``LENGTH_WEIGHT * max(0, words - CONCISE_WORDS) / CONCISE_WORDS
+ REPEAT_WEIGHT * repeated + FILLER_WEIGHT * fillers``

- ``repeated``: the fraction of the response's word trigrams that already occurred earlier in it;
- ``fillers``: occurrences of ``FILLER_PHRASES`` (whole words, case-insensitive).

So a concise, complete, on-topic sentence scores up to 1; each ``CONCISE_WORDS`` words past the target
cost ``LENGTH_WEIGHT``, each filler phrase ``FILLER_WEIGHT``, and a response that is all repetition
``REPEAT_WEIGHT``. The rule needs no corpus and no model: it is the stated goal, and the synthetic
preference set (``data_pipeline.prepare.synthetic_preferences``) is built so that it prefers every chosen
response over its rejected one.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

MIN_WORDS = 3
CONCISE_WORDS = 16
MAX_WORD_CHARS = 20
TOPIC_STEMS = 2
STEM_CHARS = 5
LENGTH_WEIGHT = 0.5
REPEAT_WEIGHT = 1.0
FILLER_WEIGHT = 0.25

FILLER_PHRASES = (
    "it is worth noting that", "it should be noted that", "as a matter of fact", "in other words",
    "basically", "essentially", "needless to say", "at the end of the day", "as mentioned above",
    "as previously mentioned", "it goes without saying", "for what it is worth", "all things considered",
    "generally speaking", "so to speak", "to put it simply", "more or less", "to be honest",
    "long story short", "just to be clear", "in a nutshell", "if you think about it", "when all is said and done",
    "by and large", "for all intents and purposes", "let me explain", "you know",
)
STOP_WORDS = frozenset("""
a an the and or but nor so yet if then else than that this these those there here it its it's is are was
were be been being am do does did done has have had having of to in on at by for with from into onto over
under about as not no yes all any some each every other such same own only also just very more most less
can could may might must shall should will would which who whom whose what when where why how one two
your you we our they them their he she his her him i me my mine via per etc
""".split())

_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
_LETTERS = re.compile(r"[a-z]+")
_WORDLIKE = re.compile(r"^[\"'(\[`]*[A-Za-z]+(?:['’-][A-Za-z]+)*[\"')\]`.,;:!?]*$")
_VOWEL = re.compile(r"[aeiouy]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?][\"')\]`]*$")
_SUFFIXES = ("ing", "ed", "es", "s")


@dataclass(frozen=True)
class JudgeScore:
    """The parts of one judgement; ``score`` = ``helpfulness`` - ``verbosity``."""

    score: float
    helpfulness: float
    verbosity: float
    words: int
    substance: float
    wordlike: float
    on_topic: float
    complete: float
    length_excess: float
    repeated: float
    fillers: int

    def as_dict(self) -> dict[str, float | int]:
        """The parts as a JSON-able dict."""
        return asdict(self)


def _stem(word: str) -> str:
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[:-len(suffix)]
            break
    return word[:STEM_CHARS]


def content_stems(text: str) -> set[str]:
    """Stems of the content words of ``text`` (see the module docstring)."""
    words = _LETTERS.findall(text.lower())
    return {_stem(w) for w in words if len(w) >= 3 and w not in STOP_WORDS}


def _is_wordlike(token: str) -> bool:
    if not _WORDLIKE.match(token):
        return False
    letters = "".join(ch for ch in token if ch.isalpha())
    return len(letters) <= MAX_WORD_CHARS and _VOWEL.search(letters) is not None


def repeated_trigrams(words: list[str]) -> float:
    """The fraction of word trigrams of ``words`` (compared lower-case, punctuation dropped) seen before."""
    keys = [" ".join(_WORD.findall(w.lower())) or w for w in words]
    seen: set[tuple[str, ...]] = set()
    repeats = total = 0
    for i in range(len(keys) - 2):
        gram = tuple(keys[i:i + 3])
        total += 1
        repeats += gram in seen
        seen.add(gram)
    return repeats / total if total else 0.0


def count_fillers(text: str) -> int:
    """Occurrences of ``FILLER_PHRASES`` in ``text`` (whole words, case-insensitive)."""
    flat = " " + " ".join(_WORD.findall(text.lower())) + " "
    return sum(flat.count(f" {phrase} ") for phrase in FILLER_PHRASES)


def judge_parts(prompt: str, response: str) -> JudgeScore:
    """Score ``response`` to ``prompt`` by the rule of the module docstring, with every part."""
    prompt, response = str(prompt), str(response)
    words = response.split()
    n = len(words)
    substance = min(1.0, n / MIN_WORDS)
    wordlike = sum(map(_is_wordlike, words)) / n if n else 0.0
    on_topic = min(1.0, len(content_stems(prompt) & content_stems(response)) / TOPIC_STEMS)
    complete = 1.0 if _SENTENCE_END.search(response.strip()) else 0.0
    helpfulness = substance * (0.5 * wordlike + 0.3 * on_topic + 0.2 * complete)
    length_excess = max(0, n - CONCISE_WORDS) / CONCISE_WORDS
    repeated = repeated_trigrams(words)
    fillers = count_fillers(response)
    verbosity = LENGTH_WEIGHT * length_excess + REPEAT_WEIGHT * repeated + FILLER_WEIGHT * fillers
    return JudgeScore(score=helpfulness - verbosity, helpfulness=helpfulness, verbosity=verbosity, words=n,
                      substance=substance, wordlike=wordlike, on_topic=on_topic, complete=complete,
                      length_excess=length_excess, repeated=repeated, fillers=fillers)


def judge(prompt: str, response: str) -> float:
    """The judge's score of ``response`` to ``prompt``: higher is more helpful and less verbose."""
    return judge_parts(prompt, response).score


def prefers(prompt: str, chosen: str, rejected: str) -> bool:
    """Whether the judge scores ``chosen`` strictly above ``rejected``."""
    return judge(prompt, chosen) > judge(prompt, rejected)
