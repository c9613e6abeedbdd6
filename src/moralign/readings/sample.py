"""Seeded, batched sampling of completions, and the ``sample`` reading built on it.

**Randomness.** Every completion (row) draws its tokens by inverse-CDF sampling from its own stream of uniform
numbers: draw k of an item uses ``SeedSequence(sha256(item id, reading, seed), spawn_key=(k,))``, one number per
generated token. The token at a step is the first one, in token-id order, whose cumulative probability exceeds
that number times the total. A row's tokens therefore depend on its item, reading, seed, draw index and the
model's logits, and on nothing else: not on the other items of its batch, the batch size, the order of the
items or which of them came from the cache. (``generate`` cannot do this: it samples every row from one global
generator, so a row's draws change with the batch around it.)

The logits themselves are computed in batches; rounding makes them differ in the last bits between batch
compositions (float32 on CPU: about 1e-7 relative), which moves a draw only when its uniform number falls that
close to a boundary of the cumulative distribution: never in the tests, which check bit-for-bit equality of the
draws across batch compositions. In bfloat16 on a GPU the rounding is ~1e-3, so there a draw can flip at a rate
of that order per token when the batch composition changes; a rerun of the same plan is identical.

**Batching.** Items are grouped longest first under a token budget (as extraction does); all N completions of
an item are rows of the same batch. A prefix shared by every prompt of a call (system text, few-shot examples)
is run once and its key/value cache reused; then each prompt of a batch is run once (left padded, positions
from the attention mask) and its cache repeated for its N rows, so the prompt costs one forward pass however
many completions it gets. Rows stop at a stop token (the tokenizer's EOS and the model's generation-config EOS
ids) or at ``max_new_tokens``; finished rows leave the batch.

**Constraints.** A row may carry a grammar matcher (xgrammar; :mod:`moralign.readings.verbal`): before each
draw the matcher's token bitmask sets the logits of forbidden tokens to -inf, and the drawn token is fed back
to it.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from moralign import extraction as ex
from moralign.prompts import PromptBuilder
from moralign.readings.cache import Draw, GenerationCache, ItemDraws, Request, canonical_json
from moralign.readings.parse import VERSIONS, Parsed, parse_answer

log = logging.getLogger(__name__)

# An item whose valid draws are fewer than this share of its draws is an invalid item (reported, never dropped).
MIN_VALID_SHARE = 2 / 3
# The defaults: 30 completions per item, at temperature 1 and top-p 1, long enough for a preamble.
DEFAULT_DRAWS = 30


@dataclass(frozen=True)
class Decoding:
    """How tokens are drawn: temperature, nucleus (top-p) and the most new tokens per completion."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (sampling), not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")

    def describe(self) -> dict[str, Any]:
        """JSON-able form (part of every cache key)."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}


DEFAULT_DECODING = Decoding(max_new_tokens=32)


def item_seed(item_id: str, reading: str, seed: int) -> list[int]:
    """The entropy of one item's draws: 32-bit words of sha256 over (item id, reading, seed)."""
    digest = hashlib.sha256(f"{reading}\0{seed}\0{item_id}".encode()).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def uniforms(item_id: str, reading: str, seed: int, n_draws: int, max_new_tokens: int) -> np.ndarray:
    """The uniform numbers of one item's draws (n_draws x max_new_tokens); draw k's stream depends on k only."""
    entropy = item_seed(item_id, reading, seed)
    return np.stack(
        [
            np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy, spawn_key=(k,)))).random(max_new_tokens)
            for k in range(n_draws)
        ]
    )


def draw_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """One token per row by inverse-CDF sampling with the row's uniform number ``u`` (float64 throughout).

    Forbidden tokens carry logit -inf and probability 0: they occupy no interval and are never drawn. With
    ``top_p`` < 1 only the smallest set of most probable tokens holding ``top_p`` of the mass is kept (ties
    broken by token id), then renormalised.
    """
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
    cdf = probs.cumsum(-1)
    x = (u.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS and every EOS id of the model's generation config."""
    ids = {tokenizer.eos_token_id}
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list | tuple) else [eos])
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer and the model name no EOS token: a completion could never stop")
    return sorted(int(i) for i in ids)


class Matcher(Protocol):
    """What a per-row constraint offers (an xgrammar ``GrammarMatcher``)."""

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> Any: ...  # noqa: D102

    def accept_token(self, token_id: int) -> bool: ...  # noqa: D102


