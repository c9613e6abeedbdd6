"""Rendered prompt text to token ids, with item text never read as a control token.

A post may quote ``</s>``, ``<|eot_id|>`` or ``[INST]``; tokenized the way tokenizers do by default, that string
becomes the special token it spells, and the post closes its turn or opens a new one. Here message text (items,
shots, system text, answers) is tokenized as the characters it is, as the vendors' encoders (mistral-common,
llama-models) encode message content; only the markup the chat template writes becomes special tokens. Text without
a special token's string is tokenized exactly as one plain call would tokenize it. The pieces:

* :func:`special_spans` finds where a text holds a special token's string;
* :func:`mark_specials` and :func:`unmark_specials` carry those places through a chat template's rendering (a
  template may trim or move message text, so the strings are marked before it renders and found by their marks
  after);
* :func:`encode_text` tokenizes the rendered text with no special token read in those places (each stretch of text
  between two markup tokens whole, as a vendor's encoder does: not transformers' ``sanitize_control_tokens``, see
  :func:`_encode_plain`), and gives it exactly one BOS where the tokenizer adds one by default (``add_bos_token``,
  or whatever a fast tokenizer's post-processor prepends), whatever the chat template emits.

Kept apart from :mod:`moralign.prompts` (what a prompt says) because this is how any rendered text becomes ids:
extraction encodes answers and conversations with it too.
"""

from __future__ import annotations

import copy
import re
import weakref
from functools import lru_cache
from typing import Any

# Wrapped around a special token's string inside message text while the chat template renders, so its place in
# the rendered text is known (private-use code points: no template, tokenizer or Scruples text uses them).
MARK_OPEN, MARK_CLOSE = "\U000f0000", "\U000f0001"
# The token a copy of the tokenizer puts before a piece of text to encode it as the middle of a longer text
# (``_plain_stretch``); a SentencePiece-style tokenizer adds its prefix space only at the start of the text.
CONTEXT_TOKEN = "\U000f0002moralign-context\U000f0002"

Spans = tuple[tuple[int, int], ...]


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts an encoding with its BOS token by default (``add_bos_token`` or post-processor)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def special_spans(tokenizer: Any, text: str, offset: int = 0) -> Spans:
    """Where ``text`` holds the string of one of the tokenizer's special tokens (shifted by ``offset``)."""
    pattern = specials_pattern(tokenizer)
    return tuple((m.start() + offset, m.end() + offset) for m in pattern.finditer(text)) if pattern else ()


def specials_pattern(tokenizer: Any) -> re.Pattern | None:
    """A pattern that finds the strings of the tokenizer's special tokens (None: it has none)."""
    return _special_pattern(tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.special))


@lru_cache(maxsize=32)
def _special_pattern(strings: tuple[str, ...]) -> re.Pattern | None:
    # longest first, so a special string that contains another is found whole
    return re.compile("|".join(map(re.escape, sorted(strings, key=len, reverse=True)))) if strings else None


def mark_specials(pattern: re.Pattern, text: str) -> str:
    """``text`` with every string ``pattern`` finds (:func:`specials_pattern`) wrapped in MARK_OPEN/MARK_CLOSE."""
    return pattern.sub(f"{MARK_OPEN}\\g<0>{MARK_CLOSE}", text)


def unmark_specials(marked: str) -> tuple[str, Spans]:
    """Marked text with the marks taken out, and the spans of that text which the marks enclosed."""
    unmarked, plain, pos = "", [], 0
    for m in re.finditer(f"{MARK_OPEN}(.*?){MARK_CLOSE}", marked, flags=re.DOTALL):
        unmarked += marked[pos : m.start()]
        plain.append((len(unmarked), len(unmarked) + len(m.group(1))))
        unmarked += m.group(1)
        pos = m.end()
    unmarked += marked[pos:]
    return unmarked, tuple(plain)


