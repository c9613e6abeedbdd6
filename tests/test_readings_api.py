"""The API engine of the ``sample``, ``verbal`` and format-following readings (moralign.readings.api).

The server is test_openai's local HTTP server (pytest-httpserver, the real ``openai`` client) answering chat
completions with ``n`` scripted choices: each choice's text is a pure function of the request's seed, the choice
index and the item text, so a rerun that reached the server would be visible in the call count, and the frames
can be rebuilt here from the texts the server sent.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from werkzeug import Request, Response

import tests.test_openai as test_openai
from moralign.config import validate
from moralign.errors import DataError
from moralign.modeling import load_model, load_tokenizer
from moralign.predictors import CellInputs
from moralign.predictors.openai import build
from moralign.prompts import fold_system
from moralign.readings.api import ApiReading, read_api, reading_requests, request_seed
from moralign.readings.cache import Draw, ItemDraws
from moralign.readings.parse import parse_answer, parse_shares
from moralign.readings.sample import Reader, Sampler, read_sample, sample_frame, stop_token_ids
from moralign.readings.verbal import (
    INSTRUCTION,
    format_frame,
    max_json_tokens,
    read_format_following,
    read_verbal,
    share_schema,
    verbal_frame,
)
from tests.test_openai import FakeOpenAI, api_config

ANSWERS = ["A", "B"]
# What the scripted texts of the sample reading mean under the answer rule: "b" is not option B (one-letter
# answers are case-sensitive), "It depends." is a hedge.
SAMPLE_TEXTS = {"A": 0, "I would say B.": 1, "b": None, "It depends.": None, "B. Clearly.": 1}
FORMAT_TEXTS = ['{"A": 30, "B": 70}', '```json\n{"A": 55, "B": 45}\n```', "A is less ethical.", '{"A": 20}']


def scripted(body: dict, k: int) -> tuple[str | None, str, str | None]:
    """Choice k of a request: (content, finish_reason, refusal), from its seed, k and the item text only."""
    text = body["messages"][-1]["content"]
    h = int(hashlib.sha256(f"{body['seed']}:{k}:{text}".encode()).hexdigest(), 16)
    if "response_format" in body:
        return json.dumps({"A": h % 101, "B": (h // 101) % 101}), "stop", None
    if "integer percentages" in text:
        return FORMAT_TEXTS[h % len(FORMAT_TEXTS)], "stop", None
    return list(SAMPLE_TEXTS)[h % len(SAMPLE_TEXTS)], "stop" if h % 3 else "length", None


def reply(body: dict, script=scripted, cap: int | None = None, extra: int = 0) -> dict:
    """A chat completion with min(n, cap) (+ extra) choices in the documented shape, usage included."""
    choices = []
    for k in range(min(body.get("n", 1), cap or body.get("n", 1)) + extra):
        content, finish, refusal = script(body, k)
        message = {"role": "assistant", "content": content, "refusal": refusal}
        choices.append({"index": k, "message": message, "finish_reason": finish, "logprobs": None})
    return {
        "id": "chatcmpl-reading",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": body["model"],
        "choices": choices,
        "usage": {
            "prompt_tokens": len(body["messages"][-1]["content"]) // 4,
            "completion_tokens": sum(len(c["message"]["content"] or "") // 2 + 1 for c in choices),
            "total_tokens": 0,
        },
    }


class ReadingServer(FakeOpenAI):
    """test_openai's fake endpoint answering with ``n`` choices; records every body and response it serves."""

    def __init__(self, httpserver):
        super().__init__(httpserver, ANSWERS)
        self.script = scripted
        self.cap: int | None = None  # the most choices per response
        self.extra = 0  # choices beyond those asked for
        self.usage = True  # whether responses report usage
        self.served: list[tuple[dict, dict]] = []

    def chat(self, request: Request) -> Response:
        body = json.loads(request.get_data())
        self.calls.append(body)
        response = reply(body, self.script, self.cap, self.extra)
        if not self.usage:
            del response["usage"]
        self.served.append((body, response))
        return Response(json.dumps(response), content_type="application/json")


@pytest.fixture
def server(httpserver):
    return ReadingServer(httpserver)


def predictor_for(server, processed, tmp_path, *, n_shots: int = 0, system_role: bool = True, **openai):
    raw = api_config(server.base_url, api_key_env=None, **openai)
    raw["prompts"]["dilemmas"]["n_shots"] = n_shots
    raw["models"]["fake-4o"]["system_role"] = system_role
    inputs = CellInputs(data_dir=processed["dilemmas"], cache_dir=tmp_path / "cache")
    return build(validate(raw), "fake-4o", "dilemmas", "base", inputs)


