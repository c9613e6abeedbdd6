"""Encoder inputs: the items of a processed split as token ids, truncated the way Scruples truncated them.

From Scruples' ``src/scruples/dataset/transforms.py``. Inputs are at most ``max_length`` tokens (Scruples: 512),
special tokens included. An anecdote is the pair (title, text); as in Scruples' ``BertTransform`` (truncation
strategy ``beginning`` for both pieces), the BEGINNING of each piece is kept: each piece may use half the room and
the other's unused half, so a short title is kept whole and the text loses its end (:func:`pair_room`). An item with
an empty text is encoded as the title alone. A dilemma's actions are encoded each on its own (``[CLS] action
[SEP]``, at most 96 tokens in Scruples' BERT ranker, 90 in its RoBERTa ranker).

Item text is always plain text: a ``[SEP]``, ``</s>`` or ``<s>`` written in a post is tokenized as its characters,
never as the special token it spells (only the tokenizer's post-processor adds special tokens). Training and
prediction both encode through :class:`InputEncoder`, so a model is scored on the inputs it was trained on.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pandas as pd

from moralign.data import TASKS
from moralign.encoder_heads import HEAD_CHOICE, head_of

PAIR_FIELDS = ("title", "text")  # the anecdote pair, in Scruples' order

Unit = tuple[list[int], list[int]]  # token ids and token type ids of one encoded sequence


def max_length_of(settings: dict[str, Any], dataset: str) -> int:
    """The ``encoder.max_length`` of a dataset's source (anecdotes-5way shares the anecdotes' length)."""
    return settings["max_length"][TASKS[dataset].archive]


def pair_room(n_first: int, n_second: int, room: int) -> tuple[int, int]:
    """Tokens kept of each piece of a pair with ``room`` tokens besides the special ones (Scruples' rule).

    Each piece may use half the room, plus whatever the other piece leaves of its half.
    """
    keep_first = max(room // 2, room - n_second)
    keep_second = max(room // 2, room - n_first)
    return min(n_first, keep_first), min(n_second, keep_second)


class InputEncoder:
    """Encodes the items of a processed split as the model reads them (see the module docstring)."""

    def __init__(self, tokenizer: Any, dataset: str, max_length: int) -> None:
        self.dataset, self.max_length = dataset, max_length
        self.head = head_of(dataset)
        self.task = TASKS[dataset]
        # the tokenizer's own post-processor adds the special tokens ([CLS] A [SEP] B [SEP] / <s> A </s></s> B </s>)
        self.backend = copy.deepcopy(tokenizer.backend_tokenizer)
        self.backend.no_truncation()
        self.backend.no_padding()
        # item text is text: a post that writes "[SEP]" or "</s>" gets those characters, not the special token
        # (which would end a segment early); the post-processor still adds the real ones around each piece
        self.backend.encode_special_tokens = True

    def _encode(self, texts: Sequence[str]) -> list[Any]:
        return self.backend.encode_batch(list(texts), add_special_tokens=False)

    def _single(self, encoding: Any) -> Unit:
        encoding.truncate(self.max_length - self.backend.num_special_tokens_to_add(False), 0, "right")
        out = self.backend.post_process(encoding, None, add_special_tokens=True)
        return list(out.ids), list(out.type_ids)

    def _pair(self, first: Any, second: Any) -> Unit:
        if not second.ids:  # Scruples encodes an empty text as the title alone
            return self._single(first)
        room = self.max_length - self.backend.num_special_tokens_to_add(True)
        keep_first, keep_second = pair_room(len(first.ids), len(second.ids), room)
        first.truncate(keep_first, 0, "right")
        second.truncate(keep_second, 0, "right")
        out = self.backend.post_process(first, second, add_special_tokens=True)
        return list(out.ids), list(out.type_ids)

    def encode(self, frame: pd.DataFrame) -> list[list[Unit]]:
        """Per item, its encoded sequences: one (title, text) pair, or one per option (in choice order)."""
        if self.head == HEAD_CHOICE:
            columns = [[self._single(e) for e in self._encode(frame[f])] for f in self.task.option_fields]
            return [list(units) for units in zip(*columns, strict=True)]
        firsts, seconds = (self._encode(frame[f]) for f in PAIR_FIELDS)
        return [[self._pair(a, b)] for a, b in zip(firsts, seconds, strict=True)]

    def describe(self, units: list[Unit], tokenizer: Any) -> str:
        """The sequences of one item as the model reads them (special tokens shown)."""
        return "\n".join(tokenizer.decode(ids, skip_special_tokens=False) for ids, _ in units)
