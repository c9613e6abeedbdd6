"""The ``sample``, ``verbal`` and format-following readings of a model behind an OpenAI-compatible endpoint.

The API engine of the readings of :mod:`moralign.readings.sample` and :mod:`moralign.readings.verbal`: the same
prompts, the same parsers and the same frames, with the completions drawn by a server (OpenAI, or a vLLM or
SGLang server in front of local weights and LoRA adapters) instead of :class:`~moralign.readings.sample.Sampler`.

**What is sent.** One chat-completions request per item (more only when the server returns fewer choices than
asked, below), through the predictor's :class:`~moralign.predictors.openai_transport.Transport`: its response
cache, retries, concurrency and Batch API mode. The body holds

* ``messages``: the predictor's own rendering of the item (:meth:`OpenAIPredictor.messages`); for ``verbal`` and
  ``format``, the rendering of :func:`~moralign.readings.verbal.verbal_builder`'s prompt (the instruction after
  the question, no few-shot turns), folded the same way for a model without a system role;
* ``n`` = the draws, ``temperature`` 1, ``top_p`` 1, ``max_tokens`` (the local engine's defaults: 32 for
  ``sample``, :func:`~moralign.readings.verbal.max_json_tokens` for ``verbal``, twice that for ``format``);
* ``seed`` = :func:`request_seed` of (item id, reading, seed), derived with the local engine's
  :func:`~moralign.readings.sample.item_seed`, so a server that honours ``seed`` draws the same completions
  again; ``format`` uses the ``verbal`` seed, as locally (the same prompt and seed, without the constraint);
* for ``verbal`` only, ``response_format`` ``{"type": "json_schema", "json_schema": {"name": "shares",
  "strict": true, "schema": share_schema(answers)}}``; ``format`` is the same request without it. No
  ``logprobs``.

**Fewer choices than ``n``.** Some servers cap ``n`` (some vLLM and SGLang versions and settings) and return
fewer choices than asked. The engine then asks again for the draws still missing, with the seed of the next
round (:func:`request_seed` with ``round_no`` 1, 2, ...), until the item has its N draws. Every round is a
request of its own in the cache, and the rounds a rerun needs are exactly those of the first run (same
responses, same counts), so reruns send nothing. A response always holds at least one choice (the transport
caches nothing else), so an item needs at most N rounds. A server that rejects ``n`` outright (OpenAI's
reasoning models answer HTTP 400) stops the run with the transport's one-line error naming the item. More
choices than asked is a broken server: an error naming the item.

**Invalid draws, never errors.** A choice that ends with ``finish_reason`` ``content_filter``, carries a
``refusal`` (structured outputs' refusal field) or has empty content is an invalid draw with that reason
(``content_filter``, ``refusal``, ``empty``) in ``invalid_reasons`` (``reasons`` for ``format``), counted like
any unparseable draw.

**The frames** are those of the local engine (:func:`~moralign.readings.sample.sample_frame`,
:func:`~moralign.readings.verbal.verbal_frame`, :func:`~moralign.readings.verbal.format_frame`), with
``n_generated`` = the sum of the responses' ``usage.completion_tokens`` (-1 where a response has no usage),
``n_prompt_tokens`` = the first response's ``usage.prompt_tokens`` (-1 without) and ``shortened`` False (the
text is sent whole; the server's context limit applies). Distributions are always parsed anew from the cached
raw responses: a parser version change re-reads the cache and sends nothing.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moralign.errors import DataError
from moralign.predictors.openai import OpenAIPredictor
from moralign.readings.cache import Draw, ItemDraws
from moralign.readings.sample import DEFAULT_DECODING, Decoding, item_seed, sample_frame
from moralign.readings.verbal import format_frame, max_json_tokens, share_schema, verbal_builder, verbal_frame

log = logging.getLogger(__name__)

READINGS = ("sample", "verbal", "format")
# The reading whose seed a request uses: format-following draws the verbal prompt with the verbal seed, as the
# local engine does, so the two differ only by the constraint.
SEED_READING = {"sample": "sample", "verbal": "verbal", "format": "verbal"}
SCHEMA_NAME = "shares"
# Seeds stay below 2**31: every server takes them (some parse a signed 32-bit integer); vLLM gives choice k of a
# request the seed + k, which stays within its 64-bit range.
SEED_MASK = 0x7FFF_FFFF
# With at least this many multi-draw responses all of whose choices are the same text, the server is suspected of
# giving all n choices one seed (see docs/api-models.md).
IDENTICAL_WARN_AT = 5


def request_seed(item_id: str, reading: str, seed: int, round_no: int = 0) -> int:
    """The ``seed`` of an item's request: from (item id, reading, seed) by :func:`item_seed`, then the round.

    Round 0 is the first request; round r > 0 asks for draws a capped server left missing. Pure sha256 and
    NumPy's ``SeedSequence``: the same on every machine and run.
    """
    entropy = item_seed(item_id, SEED_READING.get(reading, reading), seed)
    state = np.random.SeedSequence(entropy, spawn_key=(round_no,)).generate_state(1, np.uint32)[0]
    return int(state) & SEED_MASK


@dataclass(frozen=True)
class ApiReading:
    """One reading to run through an endpoint: which, its draws per item, its seed and its length.

    ``reading`` is ``sample``, ``verbal`` or ``format``; ``max_new_tokens`` None is the local engine's length for
    it. Checked when made, so a bad setting fails before any request is built or sent.
    """

    reading: str
    n_draws: int
    seed: int
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.reading not in READINGS:
            raise ValueError(f"reading must be one of {list(READINGS)}, not {self.reading!r}")
        if self.n_draws < 1:
            raise ValueError(f"n_draws must be at least 1, not {self.n_draws}")

    def decoding(self, answers: Sequence[str]) -> Decoding:
        """The sampling settings: temperature 1, top-p 1, the local engine's default length unless one is set."""
        default = {
            "sample": DEFAULT_DECODING.max_new_tokens,
            "verbal": max_json_tokens(answers),
            "format": 2 * max_json_tokens(answers),
        }[self.reading]
        return Decoding(max_new_tokens=default if self.max_new_tokens is None else self.max_new_tokens)