def allowed_from_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Boolean allowed-token mask (rows x vocab) from an xgrammar int32 bitmask (bit i of word w = token 32 w + i)."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


class Sampler:
    """Batched seeded completions of prompts for one model; see the module docstring.

    ``token_budget`` bounds rows x (longest prompt + ``max_new_tokens``) per batch and ``max_rows`` the rows
    (items x draws) per batch. With ``reuse_prefix``, a prefix of at least ``min_prefix`` tokens shared by every
    prompt of a call is run once.
    """

    def __init__(
        self,
        model: Any,
        pad_id: int,
        stop_ids: Sequence[int],
        token_budget: int = 65536,
        max_rows: int = 256,
        reuse_prefix: bool = True,
        min_prefix: int = 32,
    ) -> None:
        self.model = model
        self.pad_id = pad_id
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        self.token_budget = token_budget
        self.max_rows = max_rows
        self.reuse_prefix = reuse_prefix
        self.min_prefix = min_prefix
        self.device = next(model.parameters()).device

    def _prefix(self, prompts: list[list[int]]) -> tuple[list[list[int]], tuple[int, Any] | None]:
        """Split off a long prefix shared by every prompt (each keeps at least one token) and run it once."""
        n = min(ex.common_prefix_length(prompts), min(len(p) for p in prompts) - 1)
        if not self.reuse_prefix or n < self.min_prefix:
            return prompts, None
        with torch.inference_mode():
            ids = torch.tensor([prompts[0][:n]], device=self.device)
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        return [p[n:] for p in prompts], (n, _cache_of(out))

    def generate(
        self,
        prompts: list[list[int]],
        streams: list[np.ndarray],
        decoding: Decoding,
        constraint: Callable[[int, int], Matcher] | None = None,
        on_done: Callable[[int, list[tuple[list[int], bool]]], None] | None = None,
    ) -> list[list[tuple[list[int], bool]]]:
        """Completions of every prompt: per prompt, per draw, (token ids without the stop token, stopped).

        ``streams[i]`` holds prompt i's uniform numbers (draws x ``max_new_tokens``, :func:`uniforms`); every
        prompt gets the same number of draws. ``constraint(i, k)`` makes the matcher of prompt i's draw k.
        ``on_done(i, completions)`` is called as soon as prompt i's batch is finished (to cache it: a killed run
        loses at most the batch in progress).
        """
        if not prompts:
            return []
        n_draws = streams[0].shape[0]
        if any(s.shape != (n_draws, decoding.max_new_tokens) for s in streams):
            raise ValueError(f"every prompt needs {n_draws} x {decoding.max_new_tokens} uniform numbers")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt cannot be continued")
        rows, prefix = self._prefix(prompts)
        lengths = [len(r) + decoding.max_new_tokens for r in rows]
        batches = ex.make_batches(lengths, max(1, self.token_budget // n_draws), max(1, self.max_rows // n_draws))
        results: list[Any] = [None] * len(prompts)
        for batch in batches:
            u = torch.from_numpy(np.concatenate([streams[i] for i in batch]))
            matchers = None
            if constraint is not None:
                matchers = [constraint(i, k) for i in batch for k in range(n_draws)]
            with torch.inference_mode():
                done = self._batch([rows[i] for i in batch], prefix, n_draws, u, decoding, matchers)
            for b, i in enumerate(batch):
                results[i] = done[b * n_draws : (b + 1) * n_draws]
                if on_done is not None:
                    on_done(i, results[i])
        return results

    def _forward(self, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        out = self.model(**kwargs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), _cache_of(out)

    def _batch(
        self,
        rows: list[list[int]],
        prefix: tuple[int, Any] | None,
        n_draws: int,
        u: torch.Tensor,
        decoding: Decoding,
        matchers: list[Matcher] | None,
    ) -> list[tuple[list[int], bool]]:
        prefix_len, prefix_cache = prefix if prefix else (0, None)
        batch = {k: v.to(self.device) for k, v in ex.pad_batch(rows, self.pad_id, "left", prefix_len).items()}
        kwargs: dict[str, Any] = {}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(rows))
            kwargs["cache"] = cache
        logits, cache = self._forward(**batch, **kwargs)
        # each prompt ran once; its N completions continue copies of its cache
        logits = logits.repeat_interleave(n_draws, dim=0)
        cache.batch_repeat_interleave(n_draws)
        mask = batch["attention_mask"].repeat_interleave(n_draws, dim=0)
        position = (batch["position_ids"][:, -1] + 1).repeat_interleave(n_draws)
        alive = torch.arange(len(rows) * n_draws)
        tokens: list[list[int]] = [[] for _ in range(len(alive))]
        stopped = [False] * len(alive)
        stop_ids = self.stop_ids.to(self.device)
        for step in range(decoding.max_new_tokens):
            if matchers is not None:
                logits = self._constrain(logits, [matchers[r] for r in alive.tolist()])
            drawn = draw_tokens(logits, u[alive, step], decoding.temperature, decoding.top_p)
            ends = torch.isin(drawn, stop_ids)
            for r, token, end in zip(alive.tolist(), drawn.tolist(), ends.tolist(), strict=True):
                if matchers is not None and not matchers[r].accept_token(token):
                    raise RuntimeError(f"the constraint refused token {token} it had allowed (row {r})")
                if end:
                    stopped[r] = True
                else:
                    tokens[r].append(token)
            keep = ~ends.cpu()
            if step == decoding.max_new_tokens - 1 or not keep.any():
                break
            if not keep.all():
                index = keep.nonzero().squeeze(-1)
                on_device = index.to(self.device)
                cache.batch_select_indices(on_device)
                mask, position, drawn, alive = mask[on_device], position[on_device], drawn[on_device], alive[index]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits, cache = self._forward(
                input_ids=drawn[:, None], attention_mask=mask, position_ids=position[:, None], cache=cache
            )
            position = position + 1
        return list(zip(tokens, stopped, strict=True))

    def _constrain(self, logits: torch.Tensor, matchers: list[Matcher]) -> torch.Tensor:
        words = (logits.shape[-1] + 31) // 32
        bitmask = torch.zeros((len(matchers), words), dtype=torch.int32)
        for k, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, k)
        allowed = allowed_from_bitmask(bitmask, logits.shape[-1]).to(logits.device)
        if not allowed.any(dim=-1).all():
            raise RuntimeError("the constraint allows no token at all")
        return logits.masked_fill(~allowed, -torch.inf)


def _cache_of(out: Any) -> Any:
    # the key/value cache attribute is `cache` in transformers 5.24 (was past_key_values)
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def generate_cached(
    sampler: Sampler,
    tokenizer: Any,
    requests: list[Request],
    decoding: Decoding,
    cache: GenerationCache | None = None,
    constraint: Callable[[Request], Callable[[int], Matcher]] | None = None,
) -> list[list[Draw]]:
    """The completions of every request: from ``cache`` where there, the rest generated in one batched call.

    Every request must have the same draws, reading and decoding (one call of :meth:`Sampler.generate`).
    ``constraint(request)`` returns the matcher factory of that request's draws.
    """
    if {(r.n_draws, r.reading, canonical_json(r.decoding)) for r in requests} - {
        (requests[0].n_draws, requests[0].reading, canonical_json(decoding.describe()))
    }:
        raise ValueError("requests of one call must share n_draws, reading and the decoding they are generated with")
    found: list[list[Draw] | None] = [cache.get(r) if cache is not None else None for r in requests]
    todo = [i for i, f in enumerate(found) if f is None]

    def store(t: int, completions: list[tuple[list[int], bool]]) -> None:
        i = todo[t]
        draws = [
            Draw(tuple(ids), tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), stop)
            for ids, stop in completions
        ]
        if cache is not None:
            cache.put(requests[i], draws)
        found[i] = draws
        bar.update()

    if todo:
        bar = tqdm(total=len(todo), desc=f"{requests[0].reading} draws", unit="item", leave=False, mininterval=2)
        streams = [
            uniforms(
                requests[i].item_id, requests[i].reading, requests[i].seed, requests[i].n_draws, decoding.max_new_tokens
            )
            for i in todo
        ]
        factories = [constraint(requests[i]) for i in todo] if constraint is not None else None
        sampler.generate(
            [list(requests[i].prompt_ids) for i in todo],
            streams,
            decoding,
            None if factories is None else (lambda t, k: factories[t](k)),
            on_done=store,
        )
        bar.close()
        log.info(
            "%s reading: %d items generated, %d from the cache",
            requests[0].reading,
            len(todo),
            len(requests) - len(todo),
        )
    return found


