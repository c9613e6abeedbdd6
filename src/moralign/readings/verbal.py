"""The ``verbal`` reading: the distribution a model states when asked for percentages.

The prompt is the item's prompt (:meth:`PromptBuilder.encode`, the same rendering and tokenization as the other
readings) with :data:`INSTRUCTION` appended to the item's question and no few-shot examples (shots show single
answers, the wrong format here). The model answers with a JSON object keyed by the answers, in integer
percentages. K draws per item (default 5) at temperature 1, each decoded under a JSON-schema constraint
(:func:`share_schema`), so every draw is an object of exactly that shape; each is divided by its sum and
``p`` is the mean of those. How far each sum was from 100 is recorded, and draw 0 is kept alone as well (the
single-draw setting of Meister et al., NAACL 2025). The same prompt drawn without the constraint gives the
model's format-following rate (:func:`read_format_following`).

**The constraint library: xgrammar.** It compiles a JSON schema to a grammar and, for each decoding step, gives
a bitmask of the tokens that keep the text inside the grammar, for any Hugging Face tokenizer (byte-level BPE,
SentencePiece-style, tiktoken); its per-sequence ``GrammarMatcher`` fits the per-row sampling loop of
:class:`moralign.readings.sample.Sampler` with no change to it, on CPU as on GPU. It is the structured-output
engine vLLM and SGLang use by default, so a stated distribution read here and one read through an
OpenAI-compatible vLLM server (``response_format`` with the same schema) are constrained by the same grammar
engine. Outlines would do the same job through its own model wrappers; lm-format-enforcer works character by
character in Python, which costs milliseconds per token on a 128k vocabulary.

The constrained output has no free whitespace (separators ``", "`` and ``": "``, as ``json.dumps`` writes), so
its longest possible text is known: ``{"<a1>": 100, ...}``. Every token writes at least one byte, so
:func:`max_json_tokens` new tokens always reach the closing brace and the stop token: a constrained draw is
never cut off.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from moralign.prompts import PromptBuilder
from moralign.readings.cache import ItemDraws, Request, canonical_json
from moralign.readings.parse import VERSIONS, Shares, parse_shares
from moralign.readings.sample import (
    MIN_VALID_SHARE,
    Decoding,
    Reader,
    Sampler,
    generate_cached,
    model_identity,
)

DEFAULT_DRAWS = 5
# Appended to the item's question (``{answers}`` lists them). Braces are doubled when it joins the template,
# which ``str.format`` fills with the item's fields.
INSTRUCTION = (
    "Do not give your own judgment. Among the members of an online community who read this, what percentage "
    "gave each answer? Reply with only a JSON object whose keys are the answers ({answers}) and whose values "
    "are integer percentages that sum to 100."
)
SEPARATORS = (", ", ": ")


def share_schema(answers: Sequence[str]) -> dict[str, Any]:
    """The JSON schema of a stated distribution: every answer a key, each an integer percentage, nothing else."""
    if len(set(answers)) != len(answers):
        raise ValueError(f"answers must be distinct, not {list(answers)}")
    return {
        "type": "object",
        "properties": {a: {"type": "integer", "minimum": 0, "maximum": 100} for a in answers},
        "required": list(answers),
        "additionalProperties": False,
    }


def max_json_tokens(answers: Sequence[str]) -> int:
    """New tokens that always suffice under the constraint: the longest object's UTF-8 bytes, plus the stop token."""
    longest = json.dumps(dict.fromkeys(answers, 100), ensure_ascii=False, separators=SEPARATORS)
    return len(longest.encode()) + 1


def verbal_builder(builder: PromptBuilder) -> PromptBuilder:
    """The item's prompt builder with :data:`INSTRUCTION` after the question and no few-shot examples."""
    listed = ", ".join(json.dumps(a, ensure_ascii=False) for a in builder.answers)
    instruction = INSTRUCTION.format(answers=listed).replace("{", "{{").replace("}", "}}")
    spec = {**builder.spec, "template": f"{builder.spec['template']}\n\n{instruction}", "n_shots": 0}
    return dataclasses.replace(builder, spec=spec, shots=builder.shots.head(0))


