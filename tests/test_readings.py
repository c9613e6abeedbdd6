"""The ``sample`` and ``verbal`` readings, their parsers, the generation cache and the sampling floor.

Everything runs on the session's tiny random models (tests/conftest.py). Reference computations are written
out here independently: a one-row, cache-free sampling loop; per-item multinomial enumeration and Monte Carlo
for the floor; the ``logprob`` reading itself for the agreement of the readings.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import chi2, multinomial

from moralign import extraction as ex
from moralign.data import TASKS
from moralign.errors import DataError
from moralign.modeling import load_model, load_tokenizer
from moralign.prompts import PromptBuilder
from moralign.readings.cache import Draw, GenerationCache, ItemDraws, Request
from moralign.readings.floor import sampling_floor
from moralign.readings.parse import parse_answer, parse_shares
from moralign.readings.sample import (
    MIN_VALID_SHARE,
    Decoding,
    Reader,
    Sampler,
    draw_tokens,
    read_sample,
    sample_frame,
    stop_token_ids,
    uniforms,
)
from moralign.readings.verbal import (
    JsonConstraint,
    format_following_rate,
    max_json_tokens,
    read_format_following,
    read_verbal,
    share_schema,
    tokenizer_info,
    verbal_builder,
    verbal_frame,
)

ANECDOTES = {
    "system": "You judge everyday moral situations the way a typical online community member would.",
    "template": "Title: {title}\n{text}\n\nIs the author in the wrong? Answer Yes or No.",
    "answers": ["Yes", "No"],
    "n_shots": 0,
    "shot_seed": 0,
}
FIVE_WAY = {
    **ANECDOTES,
    "template": "Title: {title}\n{text}\n\nWho is in the wrong? A: the author, B: the other person, C: everybody, "
    "D: nobody, E: more information is needed. Answer A, B, C, D or E.",
    "answers": ["A", "B", "C", "D", "E"],
}
IDENTITY = {"base": "tiny", "adapter": None}


@pytest.fixture(scope="module", params=["llama", "mistral"])
def tiny(request, tiny_models):
    tok = load_tokenizer(str(tiny_models[request.param]))
    model = load_model(str(tiny_models[request.param]), None, torch.device("cpu"), torch.float32)
    return tok, model


def items_of(processed, dataset: str, n: int) -> pd.DataFrame:
    return pd.read_parquet(processed[dataset] / "dev.parquet").head(n)


def sampler_for(model, tok, **kwargs) -> Sampler:
    return Sampler(model, tok.pad_token_id, stop_token_ids(model, tok), **kwargs)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "choice", "reason"),
    [
        ("Yes", 0, "answer"),
        (" no", 1, "answer"),
        ("I would say Yes.", 0, "answer"),
        ("YES, the author is in the wrong.", 0, "answer"),
        ("**No**", 1, "answer"),
        ("Sure! Let me think about it.\nThe answer is: no", 1, "answer"),
        ("Yes. No one would lend money twice.", 0, "answer"),  # later sentences are explanation
        ("No. It depends on who you ask, though.", 1, "answer"),
        ("It depends on the context.", None, "refusal or hedge"),
        ("it DEPENDS. yes, if she knew.", None, "refusal or hedge"),
        ("I'm sorry, but I can't judge this. Yes.", None, "refusal or hedge"),
        ("I can\u2019t say yes or no.", None, "refusal or hedge"),  # a typographic apostrophe
        ("As an AI, I do not hold opinions.", None, "refusal or hedge"),
        ("Not sure, maybe yes.", None, "refusal or hedge"),
        ("Yes and no.", None, "several answers"),
        ("Hmm, that is a hard one.", None, "no answer"),
        ("Yesterday was a long day.", None, "no answer"),  # whole words only
        ("Nobody knows.", None, "no answer"),
        ("", None, "no answer"),
    ],
)
def test_answer_parser_reads_preambles_case_variants_and_refusals(text, choice, reason):
    parsed = parse_answer(text, ["Yes", "No"])
    assert (parsed.choice, parsed.reason) == (choice, reason)
    assert parsed.valid == (choice is not None)


def test_answer_parser_shares_extractions_variant_rule():
    letters = ["A", "B"]
    assert parse_answer("B", letters).choice == 1
    assert parse_answer("I think B is less ethical.", letters).choice == 1
    # one-letter answers are case-sensitive, as extraction's variants: "a" is the article, not option A
    assert parse_answer("a lie is worse, so B", letters).choice == 1
    assert parse_answer("b", letters).reason == "no answer"
    assert parse_answer("A or B?", letters).reason == "several answers"
    # every token variant extraction counts for an answer parses as that answer
    five = ["AUTHOR", "OTHER", "EVERYBODY", "NOBODY", "INFO"]
    assert parse_answer("I'd say EVERYBODY here.", five).choice == 2
    assert parse_answer("nobody", five).choice == 3
    assert parse_answer("Other\n\nbecause ...", five).choice == 1
    assert parse_answer("\uff2f\uff34\uff28\uff25\uff32", five).choice == 1  # full-width letters (NFKC)
    multi = ["the first action", "the second action"]
    assert parse_answer("Clearly The  First Action.", multi).choice == 0


def test_answer_parser_accepts_every_single_token_variant(tiny):
    tok, _ = tiny
    answers = ex.answer_variants(tok, ["Yes", "No"])
    for j, strings in enumerate(answers.variant_strings):
        for s in strings:
            assert parse_answer(s, answers.answers).choice == j, s


@pytest.mark.parametrize(
    ("text", "values", "valid"),
    [
        ('{"Yes": 30, "No": 70}', (30, 70), True),
        ('```json\n{"No": 70, "Yes": 35}\n```', (35, 70), True),  # a fence; order of keys free; sum 105
        ('{"Yes": 0, "No": 0}', (0, 0), False),  # parses, but cannot be normalised
        ('{"Yes": 30}', None, False),
        ('{"Yes": 30, "No": 70, "Maybe": 0}', None, False),
        ('{"Yes": 30.5, "No": 69.5}', None, False),
        ('{"Yes": true, "No": 70}', None, False),
        ('{"Yes": 130, "No": -30}', None, False),
        ('{"Yes": 30, "Yes": 40, "No": 70}', None, False),
        ('{"Yes": NaN, "No": 70}', None, False),
        ("[30, 70]", None, False),
        ("Yes: 30 %, No: 70 %", None, False),
    ],
)
def test_share_parser(text, values, valid):
    shares = parse_shares(text, ["Yes", "No"])
    assert shares.values == values and shares.valid == valid


# ---------------------------------------------------------------- frames from raw draws


def draws_of(*texts: str, stopped: bool = True) -> list[Draw]:
    return [Draw(tuple(range(len(t))), t, stopped) for t in texts]


def test_sample_frame_counts_valid_draws_and_keeps_invalid_items():
    frame = sample_frame(
        ItemDraws(
            ["a", "b", "c"],
            [
                draws_of("Yes", "I would say no", "yes.", "It depends."),  # 3 of 4 valid: valid item
                draws_of("Yes", "It depends.", "Hmm.", "no"),  # 2 of 4 valid: below 2/3, kept and flagged
                draws_of("I'm sorry.", "Hmm."),  # nothing valid: p is NaN
            ],
        ),
        ["Yes", "No"],
    )
    assert list(frame["id"]) == ["a", "b", "c"]
    assert list(frame["valid"]) == [True, False, False]
    assert list(frame["n_valid"]) == [3, 2, 0] and list(frame["n_draws"]) == [4, 4, 2]
    np.testing.assert_allclose(frame["p"][0], [2 / 3, 1 / 3])
    np.testing.assert_allclose(frame["p"][1], [1 / 2, 1 / 2])
    assert np.isnan(frame["p"][2]).all()
    np.testing.assert_allclose(frame["coverage"], [3 / 4, 2 / 4, 0])
    assert [list(c) for c in frame["counts"]] == [[2, 1], [1, 1], [0, 0]]
    assert json.loads(frame["invalid_reasons"][1]) == {"refusal or hedge": 1, "no answer": 1}
    assert frame.attrs["parser_version"] >= 1
    assert MIN_VALID_SHARE == pytest.approx(2 / 3)


def test_verbal_frame_normalises_each_draw_and_keeps_draw_zero():
    frame = verbal_frame(
        ItemDraws(
            ["a", "b"],
            [
                draws_of('{"Yes": 30, "No": 60}', '{"Yes": 50, "No": 50}', '{"Yes": 0, "No": 0}'),
                draws_of("no idea", '{"Yes": 20, "No": 80}', '{"Yes": 10, "No": 90}'),
            ],
        ),
        ["Yes", "No"],
    )
    # item a: draws (1/3, 2/3) and (1/2, 1/2); the all-zero draw is invalid
    np.testing.assert_allclose(frame["p"][0], [(1 / 3 + 1 / 2) / 2, (2 / 3 + 1 / 2) / 2])
    np.testing.assert_allclose(frame["p_single"][0], [1 / 3, 2 / 3])
    assert json.loads(frame["sums"][0]) == [90, 100, 0]
    assert frame["sum_gap"][0] == pytest.approx((10 + 0 + 100) / 3)
    assert list(frame["n_valid"]) == [2, 2] and list(frame["valid"]) == [True, True]
    np.testing.assert_allclose(frame["p"][1], [0.15, 0.85])
    assert not frame["valid_single"][1] and np.isnan(frame["p_single"][1]).all()
    assert json.loads(frame["shares"][1]) == [None, [20, 80], [10, 90]]


# ---------------------------------------------------------------- the sampling floor


def test_sampling_floor_matches_enumeration_and_monte_carlo():
    binary = np.array([[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]])
    three = np.stack([np.array([0.2, 0.3, 0.5]), np.array([0.6, 0.4, 0.0]), np.array([0.1, 0.1, 0.8])])
    rng = np.random.default_rng(0)
    for probs, n in ((binary, 7), (three, 5), (three, 30)):
        exact = sampling_floor(probs, n)
        for i, p in enumerate(probs):
            if n <= 7:  # every outcome of the multinomial, weighted by its probability
                outcomes = [c for c in itertools.product(range(n + 1), repeat=len(p)) if sum(c) == n]
                want = sum(multinomial.pmf(c, n, p) * 0.5 * np.abs(np.array(c) / n - p).sum() for c in outcomes)
                assert exact[i] == pytest.approx(want, abs=1e-12)
            draws = rng.multinomial(n, p, size=200_000) / n
            tv = 0.5 * np.abs(draws - p).sum(axis=1)
            assert abs(exact[i] - tv.mean()) < 5 * tv.std() / np.sqrt(len(tv)) + 1e-12
    assert sampling_floor(binary[2:], 30)[0] == 0.0  # a unanimous item: every draw agrees
    per_item = sampling_floor(three, np.array([5, 30, 0]))
    assert per_item[0] == pytest.approx(sampling_floor(three[:1], 5)[0]) and np.isnan(per_item[2])
    assert sampling_floor(three, 30).mean() < sampling_floor(three, 5).mean()
    with pytest.raises(ValueError, match="distribution"):
        sampling_floor(np.array([[0.5, 0.6]]), 3)


# ---------------------------------------------------------------- drawing tokens


def test_draw_tokens_is_the_inverse_cdf_in_token_order():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen) * 2
    logits[0, 10:] = -torch.inf  # a constraint: only the first 10 tokens allowed
    u = torch.rand(6, generator=gen, dtype=torch.float64)
    got = draw_tokens(logits, u)
    for r in range(6):
        p = np.exp(logits[r].double().numpy() - logits[r].double().max().item())
        p[~np.isfinite(p)] = 0
        cdf = np.cumsum(p / p.sum())
        assert got[r].item() == int(np.argmax(cdf > u[r].item()))
    assert got[0].item() < 10
    # with top-p, only the most probable tokens holding top_p of the mass remain
    p = torch.softmax(logits[1:2].double(), -1)[0]
    order = torch.argsort(-p, stable=True)
    kept = order[: int((torch.cumsum(p[order], 0) < 0.5).sum()) + 1]
    many = draw_tokens(logits[1:2].expand(2000, -1), torch.rand(2000, generator=gen, dtype=torch.float64), top_p=0.5)
    assert set(many.tolist()) == set(kept.tolist())
    # the draws follow the distribution
    u = torch.rand(20000, generator=gen, dtype=torch.float64)
    counts = torch.bincount(draw_tokens(logits[2:3].expand(20000, -1), u), minlength=50).double()
    expected = torch.softmax(logits[2].double(), -1) * 20000
    assert ((counts - expected) ** 2 / expected).sum() < chi2.ppf(0.999, 49)


def test_uniform_streams_derive_from_item_reading_seed_and_draw():
    a = uniforms("item-1", "sample", 0, 5, 8)
    assert a.shape == (5, 8)
    np.testing.assert_array_equal(a, uniforms("item-1", "sample", 0, 5, 8))
    np.testing.assert_array_equal(a[:3, :4], uniforms("item-1", "sample", 0, 3, 4))  # draw k's stream is its own
    for other in (("item-2", "sample", 0), ("item-1", "verbal", 0), ("item-1", "sample", 1)):
        assert not np.array_equal(a, uniforms(*other, 5, 8))


# ---------------------------------------------------------------- seeded, batched generation


def naive_completion(model, prompt: list[int], u: np.ndarray, stop: list[int]) -> list[int]:
    """One row, no batch, no key/value cache: the whole sequence through the model at every step."""
    ids, out = list(prompt), []
    for step in range(len(u)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()
        p = np.exp(logits - logits.max())
        cdf = np.cumsum(p / p.sum())
        token = int(np.argmax(cdf > u[step]))
        if token in stop:
            break
        out.append(token)
        ids.append(token)
    return out


def test_seeded_sampling_is_bit_for_bit_whatever_the_batch(tiny, processed):
    tok, model = tiny
    builder = PromptBuilder(TASKS["anecdotes"], ANECDOTES, chat=True)
    items = items_of(processed, "anecdotes", 6)
    prompts = [builder.encode(tok, row).ids for _, row in items.iterrows()]
    decoding = Decoding(max_new_tokens=12)
    streams = [uniforms(i, "sample", 0, 4, 12) for i in items["id"]]
    whole = sampler_for(model, tok).generate(prompts, streams, decoding)
    again = sampler_for(model, tok).generate(prompts, streams, decoding)
    assert whole == again
    order = [3, 0, 5, 1, 4, 2]
    alone = sampler_for(model, tok, max_rows=4).generate(
        [prompts[i] for i in order], [streams[i] for i in order], decoding
    )
    assert [alone[order.index(i)] for i in range(6)] == whole
    pair = sampler_for(model, tok, max_rows=8).generate(prompts[4:], streams[4:], decoding)
    assert pair == whole[4:]
    stop = stop_token_ids(model, tok)
    for k in range(2):
        assert whole[0][k][0] == naive_completion(model, prompts[0], streams[0][k], stop)
    # different seeds draw differently
    other = sampler_for(model, tok).generate(prompts, [uniforms(i, "sample", 1, 4, 12) for i in items["id"]], decoding)
    assert other != whole
    assert all(len(ids) == 12 or stopped for item in whole for ids, stopped in item)


class CountingModel(torch.nn.Module):
    """Counts forward passes and the rows of each."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.generation_config = inner.generation_config
        self.calls: list[int] = []

    def forward(self, input_ids, **kwargs):
        self.calls.append(input_ids.shape[0])
        return self.inner(input_ids=input_ids, **kwargs)