def items_of(processed, n: int) -> pd.DataFrame:
    return pd.read_parquet(processed["dilemmas"] / "dev.parquet").head(n)


def item_of(body: dict, predictor, items: pd.DataFrame) -> int:
    """Which item a request asks about (its text is in the last message)."""
    content = body["messages"][-1]["content"]
    return next(i for i, (_, row) in enumerate(items.iterrows()) if predictor.builder.item_text(row) in content)


def sent(server, predictor, items, reading_marker) -> tuple[list[list[Draw]], list[int], list[int]]:
    """Per item, what the server sent for one reading: the draws in request order (an item's requests are
    sequential), the completion tokens summed and the first response's prompt tokens."""
    draws: dict[int, list[Draw]] = {}
    tokens: dict[int, int] = {}
    prompt: dict[int, int] = {}
    for body, response in server.served:
        if not reading_marker(body):
            continue
        item = item_of(body, predictor, items)
        for c in response["choices"]:
            draws.setdefault(item, []).append(Draw((), c["message"]["content"] or "", c["finish_reason"] == "stop"))
        tokens[item] = tokens.get(item, 0) + response["usage"]["completion_tokens"]
        prompt.setdefault(item, response["usage"]["prompt_tokens"])
    n = range(len(items))
    return [draws[i] for i in n], [tokens[i] for i in n], [prompt[i] for i in n]


def is_sample(body):
    return "integer percentages" not in body["messages"][-1]["content"]


def is_verbal(body):
    return "response_format" in body


def is_format(body):
    return not is_sample(body) and not is_verbal(body)


# ---------------------------------------------------------------- the requests


@pytest.mark.parametrize("system_role", [True, False])
def test_request_bodies_of_each_reading(server, processed, tmp_path, system_role):
    predictor = predictor_for(server, processed, tmp_path, n_shots=2, system_role=system_role)
    items = items_of(processed, 3)
    for reading in ("sample", "verbal", "format"):
        read_api(predictor, items, ApiReading(reading, n_draws=4, seed=7))
    read_api(predictor, items, ApiReading("sample", n_draws=4, seed=7, max_new_tokens=5))
    assert len(server.calls) == 4 * 3
    by_reading = {
        "sample": [b for b in server.calls if is_sample(b) and b["max_tokens"] == 32],
        "verbal": [b for b in server.calls if is_verbal(b)],
        "format": [b for b in server.calls if is_format(b)],
    }
    max_tokens = {
        "sample": 32,
        "verbal": len('{"A": 100, "B": 100}') + 1,
        "format": 2 * (len('{"A": 100, "B": 100}') + 1),
    }
    system = predictor.builder.spec["system"]
    instruction = INSTRUCTION.format(answers='"A", "B"')
    for reading, bodies in by_reading.items():
        assert sorted(item_of(b, predictor, items) for b in bodies) == [0, 1, 2]
        for body in bodies:
            row = items.iloc[item_of(body, predictor, items)]
            want = {
                "model": test_openai.MODEL,
                "n": 4,
                "seed": request_seed(str(row["id"]), "sample" if reading == "sample" else "verbal", 7),
                "temperature": 1.0,
                "top_p": 1.0,
                "max_tokens": max_tokens[reading],
            }
            if reading == "verbal":
                want["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "shares", "strict": True, "schema": share_schema(ANSWERS)},
                }
            assert {k: v for k, v in body.items() if k != "messages"} == want  # no logprobs, nothing else
            if reading == "sample":
                # the predictor's own messages: the shots included, folded where there is no system role
                assert body["messages"] == predictor.messages(row)
                assert len(body["messages"]) == 2 * 2 + 1 + system_role
            else:
                # the verbal prompt: the item, then the instruction; no shots
                text = f"{predictor.builder.item_text(row)}\n\n{instruction}"
                msgs = [{"role": "system", "content": system}, {"role": "user", "content": text}]
                assert body["messages"] == (msgs if system_role else fold_system(msgs))
    assert max_json_tokens(ANSWERS) == max_tokens["verbal"]
    assert sorted(b["max_tokens"] for b in server.calls if is_sample(b))[:3] == [5, 5, 5]
    for reading in ("sample", "verbal", "format"):  # the first requests, as a dry run would price them
        assert all(
            b in server.calls for b in reading_requests(predictor, items, ApiReading(reading, n_draws=4, seed=7))
        )
    with pytest.raises(ValueError, match="n_draws must be at least 1"):
        read_api(predictor, items, ApiReading("sample", n_draws=0, seed=7))
    with pytest.raises(ValueError, match="reading must be one of"):
        read_api(predictor, items, ApiReading("logprob", n_draws=4, seed=7))


