"""Parsers of raw generations: the answer of a sampled completion, the shares of a stated distribution.

Both parsers carry a version (:data:`VERSIONS`). Distributions are always recomputed from the cached raw
generations (:mod:`moralign.readings.cache`), so fixing a parser means raising its version, never regenerating.

**The answer rule** (``sample`` reading, :func:`parse_answer`). A completion may open with a preamble ("I would
say Yes"), so the answer is looked for in the text, not only at its start:

1. An answer is *mentioned* where its text stands as whole words (no letter or digit on either side), and the
   matched span passes extraction's variant rule (:func:`moralign.extraction._matches`): whitespace around it
   does not matter, nor does case, except for one-letter answers ("a" is mostly the article, not option A).
2. A *hedge* is one of :data:`HEDGES` (refusals, "it depends", "not sure", ...), matched case-insensitively as
   whole words outside the answers' own spans.
3. The text is cut into sentences at ``. ! ?`` and line breaks (outside answer spans). The *deciding sentence*
   is the first one holding a mention or a hedge; later sentences are explanation ("Yes. No one would ...").
4. The draw is valid when the deciding sentence holds no hedge and mentions exactly one answer (any number of
   times). A hedge, two different answers ("Yes and no", "A or B") or no mention at all is an invalid draw.
"""

from __future__ import annotations

import bisect
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from moralign.extraction import _matches

# Raise a version whenever its parser's output can change for some text: cached generations are parsed anew.
ANSWER_PARSER_VERSION = 1
SHARES_PARSER_VERSION = 1
VERSIONS = {"sample": ANSWER_PARSER_VERSION, "verbal": SHARES_PARSER_VERSION}

# Phrases that make the deciding sentence a refusal or a hedge rather than an answer (lower case, ASCII
# apostrophes: the text is normalised first). Whole-word matches only: "unable" does not hit "unabled".
HEDGES: tuple[str, ...] = (
    "it depends",
    "depends on",
    "depending on",
    "i cannot",
    "i can't",
    "i can not",
    "i won't",
    "i will not",
    "i'm unable",
    "i am unable",
    "unable to",
    "i'm sorry",
    "i am sorry",
    "as an ai",
    "i don't know",
    "i do not know",
    "not sure",
    "hard to say",
    "difficult to say",
    "impossible to say",
    "not possible to",
    "cannot be determined",
    "can't be determined",
    "not enough information",
    "need more information",
    "more context",
)
_HEDGE_RE = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(h) for h in HEDGES) + r")(?!\w)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?\n]")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


@dataclass(frozen=True)
class Parsed:
    """One draw's answer: the choice index, or None with the reason it is invalid."""

    choice: int | None
    reason: str

    @property
    def valid(self) -> bool:
        """Whether the draw counts towards the item's distribution."""
        return self.choice is not None


def normalise_text(text: str) -> str:
    """NFKC (full-width letters become ASCII) and typographic quotes made ASCII, so hedges match either way."""
    return unicodedata.normalize("NFKC", text).translate(_QUOTES)


def _answer_pattern(answer: str) -> re.Pattern[str]:
    words = r"\s+".join(re.escape(w) for w in answer.split())
    return re.compile(r"(?<!\w)" + words + r"(?!\w)", 0 if len(answer) == 1 else re.IGNORECASE)


def mentions(text: str, answers: Sequence[str]) -> list[tuple[int, int, int]]:
    """``(start, end, choice)`` of every answer mention (rule 1), longest first where two overlap, by position."""
    found = []
    for j, answer in enumerate(answers):
        for m in _answer_pattern(answer).finditer(text):
            if _matches(" ".join(m.group().split()), answer):
                found.append((m.start(), m.end(), j))
    kept: list[tuple[int, int, int]] = []
    for start, end, j in sorted(found, key=lambda s: (s[0], -(s[1] - s[0]))):
        if not kept or start >= kept[-1][1]:
            kept.append((start, end, j))
    return kept


def parse_answer(text: str, answers: Sequence[str]) -> Parsed:
    """The answer of one sampled completion by the rule of the module docstring."""
    text = normalise_text(text)
    spans = mentions(text, answers)
    blanked = list(text)
    for start, end, _ in spans:
        blanked[start:end] = " " * (end - start)
    hedges = [(m.start(), m.end()) for m in _HEDGE_RE.finditer("".join(blanked))]
    if not spans and not hedges:
        return Parsed(None, "no answer")
    inside = [False] * len(text)
    for start, end, _ in spans:
        inside[start:end] = [True] * (end - start)
    ends = [m.start() for m in _SENTENCE_END.finditer(text) if not inside[m.start()]]

    def sentence(pos: int) -> int:
        return bisect.bisect_right(ends, pos)

    first = min(sentence(pos) for pos, *_ in [*spans, *hedges])
    if any(sentence(start) == first for start, _ in hedges):
        return Parsed(None, "refusal or hedge")
    choices = {j for start, _, j in spans if sentence(start) == first}
    if len(choices) > 1:
        return Parsed(None, "several answers")
    return Parsed(choices.pop(), "answer")


@dataclass(frozen=True)
class Shares:
    """One stated distribution: the integer percentages in choice order, or None with the reason it is invalid."""

    values: tuple[int, ...] | None
    reason: str

    @property
    def valid(self) -> bool:
        """Whether the draw parsed as the object asked for and can be normalised (its sum is not 0)."""
        return self.values is not None and sum(self.values) > 0

    @property
    def total(self) -> int | None:
        """The sum of the stated percentages (100 when the model kept to the instruction)."""
        return None if self.values is None else sum(self.values)


_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL | re.IGNORECASE)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a key twice: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    return dict(pairs)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_shares(text: str, answers: Sequence[str]) -> Shares:
    """The percentages of a stated distribution: the JSON object the ``verbal`` instruction asks for.

    Accepted: the text, stripped, is one JSON object (optionally inside a Markdown code fence, as chat models
    like to write it) whose keys are exactly the answers and whose values are integers from 0 to 100. Anything
    else is an invalid draw with its reason; a valid object whose values are all 0 cannot be normalised and is
    invalid too (:attr:`Shares.valid`), its ``values`` kept.
    """
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except ValueError as err:
        return Shares(None, f"not JSON: {err}")
    if not isinstance(obj, dict):
        return Shares(None, f"not a JSON object but {type(obj).__name__}")
    if set(obj) != set(answers):
        return Shares(None, f"keys {sorted(obj)} are not the answers {sorted(answers)}")
    values = [obj[a] for a in answers]
    if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 100 for v in values):
        return Shares(None, f"values {values} are not integer percentages from 0 to 100")
    shares = Shares(tuple(values), "shares")
    return shares if shares.valid else Shares(shares.values, "all shares 0")