def test_generation_batches_items_and_reuses_the_shared_prefix(tiny, processed):
    tok, model = tiny
    spec = {**ANECDOTES, "system": " ".join(["Judge the situation the way most readers of the forum would."] * 4)}
    builder = PromptBuilder(TASKS["anecdotes"], spec, chat=True)
    items = items_of(processed, "anecdotes", 5)
    prompts = [builder.encode(tok, row).ids for _, row in items.iterrows()]
    assert ex.common_prefix_length(prompts) >= 32
    decoding = Decoding(max_new_tokens=6)
    streams = [uniforms(i, "sample", 0, 3, 6) for i in items["id"]]
    counting = CountingModel(model)
    reused = sampler_for(counting, tok).generate(prompts, streams, decoding)
    # one pass for the shared prefix, one for the five prompts together, then one per new token for all rows
    assert counting.calls[:2] == [1, 5] and counting.calls[2] <= 15 and len(counting.calls) <= 2 + 5
    assert reused == sampler_for(model, tok, reuse_prefix=False).generate(prompts, streams, decoding)


class AnswerFirst(torch.nn.Module):
    """A model whose first token is always an answer variant and whose next one is a stop token.

    The answer tokens keep the inner model's logits (scaled up so that items differ clearly); every other token
    gets -inf. After an answer token only the stop token has mass. Both the extraction engine and the sampler
    read the last position only (left padding, ``logits_to_keep=1``).
    """

    def __init__(self, inner, answer_ids: list[int], stop_id: int, scale: float = 25.0):
        super().__init__()
        self.inner = inner
        self.generation_config = inner.generation_config
        self.answer_ids = torch.tensor(answer_ids)
        self.stop_id = stop_id
        self.scale = scale

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        logits = out.logits[:, -1:] * self.scale
        first = torch.full_like(logits, -torch.inf)
        first[..., self.answer_ids] = logits[..., self.answer_ids]
        then = torch.full_like(logits, -torch.inf)
        then[..., self.stop_id] = 0.0
        after_answer = torch.isin(input_ids[:, -1], self.answer_ids)[:, None, None]
        out.logits = torch.where(after_answer, then, first)
        return out