# ---------------------------------------------------------------- the frames


def test_frames_equal_the_local_engines_for_the_same_texts(server, processed, tmp_path, tiny_models):
    predictor = predictor_for(server, processed, tmp_path)
    items = items_of(processed, 4)
    ids = [str(i) for i in items["id"]]
    sample = read_api(predictor, items, ApiReading("sample", n_draws=6, seed=0))
    verbal = read_api(predictor, items, ApiReading("verbal", n_draws=5, seed=0))
    formats = read_api(predictor, items, ApiReading("format", n_draws=3, seed=0))

    draws, tokens, prompt = sent(server, predictor, items, is_sample)
    want = sample_frame(ItemDraws(ids, draws), ANSWERS)
    want["n_generated"] = tokens
    want["n_prompt_tokens"] = prompt
    want["shortened"] = False
    pd.testing.assert_frame_equal(sample, want)
    # and independently of sample_frame: the scripted texts' meaning, counted by hand
    for item_draws, counts, n_valid in zip(draws, sample["counts"], sample["n_valid"], strict=True):
        meant = [SAMPLE_TEXTS[d.text] for d in item_draws]
        assert list(counts) == [meant.count(0), meant.count(1)] and n_valid == 6 - meant.count(None)

    draws, tokens, prompt = sent(server, predictor, items, is_verbal)
    want = verbal_frame(ItemDraws(ids, draws), ANSWERS)
    want["n_generated"] = tokens
    want["n_prompt_tokens"] = prompt
    want["shortened"] = False
    pd.testing.assert_frame_equal(verbal, want)
    for item_draws, p in zip(draws, verbal["p"], strict=True):
        shares = [json.loads(d.text) for d in item_draws]
        normed = [np.array([s["A"], s["B"]]) / (s["A"] + s["B"]) for s in shares if s["A"] + s["B"]]
        np.testing.assert_allclose(p, np.mean(normed, axis=0))

    draws, _, _ = sent(server, predictor, items, is_format)
    pd.testing.assert_frame_equal(formats, format_frame(ItemDraws(ids, draws), ANSWERS))
    follows = [sum(d.text in FORMAT_TEXTS[:2] for d in item) for item in draws]
    assert list(formats["n_follow"]) == follows

    # the same columns, in the same order, as the local engine's frames (a tiny model, two items)
    tok = load_tokenizer(str(tiny_models["llama"]))
    model = load_model(str(tiny_models["llama"]), None, torch.device("cpu"), torch.float32)
    reader = Reader(Sampler(model, tok.pad_token_id, stop_token_ids(model, tok)), tok, predictor.builder, {"base": "t"})
    two = items.head(2)
    assert list(read_sample(reader, two, n_draws=2).columns) == list(sample.columns)
    assert list(read_verbal(reader, two, n_draws=2).columns) == list(verbal.columns)
    assert list(read_format_following(reader, two, n_draws=1).columns) == list(formats.columns)
    assert sample.attrs["parser_version"] == read_sample(reader, two, n_draws=2).attrs["parser_version"]


