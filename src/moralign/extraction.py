"""Next-token probability extraction: one forward pass per prompt, every answer variant summed.

For each prompt and choice j (docs/design.md, "Extraction"):

* ``logp_choice[j] = logsumexp_{v in variants(j)} log_softmax(logits)[v]`` over the full vocabulary;
* ``coverage = sum_j exp(logp_choice[j])``, the mass on valid answers (reported, never hidden);
* ``p = softmax(logp_choice)``, the distribution every metric uses.

Answers without a single-token variant are scored as full continuations (sum of the answer tokens' log-probs),
tokenized jointly with the prompt so no merge at the boundary is lost. Prompts are rendered and tokenized by
``moralign.prompts.PromptBuilder.encode`` (the one function fine-tuning uses too).

Engine conventions: prompts are sorted by length and batched under a token budget; rows are LEFT padded, so the
answer position is the last one for every row, and position ids are computed from the attention mask so a
padded row sees exactly the positions it would see alone (results do not depend on batch size or padding).
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from moralign.io import read_provenance, write_parquet
from moralign.plain_text import Spans, encode_text, special_spans

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnswerTokens:
    """Token ids of every surface variant of every answer ("Yes", " Yes", "yes", ...)."""

    answers: tuple[str, ...]
    variants: tuple[tuple[int, ...], ...]
    variant_strings: tuple[tuple[str, ...], ...]

    @property
    def single_token(self) -> bool:
        """Whether every answer has at least one single-token variant."""
        return all(self.variants)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for provenance."""
        return {
            "answers": list(self.answers),
            "mode": "token" if self.single_token else "sequence",
            "variant_ids": [list(v) for v in self.variants],
            "variant_strings": [list(v) for v in self.variant_strings],
        }


def _matches(decoded: str, answer: str) -> bool:
    # Whitespace around the answer is a variant ("Yes" vs " Yes" vs "\nYes"); so is case, except for
    # one-letter answers, where "a" is mostly the English article rather than option A.
    text = decoded.strip()
    return text == answer or (len(answer) > 1 and text.lower() == answer.lower())


def answer_variants(tokenizer: Any, answers: Sequence[str]) -> AnswerTokens:
    """Find each answer's single-token variants by decoding the whole vocabulary once."""
    specials = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in specials]
    decoded = tokenizer.batch_decode([[i] for i in ids])
    variants, strings = [], []
    for answer in answers:
        found = [(i, s) for i, s in zip(ids, decoded, strict=True) if _matches(s, answer)]
        variants.append(tuple(i for i, _ in found))
        strings.append(tuple(s for _, s in found))
    for j, a in enumerate(answers):
        for k in range(j + 1, len(answers)):
            shared = set(variants[j]) & set(variants[k])
            if shared:
                raise ValueError(f"answers {a!r} and {answers[k]!r} share token variants {sorted(shared)}")
    return AnswerTokens(tuple(answers), tuple(variants), tuple(strings))


def continuation(tokenizer: Any, prompt: str, answer: str, plain: Spans = ()) -> tuple[list[int], list[int]]:
    """Context and continuation ids of ``prompt + answer`` tokenized jointly (merges at the boundary kept).

    Both are encoded like every prompt (``moralign.plain_text.encode_text``: one BOS where the tokenizer adds one;
    ``plain``, the prompt's ``EncodedPrompt.plain``, and the answer, message text too, tokenized as plain text).
    """
    whole = encode_text(tokenizer, prompt + answer, plain + special_spans(tokenizer, answer, len(prompt)))
    ctx = encode_text(tokenizer, prompt, plain)
    n = 0
    while n < min(len(ctx), len(whole)) and ctx[n] == whole[n]:
        n += 1
    if n == len(whole):  # the answer vanished into the prompt's last token: score that token as the answer
        n -= 1
    return whole[:n], whole[n:]


def make_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int) -> list[list[int]]:
    """Indices grouped longest-first so that ``batch size x longest row`` stays within ``token_budget``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * longest > token_budget or len(current) >= max_batch_size):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix shared by every row."""
    if not rows:
        return 0
    first, n = rows[0], min(len(r) for r in rows)
    for k in range(n):
        token = first[k]
        if any(r[k] != token for r in rows):
            return k
    return n