def _surface(tokenizer: Any, ids: list[int]) -> list[bytes | None]:
    """Each token's text as the tokenizer writes it after other text (None where it is not whole UTF-8)."""
    anchor = tokenizer("x", add_special_tokens=False)["input_ids"]
    base = tokenizer.decode(anchor)
    texts = tokenizer.batch_decode([[*anchor, i] for i in ids], clean_up_tokenization_spaces=False)
    return [None if "\ufffd" in t or not t.startswith(base) else t[len(base) :].encode() for t in texts]


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> Any:
    """Xgrammar's view of the vocabulary, checked against what the tokenizer itself writes for every token.

    xgrammar guesses how token strings map to bytes (byte-level, byte-fallback "▁" pieces, or raw) from the
    tokenizer's files; a SentencePiece-style vocabulary without byte pieces (the tiny Mistral) is guessed raw,
    which would read "▁" as a character rather than a space. So each vocabulary type is tried, the guess first,
    and the one whose decoded tokens equal the tokenizer's own decoding of every (whole UTF-8) token is used.
    """
    import xgrammar as xgr

    guess = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids))
    encoded = [""] * vocab_size
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size:
            encoded[i] = token
    specials = set(tokenizer.all_special_ids)
    ids = [i for i in range(min(len(tokenizer), vocab_size)) if i not in specials]
    want = _surface(tokenizer, ids)
    order = [guess.vocab_type, *(t for t in xgr.VocabType if t != guess.vocab_type)]
    for vocab_type in order:
        info = xgr.TokenizerInfo(
            encoded,
            vocab_type,
            vocab_size=vocab_size,
            stop_token_ids=list(stop_ids),
            add_prefix_space=guess.add_prefix_space,
        )
        decoded = info.decoded_vocab
        if all(w is None or decoded[i] == w for i, w in zip(ids, want, strict=True)):
            return info
    raise ValueError(
        f"no xgrammar vocabulary type decodes the tokens of {type(tokenizer).__name__} as the tokenizer does; "
        "the constraint cannot be applied to it"
    )


class JsonConstraint:
    """A compiled JSON-schema grammar for one tokenizer; :meth:`matcher` gives a fresh matcher per draw."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int], schema: dict[str, Any]) -> None:
        import xgrammar as xgr

        self.schema = schema
        self.stop_ids = list(stop_ids)
        info = tokenizer_info(tokenizer, vocab_size, stop_ids)
        self.compiled = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=SEPARATORS, strict_mode=True
        )

    def matcher(self) -> Any:
        """A matcher at the start of the grammar; it accepts a stop token only once the object is complete."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compiled, override_stop_tokens=self.stop_ids)

    def describe(self) -> dict[str, Any]:
        """What the constraint is, for the cache key."""
        return {"library": "xgrammar", "json_schema": self.schema, "separators": list(SEPARATORS)}


def _shares(drawn: ItemDraws, answers: Sequence[str]) -> list[list[Shares]]:
    """Each item's draws read by the share rule; a rejected draw is invalid with its reason, unparsed."""
    return drawn.parse(lambda text: parse_shares(text, answers), lambda reason: Shares(None, reason))


def verbal_frame(drawn: ItemDraws, answers: Sequence[str]) -> pd.DataFrame:
    """The ``verbal`` reading's predictions frame, parsed anew from raw completions.

    Columns: ``id``; ``p`` = the mean over valid draws of each draw divided by its sum (NaN where none is
    valid); ``coverage`` = valid share of the draws; ``valid`` (at least 2/3 of the draws valid);
    ``n_valid``, ``n_draws``; ``shares`` and ``sums`` (JSON text: each draw's percentages and their sum, null
    where it did not parse); ``sum_gap`` = mean |sum - 100| over parsed draws; ``p_single`` and
    ``valid_single`` = draw 0 alone; ``invalid_reasons``; ``n_generated``. ``attrs["parser_version"]`` is set.
    A rejected draw (:class:`~moralign.readings.cache.ItemDraws`) is invalid with its reason.
    """
    rows = []
    for item_id, parsed, generated in zip(drawn.ids, _shares(drawn, answers), drawn.generated(), strict=True):
        normed = [np.array(s.values, dtype=float) / s.total for s in parsed if s.valid]
        sums = [s.total for s in parsed]
        gaps = [abs(t - 100) for t in sums if t is not None]
        reasons: dict[str, int] = {}
        for s in parsed:
            if not s.valid:
                reasons[s.reason.split(":")[0]] = reasons.get(s.reason.split(":")[0], 0) + 1
        first = parsed[0]
        nan = np.full(len(answers), np.nan)
        rows.append(
            {
                "id": item_id,
                "p": np.mean(normed, axis=0) if normed else nan,
                "coverage": len(normed) / len(parsed),
                "valid": len(normed) >= MIN_VALID_SHARE * len(parsed),
                "n_valid": len(normed),
                "n_draws": len(parsed),
                "shares": canonical_json([None if s.values is None else list(s.values) for s in parsed]),
                "sums": canonical_json(sums),
                "sum_gap": float(np.mean(gaps)) if gaps else np.nan,
                "p_single": np.array(first.values, dtype=float) / first.total if first.valid else nan,
                "valid_single": first.valid,
                "invalid_reasons": canonical_json(reasons),
                "n_generated": generated,
            }
        )
    frame = pd.DataFrame(rows)
    frame.attrs["parser_version"] = VERSIONS["verbal"]
    return frame