def request_body(
    predictor: OpenAIPredictor,
    messages: list[dict[str, str]],
    reading: str,
    n: int,
    seed: int,
    decoding: Decoding,
) -> dict[str, Any]:
    """One request of a reading (also its cache key): see the module docstring."""
    body: dict[str, Any] = {
        "model": predictor.settings.api_model,
        "messages": messages,
        "n": n,
        "seed": seed,
        "temperature": decoding.temperature,
        "top_p": decoding.top_p,
        "max_tokens": decoding.max_new_tokens,
    }
    if reading == "verbal":
        schema = share_schema(predictor.builder.answers)
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": schema},
        }
    return body


def reading_messages(predictor: OpenAIPredictor, items: pd.DataFrame, reading: str) -> list[list[dict[str, str]]]:
    """Each item's chat messages for ``reading``, rendered by the predictor itself.

    ``verbal`` and ``format`` render :func:`verbal_builder`'s prompt through a copy of the predictor holding
    that builder, so the messages differ from the predictor's only where the verbal prompt does.
    """
    view = predictor
    if reading != "sample":
        view = copy.copy(predictor)
        view.builder = verbal_builder(predictor.builder)
    return [view.messages(row) for _, row in items.iterrows()]


def draw_of(choice: dict[str, Any]) -> tuple[Draw, str | None]:
    """One choice as a raw draw (no token ids: the API gives none) and the reason it is invalid, if any."""
    message = choice.get("message") or {}
    text = message.get("content") or ""
    finish = choice.get("finish_reason")
    if finish == "content_filter":
        reason = "content_filter"
    elif message.get("refusal"):
        reason = "refusal"
    elif not text.strip():
        reason = "empty"
    else:
        reason = None
    return Draw((), text, finish == "stop"), reason


