"""OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, llama.cpp, SGLang, TGI) as a predictor.

One request per item (two with ``extract.debias: swap``): the chat messages the local path renders with its chat
template (moralign.prompts.PromptBuilder.messages: system, few-shot turns, the item), with ``logprobs: true`` and
``top_logprobs`` (20, the API's maximum). The server applies its own chat template. Responses come from a cache
first (moralign.predictors.openai_transport), so reruns are free and interrupted runs resume.

From the top-k log-probabilities to a distribution over the answers (:func:`answer_distribution`):

* position: the first generated position whose candidates hold any answer (models sometimes emit ``**`` or a space
  first); recorded per item as ``answer_position`` (-1 when no position holds one; the first position with
  candidates is then read, every answer censored);
* variants: every candidate whose text matches an answer by the local path's rule (moralign.extraction._matches:
  surrounding whitespace ignored; case ignored except for one-letter answers, where "a" is mostly an article)
  adds its probability to that answer; ``logp_choice`` is the log of that observed mass;
* coverage: the summed probability of the matched candidates (the captured mass of valid answers);
* censoring: an answer with no candidate among the top k is not impossible: its probability is at most the
  smallest probability returned at that position, ``logp_bound``. ``logp_choice`` keeps -inf for it (nothing was
  observed) and ``p`` gives it the configured treatment before renormalising over the answers: ``bound`` (default,
  the bound itself: the least confident reading the data allow) or ``half_bound`` (the middle of [0, bound]).
  Either way no item gets p = 0 and an infinite cross-entropy. ``censored`` lists which answers were censored.
  With ``extract.debias: swap`` these columns combine the two prompt orders (``logp_bound`` is the first order's),
  and ``logp_choice_by_order``, ``censored_by_order``, ``logp_bound_by_order`` keep each order's own, in the
  task's choice order: moralign.censoring re-derives p from them under other treatments;
* the API's ``-9999`` ("not among the top 20") counts as absent, positions with empty ``top_logprobs`` are
  skipped, and a refusal or a response with no candidates at all gets coverage 0, a uniform ``p`` and a
  ``status`` that says so (``ok``, ``no_answer``, ``refusal``, ``no_logprobs``).

Each request's messages carry the item text as the content of one user message, exactly as written: a post that
contains ``</s>``, ``<|eot_id|>`` or ``[INST]`` cannot open or close a turn at this end (turns are the structure of
the JSON messages array, never markup in a string). How the server tokenizes that string is the server's choice:
a self-hosted one that renders its chat template to one string and tokenizes it with special tokens parsed (a
common default) reads such strings as control tokens, and no request field of the chat API can forbid it.

The cost estimate (:meth:`OpenAIPredictor.plan`) counts prompt tokens exactly with tiktoken when its encoding file
is at hand (:func:`token_counter`), and says whether the count is exact or approximate.

``summary.json`` reports per split the share of items with a censored answer and with coverage below
``coverage_threshold``, the positions used, and the ``model`` and ``system_fingerprint`` values the server
returned (an alias such as ``gpt-4o`` resolves to a snapshot that can change; the config warns about it).
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moralign.config import Config
from moralign.extraction import _matches
from moralign.io import environment
from moralign.predictors import CellInputs, Predictor
from moralign.predictors.openai_transport import ENDPOINT, RequestLimitError, ResponseCache, Transport
from moralign.prompts import PromptBuilder, fold_system, swap_options

log = logging.getLogger(__name__)

# The API reports -9999.0 for a token "very unlikely" (outside the top 20): no information, not a value.
NOT_RETURNED = -9999.0
# The choices of models.*.openai.censored: log(fraction of the bound), added to logp_bound. moralign.censoring
# holds the same two and more (a test keeps them equal; importing it here would make every API extraction
# depend on the scoring code).
CENSORED_TREATMENTS = {"bound": 0.0, "half_bound": math.log(0.5)}
MATCH_RULE = "candidate text with surrounding whitespace stripped equals the answer; case-insensitive unless one letter"
DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$|-\d{4}$")  # gpt-4o-2024-08-06, gpt-4-0613


@dataclass(frozen=True)
class OpenAISettings:
    """A model's ``openai`` block (config.schema.yaml documents each key and holds every default)."""

    api_model: str
    base_url: str
    api_key_env: str | None
    temperature: float
    seed: int | None
    max_tokens: int
    top_logprobs: int
    concurrency: int
    max_retries: int
    timeout_s: float
    mode: str
    batch_poll_s: float
    max_requests: int | None
    prices: dict[str, Any]  # input, output (USD per million tokens or None), batch_factor
    censored: str
    coverage_threshold: float

    def __post_init__(self) -> None:
        if self.censored not in CENSORED_TREATMENTS:
            raise ValueError(f"censored must be one of {sorted(CENSORED_TREATMENTS)}, not {self.censored!r}")
        if self.mode not in ("sync", "batch"):
            raise ValueError(f"mode must be sync or batch, not {self.mode!r}")

    def body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """The request body of one prompt (also what its cache key is computed from)."""
        body: dict[str, Any] = {
            "model": self.api_model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        return body


@dataclass(frozen=True)
class AnswerDistribution:
    """One response read as a distribution over the answers (see the module docstring)."""

    logp_choice: np.ndarray  # observed log-mass per answer; -inf where censored
    p: np.ndarray  # the distribution after the censoring treatment
    coverage: float
    position: int  # generated position read; -1 when none held an answer
    logp_bound: float  # log of the smallest returned probability there (the censoring bound); nan without one
    censored: np.ndarray  # bool per answer
    status: str


def _candidates(entry: Mapping[str, Any]) -> list[tuple[str, float]]:
    return [
        (c["token"], float(c["logprob"]))
        for c in entry.get("top_logprobs") or []
        if c.get("logprob") is not None and float(c["logprob"]) > NOT_RETURNED
    ]


def answer_distribution(
    response: Mapping[str, Any], answers: Sequence[str], treatment: str = "bound"
) -> AnswerDistribution:
    """Read one chat completion (raw JSON) as a distribution over ``answers``; the rules are in the module docstring."""
    k = len(answers)
    choice = response["choices"][0]
    logprobs = choice.get("logprobs") or {}
    positions = [_candidates(entry) for entry in logprobs.get("content") or []]
    informative = [i for i, cands in enumerate(positions) if cands]
    refused = bool((choice.get("message") or {}).get("refusal")) or bool(logprobs.get("refusal"))
    if not informative:
        status = "refusal" if refused else "no_logprobs"
        return AnswerDistribution(np.full(k, -np.inf), np.full(k, 1.0 / k), 0.0, -1, math.nan, np.ones(k, bool), status)

    def matched(cands: list[tuple[str, float]]) -> list[list[float]]:
        return [[lp for token, lp in cands if _matches(token, answer)] for answer in answers]

    position = next((i for i in informative if any(matched(positions[i]))), -1)
    cands = positions[position if position >= 0 else informative[0]]
    found = matched(cands)
    logp_choice = np.array([np.logaddexp.reduce(v) if v else -np.inf for v in found])
    censored = np.array([not v for v in found])
    logp_bound = min(lp for _, lp in cands)
    treated = np.where(censored, logp_bound + CENSORED_TREATMENTS[treatment], logp_choice)
    p = np.exp(treated - np.logaddexp.reduce(treated))
    coverage = float(np.exp(logp_choice).sum())
    status = "ok" if position >= 0 else ("refusal" if refused else "no_answer")
    return AnswerDistribution(logp_choice, p, coverage, position, logp_bound, censored, status)


def tiktoken_cache() -> str:
    """Where tiktoken keeps its encoding files: ``TIKTOKEN_CACHE_DIR`` if set, else its own default folders."""
    for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if name in os.environ:
            return f"{name}={os.environ[name]}"
    return f"tiktoken's default cache {Path(tempfile.gettempdir()) / 'data-gym-cache'} (TIKTOKEN_CACHE_DIR unset)"


def fetch_command(encoding: str) -> str:
    """The one command that puts ``encoding`` into a cache folder, to run where there is internet (a login node)."""
    return f"TIKTOKEN_CACHE_DIR=<folder> python -c \"import tiktoken; tiktoken.get_encoding('{encoding}')\""


def token_counter(api_model: str) -> tuple[Callable[[str], int], str]:
    """A prompt-token counter for the model and how exact it is: a description starting "exact" or "approximate".

    tiktoken reads its encoding file (``o200k_base`` for GPT-4o, 3.6 MB) from ``TIKTOKEN_CACHE_DIR`` when that is
    set and holds it, and otherwise downloads it. A cluster without internet fills the folder once, where there is
    internet, with :func:`fetch_command`, and sets ``TIKTOKEN_CACHE_DIR`` to it on the compute nodes. Without the file
    the count falls back to UTF-8 bytes / 4, and says so, with the command.
    """
    import tiktoken

    try:
        name, known = tiktoken.encoding_name_for_model(api_model), True
    except KeyError:
        name, known = "o200k_base", False
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception as err:
        return (lambda text: math.ceil(len(text.encode()) / 4)), (
            f"approximate: UTF-8 bytes / 4 (tiktoken's {name} file is not in {tiktoken_cache()} and could not be "
            f"downloaded: {type(err).__name__}; fetch it once where there is internet: {fetch_command(name)})"
        )
    how = f"tiktoken {name}, file from {tiktoken_cache()}"
    # a model tiktoken does not know (a self-hosted one) has its own tokenizer: o200k_base only approximates it
    how = f"exact: {how}" if known else f"approximate: {how} (tiktoken does not know {api_model!r})"
    return (lambda text: len(encoding.encode(text, disallowed_special=()))), how


def chat_tokens(messages: list[dict[str, str]], count: Callable[[str], int]) -> int:
    """Prompt tokens of a chat request as OpenAI counts them: 3 per message + role + content, 3 to prime the reply."""
    return 3 + sum(3 + count(m["role"]) + count(m["content"]) for m in messages)


class OpenAIPredictor(Predictor):
    """Answer distributions from an OpenAI-compatible endpoint; see the module docstring."""

    def __init__(
        self, settings: OpenAISettings, builder: PromptBuilder, transport: Transport, debias: str = "none"
    ) -> None:
        if debias == "swap" and builder.task.option_fields is None:
            raise ValueError(
                f"extract.debias: swap needs a task whose prompt shows its options in order; "
                f"{builder.task.name} has none"
            )
        self.settings = settings
        self.builder = builder
        self.transport = transport
        self.debias = debias
        self._refusal: str | None = None  # set by plan() when the run would exceed max_requests
        self._prefetch: list[dict[str, Any]] = []  # batch mode: every uncached request of the plan, sent at once
        template = settings.body([])
        del template["messages"]
        self.provenance: dict[str, Any] = {
            "backend": "openai",
            "api_model": settings.api_model,
            "base_url": settings.base_url,
            "endpoint": ENDPOINT,
            "request": template,
            "template_hash": builder.fingerprint(None),
            "answers": {"answers": builder.answers, "match": MATCH_RULE},
            "censored": settings.censored,
            "coverage_threshold": settings.coverage_threshold,
            "debias": debias,
        }

    def messages(self, row: pd.Series) -> list[dict[str, str]]:
        """The chat messages of one item (system text folded into the first turn where the model takes none)."""
        msgs = self.builder.messages(row)
        return msgs if self.builder.system_role else fold_system(msgs)

    def bodies(self, items: pd.DataFrame) -> list[dict[str, Any]]:
        """Request bodies of ``items`` in order; with swap-debiasing, then those of the swapped items."""
        rows = [row for _, row in items.iterrows()]
        if self.debias == "swap":
            rows += [swap_options(row, self.builder.task) for row in rows]
        return [self.settings.body(self.messages(row)) for row in rows]

    def plan(self, splits: Mapping[str, pd.DataFrame]) -> dict[str, Any]:
        """Requests, cached responses, estimated prompt tokens and cost; marks the run refused over max_requests."""
        s = self.settings
        count, how = token_counter(s.api_model)
        requests, seen, uncached, tokens_all, tokens_send = {}, set(), [], 0, 0
        for split, frame in splits.items():
            bodies = self.bodies(frame)
            requests[split] = len(bodies)
            for body in bodies:
                key = self.transport.key(body)
                if key in seen:
                    continue
                seen.add(key)
                n = chat_tokens(body["messages"], count)
                tokens_all += n
                if key not in self.transport.cache:
                    uncached.append(body)
                    tokens_send += n
        to_send = len(uncached)
        factor = s.prices["batch_factor"] if s.mode == "batch" else 1.0
        price_in, price_out = s.prices["input"], s.prices["output"]
        cost = None
        if price_in is not None and price_out is not None:
            cost = round(factor * (tokens_send * price_in + to_send * s.max_tokens * price_out) / 1e6, 4)
        within = s.max_requests is None or to_send <= s.max_requests
        plan = {
            "backend": "openai",
            "api_model": s.api_model,
            "base_url": s.base_url,
            "mode": s.mode,
            "requests": requests,
            "distinct_requests": len(seen),
            "cached": len(seen) - to_send,
            "to_send": to_send,
            "prompt_tokens_estimate": {"all": tokens_all, "to_send": tokens_send},
            "max_output_tokens": to_send * s.max_tokens,
            "token_counter": how,
            "prompt_tokens_exact": how.startswith("exact"),
            "prices_usd_per_million_tokens": {"input": price_in, "output": price_out, "factor": factor},
            "cost_usd_estimate": cost,
            "max_requests": s.max_requests,
            "within_max_requests": within,
        }
        if cost is None:
            log.warning("models.*.openai.prices has no input/output price: no cost estimate")
        self._refusal = None
        # batch mode submits the whole run as one batch (not one per shard, each waiting its turn)
        self._prefetch = uncached if s.mode == "batch" else []
        if not within:
            self._refusal = (
                f"this run would send {to_send} requests to {s.base_url}, more than openai.max_requests = "
                f"{s.max_requests}; raise max_requests or lower extract.max_items (nothing was sent)"
            )
        return plan

    def predict(self, items: pd.DataFrame) -> pd.DataFrame:
        """See :meth:`Predictor.predict`; the extra columns are described in the module docstring."""
        if self._refusal:
            raise RequestLimitError(self._refusal)
        if self._prefetch:
            self.transport.fetch(self._prefetch)
            self._prefetch = []
        labels = [f"item {i!r}" for i in items["id"]]
        if self.debias == "swap":
            labels += [f"{label} (options swapped)" for label in labels]
        responses = self.transport.fetch(self.bodies(items), labels)
        n = len(items)
        parsed = [answer_distribution(r, self.builder.answers, self.settings.censored) for r in responses]
        first = parsed[:n]
        if all(a.status == "no_logprobs" for a in first) and n:
            raise RuntimeError(
                f"{self.settings.base_url} returned no log-probabilities for any of {n} items; does the server "
                f"support logprobs/top_logprobs for {self.settings.api_model!r}?"
            )
        logp = np.stack([a.logp_choice for a in first])
        p = np.stack([a.p for a in first])
        coverage = np.array([a.coverage for a in first])
        censored = np.stack([a.censored for a in first])
        by_order: dict[str, list[Any]] = {}
        if self.debias == "swap":
            # the swapped prompt lists the options in the other order: flip its answers back, average the orders
            second = parsed[n:]
            logp = np.logaddexp(logp, np.stack([a.logp_choice[::-1] for a in second])) - np.log(2.0)
            p = 0.5 * (p + np.stack([a.p[::-1] for a in second]))
            coverage = 0.5 * (coverage + np.array([a.coverage for a in second]))
            censored = censored | np.stack([a.censored[::-1] for a in second])
            # each order's observed masses and bound, in the task's choice order: what moralign.censoring needs to
            # give the censored answers another treatment (the columns above already mix the two orders)
            pairs = list(zip(first, second, strict=True))
            by_order = {
                "logp_choice_by_order": [[a.logp_choice.tolist(), b.logp_choice[::-1].tolist()] for a, b in pairs],
                "censored_by_order": [[a.censored.tolist(), b.censored[::-1].tolist()] for a, b in pairs],
                "logp_bound_by_order": [[a.logp_bound, b.logp_bound] for a, b in pairs],
            }
        usage = [r.get("usage") or {} for r in responses[:n]]
        return pd.DataFrame(
            {
                "id": list(items["id"]),
                "logp_choice": list(logp),
                "coverage": coverage,
                "p": list(p),
                "n_prompt_tokens": [int(u.get("prompt_tokens", -1)) for u in usage],
                "answer_position": [a.position for a in first],
                "censored": list(censored),
                "logp_bound": [a.logp_bound for a in first],
                "status": [a.status for a in first],
                "response_model": [r.get("model") for r in responses[:n]],
                "system_fingerprint": [r.get("system_fingerprint") for r in responses[:n]],
                **by_order,
            }
        )

    def summarise(self, predictions: pd.DataFrame) -> dict[str, Any]:
        """Censoring, low coverage, positions read, and what the server says it ran."""

        def counts(column: str) -> dict[str, int]:
            return {str(k): int(v) for k, v in predictions[column].value_counts(dropna=False).sort_index().items()}

        threshold = self.settings.coverage_threshold
        out = {
            "share_censored": float(predictions["censored"].map(lambda c: bool(np.any(c))).mean()),
            "share_low_coverage": float((predictions["coverage"] < threshold).mean()),
            "coverage_threshold": threshold,
            "censored_treatment": self.settings.censored,
            "status": counts("status"),
            "answer_position": counts("answer_position"),
            "response_model": counts("response_model"),
            "system_fingerprint": counts("system_fingerprint"),
        }
        if out["share_censored"] or out["share_low_coverage"]:
            log.warning(
                "%s: %.1f%% of items have a censored answer (not in the top %d; p uses the %s treatment), "
                "%.1f%% have coverage below %.2f",
                self.settings.api_model,
                100 * out["share_censored"],
                self.settings.top_logprobs,
                self.settings.censored,
                100 * out["share_low_coverage"],
                threshold,
            )
        return out

    def examples(self, items: pd.DataFrame) -> str:
        """The chat messages exactly as sent (the server applies its own template)."""
        blocks = []
        for _, row in items.iterrows():
            turns = "\n".join(f"[{m['role']}]\n{m['content']}" for m in self.messages(row))
            blocks.append(f"===== {row['id']} =====\n{turns}\n")
        return "\n".join(blocks)


def build(cfg: Config, model: str, dataset: str, condition: str, inputs: CellInputs) -> OpenAIPredictor:
    """The predictor of one API cell; its responses are cached under ``inputs.cache_dir``."""
    if inputs.cache_dir is None:
        raise ValueError(f"model {model} (backend openai) needs a response cache folder (extract --cache-dir)")
    settings = OpenAISettings(**cfg.model(model)["openai"])
    if not DATED.search(settings.api_model):
        log.warning(
            "models.%s.openai.api_model %r is not a dated snapshot: the alias can move to another model; the "
            "model and system_fingerprint each response reports are recorded in the predictions",
            model,
            settings.api_model,
        )
    transport = Transport(
        base_url=settings.base_url,
        api_key_env=settings.api_key_env,
        cache=ResponseCache(inputs.cache_dir),
        concurrency=settings.concurrency,
        max_retries=settings.max_retries,
        timeout_s=settings.timeout_s,
        mode=settings.mode,
        batch_poll_s=settings.batch_poll_s,
        max_requests=settings.max_requests,
    )
    builder = PromptBuilder.from_config(cfg, model, dataset, pd.read_parquet(inputs.data_dir / "train.parquet"))
    predictor = OpenAIPredictor(settings, builder, transport, cfg["extract"]["debias"])
    predictor.provenance.update(
        model=model,
        condition=condition,
        dataset=dataset,
        environment={**environment(), "openai": metadata.version("openai")},
    )
    return predictor