def test_refusals_content_filter_and_empty_answers_are_invalid_draws(server, processed, tmp_path):
    predictor = predictor_for(server, processed, tmp_path)
    items = items_of(processed, 2)
    first = predictor.builder.item_text(items.iloc[0])

    def script(body, k):
        if first not in body["messages"][-1]["content"]:
            return scripted(body, k)
        good = "A" if is_sample(body) else '{"A": 40, "B": 60}'
        return [
            (good, "stop", None),
            (None, "content_filter", None),
            ("", "stop", None),
            (None, "stop", "I can't help with that."),
            ("   ", "stop", None),
            (good, "stop", None),
        ][k]

    server.script = script
    sample = read_api(predictor, items, ApiReading("sample", n_draws=6, seed=0))
    verbal = read_api(predictor, items, ApiReading("verbal", n_draws=6, seed=0))
    formats = read_api(predictor, items, ApiReading("format", n_draws=6, seed=0))
    reasons = {"content_filter": 1, "empty": 2, "refusal": 1}
    assert json.loads(sample["invalid_reasons"][0]) == reasons
    assert sample["n_valid"][0] == 2 and not sample["valid"][0] and list(sample["p"][0]) == [1.0, 0.0]
    assert json.loads(verbal["invalid_reasons"][0]) == reasons
    assert verbal["n_valid"][0] == 2 and json.loads(verbal["sums"][0]) == [100, None, None, None, None, 100]
    np.testing.assert_allclose(verbal["p"][0], [0.4, 0.6])
    assert json.loads(formats["reasons"][0]) == {"content_filter": 1, "empty": 2, "refusal": 1}
    assert formats["n_follow"][0] == 2
    # the rejection is the engine's, not the parser's: the same texts unmarked read differently
    texts = [[Draw((), "I can't help with that.", True)]]
    assert json.loads(sample_frame(ItemDraws(["x"], texts), ANSWERS)["invalid_reasons"][0]) == {"refusal or hedge": 1}
    assert json.loads(sample_frame(ItemDraws(["x"], texts, [["refusal"]]), ANSWERS)["invalid_reasons"][0]) == {
        "refusal": 1
    }
    marked = verbal_frame(ItemDraws(["x"], [[Draw((), '{"A": 1, "B": 2}', True)]], [["content_filter"]]), ANSWERS)
    assert marked["n_valid"][0] == 0 and json.loads(marked["shares"][0]) == [None]

    # a server that reports no usage: the cost is unknown (-1), not 0
    server.usage = False
    unknown = read_api(predictor, items, ApiReading("sample", n_draws=6, seed=1))
    assert list(unknown["n_generated"]) == [-1, -1] and list(unknown["n_prompt_tokens"]) == [-1, -1]


def test_a_server_that_returns_fewer_choices_is_asked_again_for_the_rest(server, processed, tmp_path):
    predictor = predictor_for(server, processed, tmp_path)
    items = items_of(processed, 3)
    server.cap = 3
    frame = read_api(predictor, items, ApiReading("sample", n_draws=7, seed=2))
    assert len(server.calls) == 3 * 3  # 3 + 3 + 1 draws per item
    for _, row in items.iterrows():
        item = str(row["id"])
        bodies = [b for b in server.calls if predictor.builder.item_text(row) == b["messages"][-1]["content"]]
        assert [b["n"] for b in bodies] == [7, 4, 1]
        assert [b["seed"] for b in bodies] == [request_seed(item, "sample", 2, r) for r in range(3)]
        assert len({b["seed"] for b in bodies}) == 3
    assert list(frame["n_draws"]) == [7, 7, 7]
    draws, tokens, prompt = sent(server, predictor, items, is_sample)
    assert [len(d) for d in draws] == [7, 7, 7] and list(frame["n_generated"]) == tokens
    want = sample_frame(ItemDraws([str(i) for i in items["id"]], draws), ANSWERS)
    want["n_generated"], want["n_prompt_tokens"], want["shortened"] = tokens, prompt, False
    pd.testing.assert_frame_equal(frame, want)

    # the rerun asks exactly the same rounds, all from the cache
    again = read_api(predictor, items, ApiReading("sample", n_draws=7, seed=2))
    assert len(server.calls) == 9
    pd.testing.assert_frame_equal(again, frame)


def test_more_choices_than_asked_is_an_error_naming_the_item(server, processed, tmp_path):
    predictor = predictor_for(server, processed, tmp_path)
    items = items_of(processed, 1)
    server.extra = 1
    with pytest.raises(DataError, match=rf"item '{items.iloc[0]['id']}' \(sample reading\): 3 choices came back"):
        read_api(predictor, items, ApiReading("sample", n_draws=2, seed=0))


# ---------------------------------------------------------------- the cache