@pytest.mark.parametrize(("dataset", "spec"), [("anecdotes", ANECDOTES), ("anecdotes-5way", FIVE_WAY)])
def test_sample_converges_to_logprob_when_the_first_token_is_an_answer(tiny, processed, dataset, spec):
    tok, model = tiny
    builder = PromptBuilder(TASKS[dataset], spec, chat=True)
    answers = ex.answer_variants(tok, builder.answers)
    assert answers.single_token
    wrapped = AnswerFirst(model, [i for v in answers.variants for i in v], tok.eos_token_id)
    items = items_of(processed, dataset, 6)
    prompts = [builder.encode(tok, row).ids for _, row in items.iterrows()]
    coverage, p_logprob = ex.normalise(ex.Scorer(wrapped, tok.pad_token_id).score_tokens(prompts, answers))
    np.testing.assert_allclose(coverage, 1.0, rtol=1e-6)
    assert np.abs(p_logprob - 1 / len(builder.answers)).max() > 0.2  # not all near-uniform: a test with power
    n = 300
    frame = read_sample(
        Reader(sampler_for(wrapped, tok), tok, builder, IDENTITY), items, n_draws=n, decoding=Decoding(max_new_tokens=4)
    )
    assert frame["valid"].all() and (frame["n_valid"] == n).all()
    counts = np.stack(frame["counts"])
    # Pearson's statistic over every item: (K - 1) degrees of freedom each under "sample draws from p_logprob"
    stat = ((counts - n * p_logprob) ** 2 / (n * p_logprob)).sum()
    assert stat < chi2.ppf(0.999, len(items) * (len(builder.answers) - 1))
    # and each share within 4.5 binomial standard errors
    se = np.sqrt(p_logprob * (1 - p_logprob) / n)
    assert (np.abs(np.stack(frame["p"]) - p_logprob) <= 4.5 * se + 1e-12).all()
    # a wrong reference is rejected: the same counts against the uniform distribution
    uniform = np.full_like(p_logprob, 1 / len(builder.answers))
    assert ((counts - n * uniform) ** 2 / (n * uniform)).sum() > chi2.ppf(0.999, counts.size - len(items))


