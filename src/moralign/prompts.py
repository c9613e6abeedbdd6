"""Prompts: a variant is data (config), rendering and tokenizing are here, in one place.

A prompt = optional system text + k few-shot examples (one fixed, seeded draw from train, each shown with its
majority answer) + the item + the question. Instruct models get their own chat template with the generation
prompt appended; ``chat_template: false`` feeds raw text ending in the variant's ``answer_prefix``. Every item
shares the same shots, so every prompt of a run shares one long prefix (which extraction computes once).

:meth:`PromptBuilder.encode` is THE function that turns an item into token ids: extraction and both fine-tuning
recipes call it, so a model is trained on exactly the ids it is scored on. Its conventions:

* BOS: the prompt starts with exactly one BOS whenever the tokenizer adds one by default (``add_bos_token``, or
  whatever a fast tokenizer's post-processor prepends), whatever the chat template emits. Llama 3.1's and
  Mistral v0.3's templates write it themselves; Zephyr's does not (Zephyr was trained with the tokenizer adding
  it). The text is tokenized with ``add_special_tokens=False`` (special tokens in the text are parsed, nothing
  is appended: an EOS after the question would be wrong) and the one BOS is then ensured.
* Length: a prompt over ``max_length`` tokens is shortened INSIDE the template: the item's longest field (the
  anecdote's ``text``) is cut token-wise from its end and marked with ``TRUNCATION_MARK`` until the whole
  prompt fits (should that field reach the length of the next longest, both are cut alike). Chat markup, system
  text, few-shot examples and the question are never touched. The end goes first because a post's opening sets
  out the situation and its title (kept) states the question, while its end is where edits and updates
  accumulate; the mark tells the model the text was cut.
* Message text is plain text: a special token's string inside a message (an anecdote quoting ``</s>``,
  ``<|eot_id|>`` or ``[INST]``; likewise in shots, system text and answers) is tokenized as the characters it is,
  so no post can close its turn or open a new one. Only the markup the chat template writes becomes special
  tokens. Raw text has no markup: all of it is plain. The tokenization that keeps it so is
  :mod:`moralign.plain_text`.
* Dates: Llama 3.x templates print a "Today Date" line; ``date_string`` is pinned (``TEMPLATE_KWARGS``), so a
  prompt never changes with the calendar (Llama 3.2's template would otherwise fill in today's date).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from moralign.config import Config, digest
from moralign.data import TASKS, Task
from moralign.plain_text import (
    Spans,
    adds_bos,
    encode_text,
    encode_without_bos,
    mark_specials,
    special_spans,
    specials_pattern,
    unmark_specials,
)

# The default raw-text answer cue (``prompts.<dataset>.answer_prefix``); the answer follows after one space.
RAW_ANSWER_PREFIX = "Answer:"
# Extra variables for chat templates. Llama 3.1's template defaults to this date; pinning it keeps every
# Llama 3.x template's output independent of the day the prompt is rendered.
TEMPLATE_KWARGS: dict[str, str] = {"date_string": "26 Jul 2024"}
# Appended to an item field that was cut to fit ``max_length``.
TRUNCATION_MARK = " [...]"


def select_shots(train: pd.DataFrame, n_shots: int, seed: int) -> pd.DataFrame:
    """``n_shots`` + 1 seeded train items with a clear majority (the spare replaces an item drawn as its own shot)."""
    if n_shots == 0:
        return train.head(0)
    pool = train[~train["tie"]]
    if len(pool) <= n_shots:
        raise ValueError(f"train has only {len(pool)} untied items; cannot draw {n_shots} shots")
    order = np.random.default_rng(seed).permutation(len(pool))[: n_shots + 1]
    return pool.iloc[order].reset_index(drop=True)


def field_text(value: Any) -> str:
    """An item field as prompt text: a missing value (None, NaN; e.g. an anecdote without an action) is empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


@dataclass(frozen=True)
class Rendered:
    """Rendered text and where message text in it holds special tokens' strings (``encode_text``'s ``plain``)."""

    text: str
    plain: Spans = ()