def encode_text(tokenizer: Any, text: str, plain: Spans = ()) -> list[int]:
    """Token ids of rendered text: special tokens in it parsed, nothing appended, exactly one BOS when due.

    ``plain``: character spans of message text that hold a special token's string (``special_spans``); no special
    token is read there: that text is tokenized as plain text, together with the text around it up to the nearest
    special tokens outside those spans (the markup), as a vendor's encoder tokenizes a message's content.
    """
    ids = encode_without_bos(tokenizer, text, plain)
    if not adds_bos(tokenizer):
        return ids
    bos, k = tokenizer.bos_token_id, 0
    while k < len(ids) and ids[k] == bos:
        k += 1
    return [bos, *ids[k:]]


def encode_without_bos(tokenizer: Any, text: str, plain: Spans) -> list[int]:
    """``encode_text`` without the BOS rule (for a piece of text measured in tokens, not a whole prompt)."""
    return _encode_plain(tokenizer, text, plain) if plain else tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode_plain(tokenizer: Any, text: str, plain: Spans) -> list[int]:
    """``text`` tokenized with no special token read inside ``plain``; as one plain call where none is read there.

    The special tokens the tokenizer reads outside ``plain`` stay; each stretch of text between two of them that
    had a special token read inside ``plain`` is tokenized again with special tokens off (``_plain_stretch``), whole,
    as a vendor encodes a message. (transformers' ``apply_chat_template(sanitize_control_tokens=True)`` encodes each
    such string apart from the text around it: Mistral's "a </s>" becomes "▁a", "▁", "</", ... where mistral-common
    gives "▁a", "▁</", ...; so it is not used.)
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"text holding special tokens' strings ({[text[a:b] for a, b in plain][:3]}) needs a fast tokenizer to "
            f"be tokenized as plain text; {type(tokenizer).__name__} is not one"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    # a special token read where message text holds a special token's string: it must be plain text there
    inside = [i in special and any(a < e and s < b for a, b in plain) for i, (s, e) in zip(ids, offsets, strict=True)]
    if not any(inside):
        return ids
    markup = [k for k, i in enumerate(ids) if i in special and not inside[k]] + [len(ids)]
    out: list[int] = []
    first, start = 0, 0  # the stretch's first token and first character
    for k in markup:
        end = offsets[k][0] if k < len(ids) else len(text)
        stretch = ids[first:k]
        out += _plain_stretch(tokenizer, text, start, end, stretch) if any(inside[first:k]) else stretch
        if k < len(ids):
            out.append(ids[k])
            first, start = k + 1, offsets[k][1]
    return out


# A tokenizer's copy with CONTEXT_TOKEN added, per tokenizer (dropped with it); rebuilt if its vocabulary grows.
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plain_stretch(tokenizer: Any, text: str, start: int, end: int, expected: list[int]) -> list[int]:
    """``text[start:end]`` (a stretch between two markup tokens) tokenized with special tokens off, in place.

    In place: after the markup token before it, if any. The tokenizers library tokenizes the text between special
    tokens piece by piece, and knows whether a piece starts the text (where a SentencePiece-style tokenizer adds its
    prefix space, and nowhere else); the copy tokenizes CONTEXT_TOKEN + the stretch to keep that. ``expected``, the
    stretch's ids as the tokenizer gave them in the whole text (special tokens on), must be what the copy gives
    with special tokens on; otherwise the copy does not reproduce the tokenizer, and that is an error.
    """
    known = _COPIES.get(tokenizer)
    if known is None or known[0] != len(tokenizer):
        from tokenizers import AddedToken

        backend = copy.deepcopy(tokenizer.backend_tokenizer)
        backend.add_tokens([AddedToken(CONTEXT_TOKEN, special=False, normalized=False)])
        known = (len(tokenizer), backend)
        _COPIES[tokenizer] = known
    backend = known[1]
    piece, skip = (CONTEXT_TOKEN + text[start:end], 1) if start else (text[start:end], 0)
    encoded = {}
    for plain in (False, True):  # special tokens read (as the tokenizer does), then not
        backend.encode_special_tokens = plain
        encoded[plain] = backend.encode(piece, add_special_tokens=False).ids[skip:]
    if encoded[False] != expected:
        raise ValueError(
            f"cannot tokenize {text[start:end][:80]!r} as plain text: a copy of the tokenizer, asked to tokenize it "
            "as the tokenizer does, gives other ids"
        )
    return encoded[True]