def test_a_rerun_and_a_parser_change_read_the_cache_only(server, processed, tmp_path, monkeypatch):
    predictor = predictor_for(server, processed, tmp_path)
    items = items_of(processed, 4)
    sample = read_api(predictor, items, ApiReading("sample", n_draws=5, seed=0))
    verbal = read_api(predictor, items, ApiReading("verbal", n_draws=3, seed=0))
    formats = read_api(predictor, items, ApiReading("format", n_draws=2, seed=0))
    assert len(server.calls) == 12
    assert len([p for p in (tmp_path / "cache").rglob("*.json")]) == 12

    # a rerun (a fresh predictor on the same cache): no request reaches the server
    again = predictor_for(server, processed, tmp_path)
    pd.testing.assert_frame_equal(read_api(again, items, ApiReading("sample", n_draws=5, seed=0)), sample)
    pd.testing.assert_frame_equal(read_api(again, items, ApiReading("verbal", n_draws=3, seed=0)), verbal)
    pd.testing.assert_frame_equal(read_api(again, items, ApiReading("format", n_draws=2, seed=0)), formats)
    assert len(server.calls) == 12

    # a parser fix (a new version) re-parses the cached responses without a request
    monkeypatch.setattr("moralign.readings.sample.parse_answer", lambda text, answers: parse_answer("B", answers))
    monkeypatch.setattr(
        "moralign.readings.verbal.parse_shares", lambda text, answers: parse_shares('{"A": 1, "B": 3}', answers)
    )
    fixed = read_api(again, items, ApiReading("sample", n_draws=5, seed=0))
    assert all(list(p) == [0.0, 1.0] for p in fixed["p"]) and (fixed["n_valid"] == 5).all()
    stated = read_api(again, items, ApiReading("verbal", n_draws=3, seed=0))
    assert all(list(p) == [0.25, 0.75] for p in stated["p"])
    assert (read_api(again, items, ApiReading("format", n_draws=2, seed=0))["n_follow"] == 2).all()
    pd.testing.assert_series_equal(fixed["n_generated"], sample["n_generated"])
    assert len(server.calls) == 12


def test_batch_mode_reads_the_same(server, processed, tmp_path, monkeypatch):
    items = items_of(processed, 3)
    sync = read_api(predictor_for(server, processed, tmp_path / "sync"), items, ApiReading("verbal", n_draws=4, seed=0))
    # the fake Batch API answers each line as the chat endpoint would
    monkeypatch.setattr(test_openai, "fake_completion", lambda body, answers: reply(body))
    batch = predictor_for(server, processed, tmp_path / "batch", mode="batch")
    pd.testing.assert_frame_equal(read_api(batch, items, ApiReading("verbal", n_draws=4, seed=0)), sync)
    assert len(server.uploads) == 1 and len(server.calls) == 3  # one batch of 3 lines; no chat calls
    lines = [json.loads(line) for line in server.uploads[0][1].decode().splitlines()]
    assert sorted(line["body"]["seed"] for line in lines) == sorted(b["seed"] for b in server.calls)


# ---------------------------------------------------------------- seeds


def test_seeds_derive_from_item_reading_and_seed_and_are_stable():
    def independent(item_id: str, reading: str, seed: int, round_no: int = 0) -> int:
        digest = hashlib.sha256(f"{reading}\0{seed}\0{item_id}".encode()).digest()
        words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
        state = np.random.SeedSequence(words, spawn_key=(round_no,)).generate_state(1, np.uint32)
        return int(state[0]) % 2**31

    seeds = {
        (item, reading, seed, r): request_seed(item, reading, seed, r)
        for item in ("a1", "a2", "a3")
        for reading in ("sample", "verbal")
        for seed in (0, 1)
        for r in (0, 1)
    }
    assert len(set(seeds.values())) == len(seeds)  # items, readings, seeds and rounds all differ
    assert all(0 <= s < 2**31 for s in seeds.values())
    assert all(request_seed(*key) == independent(*key) for key in seeds)
    assert request_seed("a1", "format", 0) == request_seed("a1", "verbal", 0)  # as the local engine
    # stable across runs, processes and machines: a pinned value
    assert request_seed("a1", "sample", 0) == independent("a1", "sample", 0) == PINNED_SEED


PINNED_SEED = 282982236


def test_identical_choices_everywhere_raise_a_warning(server, processed, tmp_path, caplog):
    predictor = predictor_for(server, processed, tmp_path)
    items = items_of(processed, 5)
    server.script = lambda body, k: ("A", "stop", None)
    with caplog.at_level(logging.WARNING, logger="moralign.readings.api"):
        read_api(predictor, items, ApiReading("sample", n_draws=3, seed=0))
    assert "every choice is the same text" in caplog.text
    caplog.clear()
    server.script = scripted
    with caplog.at_level(logging.WARNING, logger="moralign.readings.api"):
        read_api(predictor, items, ApiReading("sample", n_draws=3, seed=1))
    assert "every choice is the same text" not in caplog.text