@dataclass(frozen=True)
class EncodedPrompt:
    """A rendered, tokenized prompt; ``fields`` are the item's field texts as rendered (after any shortening).

    ``plain``: the spans of ``text`` tokenized as plain text (``encode_text``); ids = ``encode_text(tokenizer,
    text, plain)``.
    """

    ids: list[int]
    text: str
    shortened: bool
    fields: dict[str, str]
    plain: Spans = ()


@dataclass(frozen=True)
class PromptBuilder:
    """Renders and tokenizes the prompt of any item of one (dataset, model) pair."""

    task: Task
    spec: dict[str, Any]
    chat: bool
    system_role: bool = True
    shots: pd.DataFrame = field(default_factory=pd.DataFrame)

    @classmethod
    def from_config(cls, cfg: Config, model: str, dataset: str, train: pd.DataFrame) -> PromptBuilder:
        """The builder of one (model, dataset) pair: its prompt variant, its model's chat settings, shots from train."""
        spec, mcfg = cfg.prompt(dataset), cfg.model(model)
        return cls(
            task=TASKS[dataset],
            spec=spec,
            chat=mcfg["chat_template"],
            system_role=mcfg["system_role"],
            shots=select_shots(train, spec["n_shots"], spec["shot_seed"]),
        )

    @property
    def answers(self) -> list[str]:
        """One answer string per choice, in the task's choice order."""
        return list(self.spec["answers"])

    @property
    def answer_prefix(self) -> str:
        """The raw-text cue the answer follows (``chat_template: false`` only)."""
        return self.spec.get("answer_prefix", RAW_ANSWER_PREFIX)

    @property
    def template_fields(self) -> list[str]:
        """The task fields the template uses, in the order they appear."""
        names = [name for _, name, _, _ in string.Formatter().parse(self.spec["template"]) if name]
        return [f for f in dict.fromkeys(names) if f in self.task.fields]

    def item_fields(self, row: dict[str, Any] | pd.Series) -> dict[str, str]:
        """The item's task fields as text (a field the row lacks or leaves empty renders as "")."""
        return {f: field_text(row.get(f)) for f in self.task.fields}

    def item_text(self, row: dict[str, Any] | pd.Series, fields: dict[str, str] | None = None) -> str:
        """The item and its question, from the template."""
        values = self.item_fields(row) if fields is None else fields
        try:
            return self.spec["template"].format(**values)
        except KeyError as err:
            raise ValueError(
                f"prompts.{self.task.name}.template uses {{{err.args[0]}}}; available fields: {list(self.task.fields)}"
            ) from err

    def _shots_for(self, item_id: str) -> list[tuple[str, str]]:
        n = int(self.spec.get("n_shots", 0))
        chosen = [s for _, s in self.shots.iterrows() if s["id"] != item_id][:n]
        return [(self.item_text(s), self.answers[int(s["majority"])]) for s in chosen]

    def messages(self, row: dict[str, Any] | pd.Series, fields: dict[str, str] | None = None) -> list[dict[str, str]]:
        """Chat messages: system (if any), shots as user/assistant turns, then the item."""
        msgs: list[dict[str, str]] = []
        if self.spec.get("system"):
            msgs.append({"role": "system", "content": self.spec["system"]})
        for text, answer in self._shots_for(row["id"]):
            msgs += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        msgs.append({"role": "user", "content": self.item_text(row, fields)})
        return msgs

    def rendered(
        self,
        tokenizer: Any,
        row: dict[str, Any] | pd.Series,
        fields: dict[str, str] | None = None,
        answer: str | None = None,
    ) -> Rendered:
        """The prompt text and the spans where message text holds special tokens' strings (to be tokenized plain).

        The answer is the next token; with ``answer``, the text is the whole conversation including it.

        Chat: those strings are found in the messages and marked (:func:`moralign.plain_text.mark_specials`) while
        the template renders, so a template that trims or moves message text (Llama's trims it; Mistral's moves the
        system text into the last user turn) still tells where they land. The marked rendering, marks removed, must
        equal the plain one; a template that changes such text is an error naming the item.
        """
        pattern = specials_pattern(tokenizer) if tokenizer is not None else None
        if not self.chat:
            prefix = self.answer_prefix
            cue = (lambda text: f"{text}\n{prefix}") if prefix else (lambda text: text)
            parts = [self.spec["system"]] if self.spec.get("system") else []
            parts += [f"{cue(text)} {shot}" for text, shot in self._shots_for(row["id"])]
            parts.append(cue(self.item_text(row, fields)))
            prompt = "\n\n".join(parts)
            text = prompt if answer is None else f"{prompt} {answer}"
            return Rendered(text, special_spans(tokenizer, text) if pattern else ())  # no markup: all of it is plain
        msgs = self.messages(row, fields)
        if not self.system_role:
            msgs = fold_system(msgs)
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        text = self._apply_template(tokenizer, row, msgs, answer is None)
        if pattern is None or not any(pattern.search(m["content"]) for m in msgs):
            return Rendered(text)
        marked = [{**m, "content": mark_specials(pattern, m["content"])} for m in msgs]
        unmarked, plain = unmark_specials(self._apply_template(tokenizer, row, marked, answer is None))
        if unmarked != text:
            found = sorted({m.group(0) for msg in msgs for m in pattern.finditer(msg["content"])})
            raise ValueError(
                f"item {row['id']}: its messages hold special tokens' strings {found}, and the chat template writes "
                "them differently once they are marked, so they cannot be told apart from the template's markup"
            )
        return Rendered(text, plain)

    def _apply_template(
        self, tokenizer: Any, row: dict[str, Any] | pd.Series, msgs: list[dict[str, str]], prompt: bool
    ) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=prompt, tokenize=False, **TEMPLATE_KWARGS)
        except jinja2.TemplateError as err:
            hint = (
                " (set system_role: false in its model entry if it rejects a system turn)" if self.system_role else ""
            )
            raise ValueError(f"the chat template failed on item {row['id']}{hint}: {err}") from err

    def conversation(self, tokenizer: Any, row: dict[str, Any] | pd.Series, fields: dict[str, str], answer: str) -> str:
        """The whole conversation: the prompt as scored, followed by the answer turn as the chat template writes it.

        The answer turn is what the chat template renders after the item's (last) user message once the assistant's
        answer is added, less what it renders there as the generation prompt. It is appended to the prompt as
        scored rather than taken from a fresh rendering because a template may render earlier turns differently
        once the conversation ends with an assistant turn: Mistral v0.3's puts the system text into the last user
        turn only while that turn is the last message, so its rendering of the answered conversation has no system
        text at all. Raw text: the prompt, a space, the answer.
        """
        return self._conversation(tokenizer, row, fields, answer).text

    def encode_conversation(
        self, tokenizer: Any, row: dict[str, Any] | pd.Series, prompt: EncodedPrompt, answer: str
    ) -> list[int]:
        """Token ids of the whole conversation (:meth:`conversation`) after ``prompt``, encoded like every prompt."""
        whole = self._conversation(tokenizer, row, prompt.fields, answer)
        return encode_text(tokenizer, whole.text, whole.plain)

    def _conversation(
        self, tokenizer: Any, row: dict[str, Any] | pd.Series, fields: dict[str, str], answer: str
    ) -> Rendered:
        prompt = self.rendered(tokenizer, row, fields)
        if not self.chat:
            tail = f" {answer}"
            return Rendered(prompt.text + tail, prompt.plain + special_spans(tokenizer, tail, len(prompt.text)))
        answered = self.rendered(tokenizer, row, fields, answer=answer)
        last = self.item_text(row, fields).strip()
        if last not in prompt.text or last not in answered.text:
            raise ValueError(f"item {row['id']}: the chat template does not write the item's text verbatim")
        cue = prompt.text[prompt.text.rindex(last) + len(last) :]
        at = answered.text.rindex(last) + len(last)
        turn = answered.text[at:]
        if not turn.startswith(cue):
            raise ValueError(
                f"item {row['id']}: after the item, the template writes {turn!r} once answered {answer!r} but {cue!r} "
                "as the generation prompt; the answer turn cannot be placed after the prompt"
            )
        at += len(cue)  # where the answer turn starts in the answered rendering, and in the conversation:
        shift = len(prompt.text) - at
        plain = prompt.plain + tuple((a + shift, b + shift) for a, b in answered.plain if a >= at)
        return Rendered(prompt.text + answered.text[at:], plain)

    def encode(self, tokenizer: Any, row: dict[str, Any] | pd.Series, max_length: int | None = None) -> EncodedPrompt:
        """Render and tokenize the item's prompt; over ``max_length`` tokens, its longest field is shortened.

        See the module docstring for the BOS, plain-text and shortening rules. When cutting the longest field to the
        length of the next one is not enough, both are cut to the same length, and so on (an anecdote's title is
        touched only once its story is down to the title's length; a dilemma's two actions end up equally long).
        Raises ``ValueError`` when the prompt does not fit even with every item field emptied.
        """
        fields = self.item_fields(row)
        prompt = self.rendered(tokenizer, row, fields)
        ids = encode_text(tokenizer, prompt.text, prompt.plain)
        if max_length is None or len(ids) <= max_length:
            return EncodedPrompt(ids, prompt.text, False, fields, prompt.plain)
        pieces = {
            f: encode_without_bos(tokenizer, fields[f], special_spans(tokenizer, fields[f]))
            for f in self.template_fields
        }
        mark = len(tokenizer(TRUNCATION_MARK, add_special_tokens=False)["input_ids"])
        cap = max((len(p) for p in pieces.values()), default=0)
        while cap > 0:
            # the largest cap on every field's length that removes at least the excess tokens, marks included
            excess = len(ids) - max_length
            while cap > 0 and sum(len(p) - cap - mark for p in pieces.values() if len(p) > cap) < excess:
                cap -= 1
            cut = {
                f: tokenizer.decode(p[:cap], skip_special_tokens=True, clean_up_tokenization_spaces=False).rstrip()
                + TRUNCATION_MARK
                for f, p in pieces.items()
                if len(p) > cap
            }
            prompt = self.rendered(tokenizer, row, {**fields, **cut})
            ids = encode_text(tokenizer, prompt.text, prompt.plain)
            if len(ids) <= max_length:
                return EncodedPrompt(ids, prompt.text, True, {**fields, **cut}, prompt.plain)
            pieces = {f: p[:cap] if f in cut else p for f, p in pieces.items()}
        raise ValueError(
            f"{self.task.name} item {row['id']}: the prompt does not fit in max_length={max_length} tokens even with "
            f"its {self.template_fields} cut to nothing (system text, shots and template alone are too long); "
            "raise max_length"
        )

    def fingerprint(self, tokenizer: Any) -> str:
        """Hash of everything that shapes a prompt: variant, chat template, shots, BOS and plain-text rules."""
        return digest(
            {
                "spec": self.spec,
                "chat": self.chat,
                "system_role": self.system_role,
                "chat_template": getattr(tokenizer, "chat_template", None) if self.chat else None,
                "template_kwargs": TEMPLATE_KWARGS if self.chat else None,
                "adds_bos": adds_bos(tokenizer) if tokenizer is not None else None,  # API models: no tokenizer
                "shots": list(self.shots["id"]) if len(self.shots) else [],
                # message text tokenized as plain text (special tokens' strings in it are not special tokens)
                **({"message_text": "plain"} if tokenizer is not None else {}),
            }
        )


def fold_system(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    """Move a leading system message into the first user turn (for templates that reject a system turn)."""
    if not msgs or msgs[0]["role"] != "system":
        return msgs
    system, rest = msgs[0]["content"], [dict(m) for m in msgs[1:]]
    rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


def swap_options(row: pd.Series, task: Task) -> pd.Series:
    """The same item with its two options in the other order (for ``debias: swap``)."""
    if task.option_fields is None:
        raise ValueError(f"{task.name}: items present no options to swap")
    a, b = task.option_fields
    swapped = row.copy()
    swapped[a], swapped[b] = row[b], row[a]
    return swapped