# ---------------------------------------------------------------- the sample reading end to end, and its cache


def test_sample_reading_caches_raw_draws_keyed_by_the_full_request(tiny, processed, tmp_path, monkeypatch):
    tok, model = tiny
    builder = PromptBuilder(TASKS["anecdotes"], ANECDOTES, chat=True)
    items = items_of(processed, "anecdotes", 4)
    cache = GenerationCache(tmp_path / "cache")
    decoding = Decoding(max_new_tokens=8)
    sampler = sampler_for(model, tok)
    first = read_sample(Reader(sampler, tok, builder, IDENTITY, cache=cache), items, n_draws=5, decoding=decoding)
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 4
    assert list(first["n_prompt_tokens"]) == [len(builder.encode(tok, row).ids) for _, row in items.iterrows()]
    assert (first["n_generated"] <= 5 * 8).all() and (first["n_draws"] == 5).all()

    # a rerun reads every item from the cache: the model is never called
    def refuse(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(Sampler, "generate", refuse)
    again = read_sample(Reader(sampler, tok, builder, IDENTITY, cache=cache), items, n_draws=5, decoding=decoding)
    pd.testing.assert_frame_equal(first, again)
    # a parser fix re-parses the cached draws without generating
    monkeypatch.setattr("moralign.readings.sample.parse_answer", lambda text, answers: parse_answer("Yes", answers))
    fixed = read_sample(Reader(sampler, tok, builder, IDENTITY, cache=cache), items, n_draws=5, decoding=decoding)
    assert (fixed["n_valid"] == 5).all() and all(list(p) == [1.0, 0.0] for p in fixed["p"])
    monkeypatch.undo()

    # anything else in the request is another key
    encoded = builder.encode(tok, items.iloc[0])
    base = Request({"base": "tiny", "dtype": "float32"}, "x", tuple(encoded.ids), "sample", 5, 0, decoding.describe())
    changed = [
        Request({**base.model, "adapter": "abc"}, "x", base.prompt_ids, "sample", 5, 0, decoding.describe()),
        Request(base.model, "y", base.prompt_ids, "sample", 5, 0, decoding.describe()),
        Request(base.model, "x", base.prompt_ids[:-1], "sample", 5, 0, decoding.describe()),
        Request(base.model, "x", base.prompt_ids, "verbal", 5, 0, decoding.describe()),
        Request(base.model, "x", base.prompt_ids, "sample", 6, 0, decoding.describe()),
        Request(base.model, "x", base.prompt_ids, "sample", 5, 1, decoding.describe()),
        Request(base.model, "x", base.prompt_ids, "sample", 5, 0, Decoding(8, temperature=0.7).describe()),
        Request(base.model, "x", base.prompt_ids, "sample", 5, 0, decoding.describe(), {"type": "object"}),
    ]
    assert len({base.key, *(r.key for r in changed)}) == 1 + len(changed)
    with pytest.raises(ValueError, match="identity"):
        Request({}, "x", base.prompt_ids, "sample", 5, 0, decoding.describe())


class Failing(torch.nn.Module):
    """Raises at the forward pass number ``fail_at`` (a run killed part way)."""

    def __init__(self, inner, fail_at: int):
        super().__init__()
        self.inner = inner
        self.generation_config = inner.generation_config
        self.calls, self.fail_at = 0, fail_at

    def forward(self, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("killed")
        return self.inner(**kwargs)


def test_a_killed_run_keeps_finished_batches_and_resumes(tiny, processed, tmp_path):
    tok, model = tiny
    builder = PromptBuilder(TASKS["anecdotes"], ANECDOTES, chat=True)
    items = items_of(processed, "anecdotes", 4)
    decoding = Decoding(max_new_tokens=4)
    clean = read_sample(Reader(sampler_for(model, tok), tok, builder, IDENTITY), items, n_draws=3, decoding=decoding)
    cache = GenerationCache(tmp_path)
    failing = sampler_for(Failing(model, fail_at=12), tok, max_rows=3)  # one item per batch, at most 5 passes each
    with pytest.raises(RuntimeError, match="killed"):
        read_sample(Reader(failing, tok, builder, IDENTITY, cache=cache), items, n_draws=3, decoding=decoding)
    assert 1 <= len(list(tmp_path.rglob("*.json"))) < 4
    resumed = read_sample(
        Reader(sampler_for(model, tok), tok, builder, IDENTITY, cache=cache), items, n_draws=3, decoding=decoding
    )
    pd.testing.assert_frame_equal(resumed, clean)


def test_generation_cache_refuses_damaged_or_foreign_entries(tmp_path):
    cache = GenerationCache(tmp_path)
    request = Request({"base": "m"}, "x", (1, 2, 3), "sample", 2, 0, Decoding(4).describe())
    draws = [Draw((5, 6), "ab", True), Draw((7,), "c", False)]
    cache.put(request, draws)
    assert cache.get(request) == draws and request in cache
    other = Request({"base": "m"}, "y", (1, 2, 3), "sample", 2, 0, Decoding(4).describe())
    assert cache.get(other) is None
    cache.path(other).parent.mkdir(parents=True, exist_ok=True)
    cache.path(other).write_text(cache.path(request).read_text())
    with pytest.raises(DataError, match="another request"):
        cache.get(other)
    cache.path(request).write_text("{not json")
    with pytest.raises(DataError, match=str(cache.path(request))):
        cache.get(request)
    with pytest.raises(ValueError, match="completions"):
        cache.put(request, draws[:1])


# ---------------------------------------------------------------- the verbal reading


def test_tokenizer_info_decodes_tokens_as_the_tokenizer_does(tiny):
    import xgrammar as xgr

    tok, model = tiny
    vocab = model.get_output_embeddings().weight.shape[0]
    info = tokenizer_info(tok, vocab, stop_token_ids(model, tok))
    byte_level = "Ġ" in "".join(tok.get_vocab())
    assert info.vocab_type == (xgr.VocabType.BYTE_LEVEL if byte_level else xgr.VocabType.BYTE_FALLBACK)
    anchor = tok("x", add_special_tokens=False)["input_ids"]
    for word in (" Yes", '{"', " 100"):
        ids = tok(word, add_special_tokens=False)["input_ids"]
        text = tok.decode(anchor + ids)[len(tok.decode(anchor)) :]
        assert b"".join(info.decoded_vocab[i] for i in ids) == text.encode()


@pytest.mark.parametrize(("dataset", "spec"), [("anecdotes", ANECDOTES), ("anecdotes-5way", FIVE_WAY)])
def test_constrained_draws_are_always_the_json_asked_for(tiny, processed, dataset, spec, tmp_path):
    tok, model = tiny
    builder = PromptBuilder(TASKS[dataset], spec, chat=True)
    items = items_of(processed, dataset, 12)
    cache = GenerationCache(tmp_path)
    frame = read_verbal(Reader(sampler_for(model, tok), tok, builder, IDENTITY, cache=cache), items, n_draws=5)
    assert (frame["n_draws"] == 5).all() and not frame["shares"].str.contains("null").any()
    for path in tmp_path.rglob("*.json"):
        entry = json.loads(path.read_text())
        assert entry["request"]["constraint"]["json_schema"] == share_schema(builder.answers)
        for draw in entry["draws"]:
            obj = json.loads(draw["text"])  # every draw is valid JSON ...
            assert list(obj) == builder.answers  # ... of exactly the answers,
            assert all(isinstance(v, int) and 0 <= v <= 100 for v in obj.values())  # integer percentages,
            assert draw["stopped"]  # and the model stopped after it (never cut off)
            assert len(draw["ids"]) < max_json_tokens(builder.answers)
    parsed = [json.loads(s) for s in frame["shares"]]
    valid = [[v for v in item if v is not None and sum(v) > 0] for item in parsed]
    for p, item_valid in zip(frame["p"], valid, strict=True):
        np.testing.assert_allclose(p, np.mean([np.array(v) / sum(v) for v in item_valid], axis=0))
    np.testing.assert_allclose(np.stack(frame["p_single"]), [np.array(s[0]) / sum(s[0]) for s in parsed])
    assert frame["sum_gap"].notna().all()


def test_unconstrained_draws_give_the_format_following_rate(tiny, processed, monkeypatch):
    tok, model = tiny
    builder = PromptBuilder(TASKS["anecdotes"], ANECDOTES, chat=True)
    items = items_of(processed, "anecdotes", 6)
    sampler = sampler_for(model, tok)
    frame = read_format_following(Reader(sampler, tok, builder, IDENTITY), items, n_draws=2)
    assert list(frame["n_draws"]) == [2] * 6
    assert format_following_rate(frame) == 0.0  # a random tiny model writes no JSON of its own
    # the rate counts what the share parser reads: feed it completions that half follow the format
    texts = iter(['{"Yes": 40, "No": 60}', "Yes, 40 %"] * 6)

    def fake_generate(self, prompts, streams, decoding, constraint=None, on_done=None):
        assert constraint is None
        made = [[(tok(next(texts), add_special_tokens=False)["input_ids"], True) for _ in range(2)] for _ in prompts]
        for i, completions in enumerate(made):
            on_done(i, completions)
        return made

    monkeypatch.setattr(Sampler, "generate", fake_generate)
    half = read_format_following(Reader(sampler, tok, builder, IDENTITY), items, n_draws=2)
    assert format_following_rate(half) == 0.5


def test_verbal_prompt_is_the_items_prompt_with_the_instruction(tiny, processed):
    tok, _ = tiny
    spec = {**ANECDOTES, "template": "A: {action1}\nB: {action2}\n{{A}} or {{B}}?", "answers": ["A", "B"]}
    builder = PromptBuilder(TASKS["dilemmas"], spec, chat=True)
    row = items_of(processed, "dilemmas", 1).iloc[0]
    verbal = verbal_builder(builder)
    text = verbal.encode(tok, row).text
    assert row["action1"] in text and "{A} or {B}?" in text
    assert 'keys are the answers ("A", "B")' in text and "integer percentages" in text
    assert verbal.answers == builder.answers and len(verbal.shots) == 0
    assert max_json_tokens(["A", "B"]) == len('{"A": 100, "B": 100}') + 1
    with pytest.raises(ValueError, match="distinct"):
        share_schema(["A", "A"])


def test_json_constraint_rejects_what_the_schema_forbids(tiny):
    tok, model = tiny
    vocab = model.get_output_embeddings().weight.shape[0]
    constraint = JsonConstraint(tok, vocab, stop_token_ids(model, tok), share_schema(["Yes", "No"]))
    good, bad = constraint.matcher(), constraint.matcher()
    assert good.accept_string('{"Yes": 40, "No": 60}') and good.accept_token(tok.eos_token_id)
    assert good.is_terminated()
    assert not bad.accept_string('{"No": 40')
    partial = constraint.matcher()
    assert partial.accept_string('{"Yes": 40') and not partial.accept_token(tok.eos_token_id)


def test_readings_run_on_a_lora_adapter(tiny_models, processed):
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer(str(tiny_models["llama"]))
    model = load_model(str(tiny_models["llama"]), None, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    builder = PromptBuilder(TASKS["anecdotes"], ANECDOTES, chat=True)
    items = items_of(processed, "anecdotes", 2)
    prompts = [builder.encode(tok, row).ids for _, row in items.iterrows()]
    streams = [uniforms(i, "sample", 0, 2, 8) for i in items["id"]]
    got = sampler_for(lora, tok).generate(prompts, streams, Decoding(max_new_tokens=8))
    stop = stop_token_ids(lora, tok)
    for i in range(2):
        for k in range(2):
            assert got[i][k][0] == naive_completion(lora, prompts[i], streams[i][k], stop)
    verbal = read_verbal(
        Reader(sampler_for(lora, tok), tok, builder, {"base": "tiny", "adapter": "x"}), items, n_draws=2
    )
    assert not verbal["shares"].str.contains("null").any()