def pad_batch(
    rows: Sequence[Sequence[int]], pad_id: int, side: str = "left", prefix_len: int = 0
) -> dict[str, torch.Tensor]:
    """Padded ids, attention mask and mask-derived position ids.

    Position ids count real tokens only, so a padded row sees exactly the positions it would see alone
    (transformers otherwise numbers positions from the left edge, padding included). ``prefix_len`` > 0 means
    the rows continue a cached prefix of that many tokens: the mask covers it and positions start after it.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[k, span] = torch.tensor(list(r))
        mask[k, span] = 1
    positions = prefix_len + (mask.cumsum(-1) - 1).clamp(min=0)
    if prefix_len:
        mask = torch.cat([torch.ones((len(rows), prefix_len), dtype=torch.long), mask], dim=1)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


class Scorer:
    """Batched log-probabilities of answer tokens after prompts, for one model.

    ``padding_side="left"`` (the default) reads the answer position as the last one and lets the model compute
    logits only there; ``"right"`` reads each row's last real token from full logits (slower, for checking).
    With ``reuse_prefix``, a prefix shared by every prompt of a call (system text, few-shot examples) of at
    least ``min_prefix`` tokens is run once and its key/value cache reused by every batch.
    """

    def __init__(
        self,
        model: Any,
        pad_id: int,
        token_budget: int = 16384,
        max_batch_size: int = 64,
        padding_side: str = "left",
        reuse_prefix: bool = True,
        min_prefix: int = 32,
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        self.model = model
        self.pad_id = pad_id
        self.token_budget = token_budget
        self.max_batch_size = max_batch_size
        self.padding_side = padding_side
        self.reuse_prefix = reuse_prefix
        self.min_prefix = min_prefix
        self.device = next(model.parameters()).device

    def _batch(self, rows: list[list[int]], prefix_len: int) -> dict[str, torch.Tensor]:
        batch = pad_batch(rows, self.pad_id, self.padding_side, prefix_len)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _forward(self, rows: list[list[int]], keep: int, prefix: tuple[int, Any] | None) -> torch.Tensor:
        """Log-softmax over the vocabulary at the last ``keep`` real positions of each row."""
        prefix_len, cache = prefix if prefix else (0, None)
        batch = self._batch(rows, prefix_len)
        kwargs: dict[str, Any] = {"use_cache": False}
        if cache is not None:
            cache = copy.deepcopy(cache)
            cache.batch_repeat_interleave(len(rows))
            kwargs = {"cache": cache, "use_cache": True}
        if self.padding_side == "left":
            out = self.model(**batch, logits_to_keep=keep, **kwargs)
            return torch.log_softmax(out.logits[:, -keep:].float(), dim=-1)
        logits = self.model(**batch, **kwargs).logits
        ends = torch.tensor([len(r) for r in rows], device=logits.device)
        index = (ends[:, None] - keep + torch.arange(keep, device=logits.device)[None, :]).clamp(min=0)
        picked = logits.gather(1, index[:, :, None].expand(-1, -1, logits.shape[-1]))
        return torch.log_softmax(picked.float(), dim=-1)

    def _prefix(self, rows: list[list[int]], keeps: list[int]) -> tuple[list[list[int]], tuple[int, Any] | None]:
        """Split off a long shared prefix and compute its cache once (the positions read stay after it)."""
        if not self.reuse_prefix:
            return rows, None
        n = min(common_prefix_length(rows), min(len(r) - k for r, k in zip(rows, keeps, strict=True)))
        if n < self.min_prefix:
            return rows, None
        with torch.inference_mode():
            ids = torch.tensor([rows[0][:n]], device=self.device)
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        return [r[n:] for r in rows], (n, cache)

    def _run(self, rows: list[list[int]], keep_of: Callable[[int], int], reduce: Callable, desc: str):
        rows, prefix = self._prefix(rows, [keep_of(i) for i in range(len(rows))])
        results: list[Any] = [None] * len(rows)
        queue = list(reversed(make_batches([len(r) for r in rows], self.token_budget, self.max_batch_size)))
        with tqdm(total=len(rows), desc=desc, unit="prompt", leave=False, mininterval=2) as bar:
            while queue:
                batch = queue.pop()
                try:
                    with torch.inference_mode():
                        keep = max(keep_of(i) for i in batch)
                        logprobs = self._forward([rows[i] for i in batch], keep, prefix)
                except torch.OutOfMemoryError:
                    if len(batch) == 1:
                        raise
                    # halve the budget for the rest of the run and retry this batch in smaller pieces
                    self.token_budget //= 2
                    log.warning(
                        "CUDA out of memory with %d rows; token budget halved to %d", len(batch), self.token_budget
                    )
                    torch.cuda.empty_cache()
                    sub = make_batches([len(rows[i]) for i in batch], self.token_budget, self.max_batch_size)
                    queue += [[batch[j] for j in s] for s in reversed(sub)]
                    continue
                for k, i in enumerate(batch):
                    results[i] = reduce(i, logprobs[k])
                bar.update(len(batch))
        return results

    def score_tokens(self, prompts: list[list[int]], answers: AnswerTokens) -> np.ndarray:
        """``logp_choice`` (items x choices) with single-token answers: one forward pass per prompt."""
        width = max(len(v) for v in answers.variants)
        index = torch.zeros((len(answers.variants), width), dtype=torch.long, device=self.device)
        valid = torch.zeros_like(index, dtype=torch.bool)
        for j, v in enumerate(answers.variants):
            index[j, : len(v)] = torch.tensor(v)
            valid[j, : len(v)] = True

        def reduce(_: int, lp: torch.Tensor) -> np.ndarray:
            picked = lp[-1][index].double().masked_fill(~valid, -torch.inf)
            return torch.logsumexp(picked, dim=-1).cpu().numpy()

        return np.stack(self._run(prompts, lambda _: 1, reduce, "extract"))

    def score_sequences(self, pairs: list[tuple[list[int], list[int]]]) -> np.ndarray:
        """Sum of continuation log-probs for (context, continuation) pairs; one value per pair."""
        rows = [ctx + cont for ctx, cont in pairs]

        def reduce(i: int, lp: torch.Tensor) -> float:
            cont = pairs[i][1]
            # the last len(cont) tokens are predicted by the positions just before each of them
            preds = lp[lp.shape[0] - len(cont) - 1 : lp.shape[0] - 1]
            return float(preds.gather(-1, torch.tensor(cont, device=preds.device)[:, None]).double().sum())

        return np.array(self._run(rows, lambda i: len(pairs[i][1]) + 1, reduce, "extract (sequences)"))


def normalise(logp_choice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and the renormalised distribution over choices, computed in log space."""
    top = logp_choice.max(axis=1, keepdims=True)
    log_mass = top[:, 0] + np.log(np.exp(logp_choice - top).sum(axis=1))
    return np.exp(log_mass), np.exp(logp_choice - log_mass[:, None])