def sample_frame(drawn: ItemDraws, answers: Sequence[str]) -> pd.DataFrame:
    """The ``sample`` reading's predictions frame, parsed anew from raw completions.

    Columns: ``id``; ``p`` = counts / valid draws (NaN where no draw is valid); ``coverage`` = the valid share of
    the draws; ``valid`` (at least :data:`MIN_VALID_SHARE` of the draws valid: an invalid item is kept and
    flagged, never dropped); ``n_valid``, ``n_draws``, ``counts`` (per choice); ``invalid_reasons`` (reason ->
    count); ``n_generated`` (tokens generated for the item, its cost). ``attrs["parser_version"]`` says which
    parser read them. A rejected draw (:class:`~moralign.readings.cache.ItemDraws`) is invalid with its reason.
    """
    rows = []
    read = drawn.parse(lambda text: parse_answer(text, answers), lambda reason: Parsed(None, reason))
    for item_id, parsed, generated in zip(drawn.ids, read, drawn.generated(), strict=True):
        counts = np.bincount([p.choice for p in parsed if p.valid], minlength=len(answers))
        n_valid, n = int(counts.sum()), len(parsed)
        reasons: dict[str, int] = {}
        for p in parsed:
            if not p.valid:
                reasons[p.reason] = reasons.get(p.reason, 0) + 1
        rows.append(
            {
                "id": item_id,
                "p": counts / n_valid if n_valid else np.full(len(answers), np.nan),
                "coverage": n_valid / n,
                "valid": n_valid >= MIN_VALID_SHARE * n,
                "n_valid": n_valid,
                "n_draws": n,
                "counts": counts,
                "invalid_reasons": canonical_json(reasons),
                "n_generated": generated,
            }
        )
    frame = pd.DataFrame(rows)
    frame.attrs["parser_version"] = VERSIONS["sample"]
    return frame