def _requests(
    reader: Reader,
    items: pd.DataFrame,
    n_draws: int,
    seed: int,
    decoding: Decoding,
    constraint: JsonConstraint | None,
) -> tuple[list[str], list[Any], list[Request]]:
    verbal = verbal_builder(reader.builder)
    encoded = [verbal.encode(reader.tokenizer, row, reader.max_length) for _, row in items.iterrows()]
    ids = [str(i) for i in items["id"]]
    model = model_identity(reader.sampler, reader.identity)
    described = None if constraint is None else constraint.describe()
    requests = [
        Request(model, item_id, tuple(e.ids), "verbal", n_draws, seed, decoding.describe(), described)
        for item_id, e in zip(ids, encoded, strict=True)
    ]
    return ids, encoded, requests


def read_verbal(
    reader: Reader,
    items: pd.DataFrame,
    *,
    n_draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    temperature: float = 1.0,
) -> pd.DataFrame:
    """The ``verbal`` reading of ``items``: ``n_draws`` constrained JSON draws per item (:func:`verbal_frame`).

    ``reader.identity`` names the model (base weights, adapter hash) for the cache key. The frame adds
    ``n_prompt_tokens`` and ``shortened``.
    """
    sampler, answers = reader.sampler, reader.builder.answers
    constraint = JsonConstraint(
        reader.tokenizer, _vocab_size(sampler), sampler.stop_ids.tolist(), share_schema(answers)
    )
    decoding = Decoding(max_new_tokens=max_json_tokens(answers), temperature=temperature)
    ids, encoded, requests = _requests(reader, items, n_draws, seed, decoding, constraint)
    matchers = lambda _: lambda _k: constraint.matcher()  # noqa: E731  (one fresh matcher per draw)
    draws = generate_cached(sampler, reader.tokenizer, requests, decoding, reader.cache, matchers)
    frame = verbal_frame(ItemDraws(ids, draws), answers)
    frame["n_prompt_tokens"] = [len(e.ids) for e in encoded]
    frame["shortened"] = [e.shortened for e in encoded]
    return frame


def read_format_following(
    reader: Reader,
    items: pd.DataFrame,
    *,
    n_draws: int = 1,
    seed: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
) -> pd.DataFrame:
    """The same prompts drawn WITHOUT the constraint: per item, how many draws parse as the JSON asked for.

    A draw follows the format when :func:`moralign.readings.parse.parse_shares` reads it (an object of exactly
    the answers with integer percentages; a Markdown code fence around it is tolerated; an all-zero object
    counts as following the format). ``max_new_tokens`` defaults to twice :func:`max_json_tokens`, room for a
    fence. Columns: ``id``, ``n_draws``, ``n_follow``, ``reasons`` (JSON text); :func:`format_following_rate`
    sums them.
    """
    builder = reader.builder
    decoding = Decoding(max_new_tokens=max_new_tokens or 2 * max_json_tokens(builder.answers), temperature=temperature)
    ids, _, requests = _requests(reader, items, n_draws, seed, decoding, None)
    draws = generate_cached(reader.sampler, reader.tokenizer, requests, decoding, reader.cache)
    return format_frame(ItemDraws(ids, draws), builder.answers)


def format_frame(drawn: ItemDraws, answers: Sequence[str]) -> pd.DataFrame:
    """The format-following frame of unconstrained draws (:func:`read_format_following`), parsed anew.

    A rejected draw (:class:`~moralign.readings.cache.ItemDraws`) does not follow the format, with its reason.
    """
    rows = []
    for item_id, parsed in zip(drawn.ids, _shares(drawn, answers), strict=True):
        reasons: dict[str, int] = {}
        for s in parsed:
            if s.values is None:
                reasons[s.reason.split(":")[0]] = reasons.get(s.reason.split(":")[0], 0) + 1
        follow = sum(s.values is not None for s in parsed)
        rows.append({"id": item_id, "n_draws": len(parsed), "n_follow": follow, "reasons": canonical_json(reasons)})
    frame = pd.DataFrame(rows)
    frame.attrs["parser_version"] = VERSIONS["verbal"]
    return frame


def format_following_rate(frame: pd.DataFrame) -> float | None:
    """Share of all unconstrained draws that follow the format (None without draws)."""
    draws = int(frame["n_draws"].sum())
    return int(frame["n_follow"].sum()) / draws if draws else None


def _vocab_size(sampler: Sampler) -> int:
    """The width of the model's logits (may exceed the tokenizer's vocabulary: padded output heads)."""
    return int(sampler.model.get_output_embeddings().weight.shape[0])