def reading_requests(predictor: OpenAIPredictor, items: pd.DataFrame, spec: ApiReading) -> list[dict[str, Any]]:
    """The first request of each item, in order: what :func:`read_api` sends first, and what a dry run prices.

    A server that returns fewer choices than ``n`` adds requests for the missing draws (module docstring).
    """
    decoding = spec.decoding(predictor.builder.answers)
    messages = reading_messages(predictor, items, spec.reading)
    return [
        request_body(predictor, m, spec.reading, spec.n_draws, request_seed(str(i), spec.reading, spec.seed), decoding)
        for i, m in zip(items["id"], messages, strict=True)
    ]


def read_api(predictor: OpenAIPredictor, items: pd.DataFrame, spec: ApiReading) -> pd.DataFrame:
    """The ``sample``, ``verbal`` or ``format`` reading of ``items`` through the predictor's endpoint.

    Returns the frame :func:`~moralign.readings.sample.read_sample`,
    :func:`~moralign.readings.verbal.read_verbal` or :func:`~moralign.readings.verbal.read_format_following`
    returns for a local model; the requests and rules are in the module docstring. ``extract.debias`` does not
    apply: like the local engine, a reading draws from the prompt as written.
    """
    reading, n_draws, seed = spec.reading, spec.n_draws, spec.seed
    ids = [str(i) for i in items["id"]]
    bodies = reading_requests(predictor, items, spec)
    draws: list[list[Draw]] = [[] for _ in ids]
    rejected: list[list[str | None]] = [[] for _ in ids]
    generated = [0] * len(ids)
    prompt_tokens = [-1] * len(ids)
    identical = multi = 0
    pending, round_no = list(range(len(ids))), 0
    while pending:
        if round_no:  # the draws a capped server left missing, under the next round's seed
            bodies = [
                {**body, "n": n_draws - len(draws[i]), "seed": request_seed(ids[i], reading, seed, round_no)}
                for i, body in zip(pending, bodies, strict=True)
            ]
        labels = [f"item {ids[i]!r} ({reading} reading, request {round_no + 1})" for i in pending]
        responses = predictor.transport.fetch(bodies, labels)
        for i, body, response in zip(pending, bodies, responses, strict=True):
            choices = sorted(response["choices"], key=lambda c: c.get("index", 0))
            if len(choices) > body["n"]:
                raise DataError(
                    f"model {body['model']!r} at {predictor.settings.base_url}, item {ids[i]!r} ({reading} "
                    f"reading): {len(choices)} choices came back for n = {body['n']}; delete the cached response "
                    f"{predictor.transport.cache.path(predictor.transport.key(body))} and check the server"
                )
            for choice in choices:
                draw, reason = draw_of(choice)
                draws[i].append(draw)
                rejected[i].append(reason)
            usage = response.get("usage") or {}
            tokens = usage.get("completion_tokens")
            generated[i] = -1 if tokens is None or generated[i] < 0 else generated[i] + int(tokens)
            if round_no == 0:
                prompt_tokens[i] = int(usage.get("prompt_tokens", -1))
            if len(choices) > 1:
                multi += 1
                identical += len({(c.get("message") or {}).get("content") for c in choices}) == 1
        kept = [(i, body) for i, body in zip(pending, bodies, strict=True) if len(draws[i]) < n_draws]
        if kept:
            log.info(
                "%s reading: the server returned fewer choices than asked for %d of %d items; asking again for "
                "the missing draws (request %d)",
                reading,
                len(kept),
                len(pending),
                round_no + 2,
            )
        pending, bodies = [i for i, _ in kept], [body for _, body in kept]
        round_no += 1
    if multi >= IDENTICAL_WARN_AT and identical == multi:
        log.warning(
            "%s reading: in all %d responses with several choices, every choice is the same text. A server that "
            "gives all n choices of a seeded request one seed does this (docs/api-models.md); check that the "
            "draws of one request can differ before trusting this reading",
            reading,
            multi,
        )
    drawn = ItemDraws(ids, draws, rejected)
    if reading == "format":
        return format_frame(drawn, predictor.builder.answers)
    frame = (sample_frame if reading == "sample" else verbal_frame)(drawn, predictor.builder.answers)
    frame["n_generated"] = generated
    frame["n_prompt_tokens"] = prompt_tokens
    frame["shortened"] = False
    return frame