def model_identity(sampler: Sampler, identity: dict[str, Any]) -> dict[str, Any]:
    """The model part of a request: the caller's identity (base weights, adapter hash) plus the weights' dtype."""
    if not identity:
        raise ValueError("the model identity must name the base weights (and the adapter hash of a tuned model)")
    return {**identity, "dtype": str(next(sampler.model.parameters()).dtype).removeprefix("torch.")}


@dataclass(frozen=True)
class Reader:
    """What every reading needs besides its items.

    The sampler (the model), the tokenizer and prompt builder that render and tokenize prompts exactly as the
    ``logprob`` reading scores them, the model's ``identity`` (base weights and adapter hash: the cache key), the
    generation cache and the ``max_length`` rule of :meth:`PromptBuilder.encode`.
    """

    sampler: Sampler
    tokenizer: Any
    builder: PromptBuilder
    identity: dict[str, Any]
    cache: GenerationCache | None = None
    max_length: int | None = None


def read_sample(
    reader: Reader,
    items: pd.DataFrame,
    *,
    n_draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    decoding: Decoding = DEFAULT_DECODING,
) -> pd.DataFrame:
    """The ``sample`` reading of ``items``: ``n_draws`` completions of each prompt, parsed (:func:`sample_frame`).

    Prompts are rendered and tokenized by :meth:`PromptBuilder.encode`, exactly as the ``logprob`` reading scores
    them. ``identity`` names the model (base weights and adapter hash) for the cache key. The frame adds
    ``n_prompt_tokens`` and ``shortened`` (as extraction's does).
    """
    r = reader
    encoded = [r.builder.encode(r.tokenizer, row, r.max_length) for _, row in items.iterrows()]
    ids = [str(i) for i in items["id"]]
    model = model_identity(r.sampler, r.identity)
    requests = [
        Request(model, item_id, tuple(e.ids), "sample", n_draws, seed, decoding.describe())
        for item_id, e in zip(ids, encoded, strict=True)
    ]
    draws = generate_cached(r.sampler, r.tokenizer, requests, decoding, r.cache)
    frame = sample_frame(ItemDraws(ids, draws), r.builder.answers)
    frame["n_prompt_tokens"] = [len(e.ids) for e in encoded]
    frame["shortened"] = [e.shortened for e in encoded]
    return frame