def average_orders(logp: np.ndarray, logp_swapped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position-bias control: average the distributions of the two option orders.

    ``logp_swapped`` is already re-ordered to the task's choice order. Returns ``logp_choice`` = log of the mean
    mass per choice (so coverage stays the mean coverage) and ``p`` = the mean of the two renormalised
    distributions.
    """
    p = 0.5 * (normalise(logp)[1] + normalise(logp_swapped)[1])
    return np.logaddexp(logp, logp_swapped) - np.log(2.0), p


@dataclass
class PromptSet:
    """Prompts of one split, ready for the engine (``plain``: each text's ``EncodedPrompt.plain``; none: no spans)."""

    ids: list[str]
    texts: list[str]
    token_ids: list[list[int]]
    plain: list[Spans] | None = None


def score_prompts(scorer: Scorer, tokenizer: Any, prompts: PromptSet, answers: AnswerTokens, chat: bool) -> np.ndarray:
    """``logp_choice`` for a set of prompts, by the token route or the continuation route."""
    if answers.single_token:
        return scorer.score_tokens(prompts.token_ids, answers)
    sep = "" if chat else " "
    plain = prompts.plain or [()] * len(prompts.texts)
    pairs = [
        continuation(tokenizer, t, sep + a, spans)
        for t, spans in zip(prompts.texts, plain, strict=True)
        for a in answers.answers
    ]
    return scorer.score_sequences(pairs).reshape(len(prompts.texts), len(answers.answers))


def predictions_frame(
    ids: list[str],
    logp_choice: np.ndarray,
    n_tokens: list[int],
    p: np.ndarray | None = None,
    shortened: list[bool] | None = None,
) -> pd.DataFrame:
    """Per-item output rows: id, logp_choice, coverage, p, n_prompt_tokens, shortened (item text cut to fit)."""
    coverage, p_norm = normalise(logp_choice)
    return pd.DataFrame(
        {
            "id": ids,
            "logp_choice": list(logp_choice),
            "coverage": coverage,
            "p": list(p_norm if p is None else p),
            "n_prompt_tokens": n_tokens,
            "shortened": [False] * len(ids) if shortened is None else shortened,
        }
    )


def run_sharded(
    n_items: int,
    shard_size: int,
    out_path: str | Path,
    parts: Path,
    provenance: dict[str, Any],
    score_shard: Callable[[slice], pd.DataFrame],
) -> pd.DataFrame:
    """Score items in shards written to ``parts``; a restart skips finished shards whose provenance matches.

    Each shard is written atomically, so after a SIGKILL at most the shard in progress is redone. The final
    file is written atomically too, and only then are the parts removed. ``parts`` lies outside the step's
    declared outputs, because both orchestrators delete those before rerunning a step.
    """
    out_path = Path(out_path)
    parts.mkdir(parents=True, exist_ok=True)
    frames = []
    for start in range(0, n_items, shard_size):
        shard = parts / f"shard-{start // shard_size:05d}.parquet"
        if shard.exists() and read_provenance(shard) == provenance:
            frames.append(pd.read_parquet(shard))
            log.info("shard %s already done; reused", shard.name)
            continue
        t0 = time.perf_counter()
        frame = score_shard(slice(start, min(start + shard_size, n_items)))
        write_parquet(shard, frame, provenance)
        frames.append(frame)
        log.info("shard %s: %d items in %.1f s", shard.name, len(frame), time.perf_counter() - t0)
    result = pd.concat(frames, ignore_index=True)
    write_parquet(out_path, result, provenance)
    shutil.rmtree(parts)
    return result
