"""Item text is never a control token: special tokens' strings in message text are tokenized as plain text.

On the tiny demo models (both chat formats, chat and raw prompts): the ids extraction scores and both training
recipes' rows carry exactly the special tokens the template writes for the same item without those strings (so
none inside the item's text), and items without them keep exactly the ids one plain tokenizer call gives.
"""

import copy
import types

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers

from moralign import extraction as ex
from moralign import plain_text, training
from moralign.config import validate
from moralign.data import TASKS, counts_matrix
from moralign.modeling import load_model, load_tokenizer
from moralign.plain_text import encode_text
from moralign.predictors import CellInputs
from moralign.predictors import hf as hf_predictor
from moralign.prompts import PromptBuilder, select_shots
from tests.test_extraction import naive_sequence
from tests.test_training import demo_config, model_dir

SYSTEM = "Judge like a typical reader."
TEMPLATES = {
    "anecdotes": "Title: {title}\n{text}\n\nIs the author in the wrong?",
    "dilemmas": "A: {action1}\nB: {action2}\n\nWhich is less ethical?",
}


def specials(tok) -> dict[str, int]:
    return {t.content: i for i, t in tok.added_tokens_decoder.items() if t.special}


def inject(frame: pd.DataFrame, strings: list[str]) -> pd.DataFrame:
    """Each item's text fields start and end with special strings and hold them inside, alone and run together."""
    out = frame.copy()
    fields = ["title", "text"] if "text" in frame else ["action1", "action2"]
    for k, (i, row) in enumerate(frame.iterrows()):
        for f in fields:
            a, b = strings[k % len(strings)], strings[(k + 1) % len(strings)]
            out.at[i, f] = f"{a}{row[f]} {' '.join(strings)} then{''.join(strings)}{b}"
    return out


def special_sequence(tok, ids: list[int]) -> list[int]:
    ids_ = set(specials(tok).values())
    return [i for i in ids if i in ids_]


def builder_for(processed, dataset: str, chat: bool, shots: int = 2, inject_shots: list[str] | None = None):
    train = pd.read_parquet(processed[dataset] / "train.parquet")
    chosen = select_shots(train, shots, 0)
    if inject_shots:
        chosen = inject(chosen, inject_shots)
    spec = {"system": SYSTEM, "template": TEMPLATES[dataset], "answers": ["A", "B"], "n_shots": shots}
    return PromptBuilder(TASKS[dataset], {**spec, "shot_seed": 0}, chat=chat, shots=chosen)


def old_encode_text(tok, text: str) -> list[int]:
    """The ids one plain tokenizer call gives (special tokens parsed), with the one-BOS rule: the code before."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    k = 0
    while k < len(ids) and ids[k] == tok.bos_token_id:
        k += 1
    return [tok.bos_token_id, *ids[k:]]


@pytest.fixture(scope="module", params=["llama", "mistral"])
def tiny(request, tiny_models):
    return request.param, load_tokenizer(str(tiny_models[request.param]))


@pytest.mark.parametrize("dataset", ["anecdotes", "dilemmas"])
@pytest.mark.parametrize("chat", [True, False])
def test_extraction_and_training_rows_carry_only_the_templates_special_tokens(tiny, processed, dataset, chat):
    _, tok = tiny
    strings = list(specials(tok))
    clean = pd.read_parquet(processed[dataset] / "dev.parquet").head(6)
    dirty = inject(clean, strings)
    builder = builder_for(processed, dataset, chat)
    # the same shots with special strings: the item's own text is then their only source in the prompt
    dirty_shots = builder_for(processed, dataset, chat, inject_shots=strings)
    answers = ex.answer_variants(tok, builder.answers)
    settings = {"votes_per_item": 5, "seed": 0}
    counts = counts_matrix(clean)
    for b in (builder, dirty_shots):
        want = [special_sequence(tok, builder.encode(tok, r).ids) for _, r in clean.iterrows()]
        prompts_ = training.encode_items(b, tok, dirty, None)
        for prompt, (_, row), w in zip(prompts_, dirty.iterrows(), want, strict=True):
            assert all(s in prompt.text for s in strings), "the item's text is written verbatim"
            assert special_sequence(tok, prompt.ids) == w, row["id"]
            assert prompt.ids == encode_text(tok, prompt.text, prompt.plain)
            # the continuation route (multi-token answers): the prompt's ids, then the answer as text
            ctx, cont = ex.continuation(tok, prompt.text, " Not at all", prompt.plain)
            assert ctx == prompt.ids and special_sequence(tok, cont) == []
        # both recipes: the prompts as extraction encodes them, the answer token after them
        soft = training.training_rows("soft", tok, b, dirty, prompts_, counts, answers, settings)
        votes = training.training_rows("votes", tok, b, dirty, prompts_, counts, answers, settings)
        rows = training.training_rows("votes", tok, b, dirty, prompts_, counts, answers, settings, one_pass=False)
        # answers of several tokens: prompt + answer tokenized jointly (extraction's continuation route)
        multi = ex.answer_variants(tok, ["A really", "B really"])
        joint = training.training_rows("votes", tok, b, dirty, prompts_, counts, multi, settings)
        for p, s, v, r, j, w in zip(prompts_, soft, votes, rows, joint, want, strict=True):
            assert s["input_ids"] == v["input_ids"] == p.ids
            assert all(t in variants for t, variants in zip(v["answer_ids"], answers.variants, strict=True))
            assert all(seq[:-1] == p.ids and special_sequence(tok, seq) == w for seq in r["sequences"])
            assert all(seq[: len(p.ids)] == p.ids and special_sequence(tok, seq) == w for seq in j["sequences"])


@pytest.mark.parametrize("dataset", ["anecdotes", "dilemmas"])
@pytest.mark.parametrize("chat", [True, False])
def test_items_without_special_strings_keep_their_ids(tiny, processed, dataset, chat):
    """Byte-identical to one plain tokenizer call: prompts, shortened prompts and the answered conversation."""
    _, tok = tiny
    builder = builder_for(processed, dataset, chat)
    frame = pd.read_parquet(processed[dataset] / "test.parquet").head(20)
    answers = ex.answer_variants(tok, builder.answers)
    for _, row in frame.iterrows():
        prompt = builder.encode(tok, row)
        assert prompt.plain == () and prompt.ids == old_encode_text(tok, builder.rendered(tok, row).text)
        if dataset == "anecdotes":  # (a dilemma's actions are too short to cut)
            short = builder.encode(tok, row, max_length=len(prompt.ids) - 5)
            assert short.shortened and short.ids == old_encode_text(tok, short.text)
        whole = builder.encode_conversation(tok, row, prompt, "A")
        assert whole == old_encode_text(tok, builder.conversation(tok, row, prompt.fields, "A"))
        assert ex.continuation(tok, prompt.text, " No") == ex.continuation(tok, prompt.text, " No", prompt.plain)
    assert training.answer_targets(builder, tok, row, prompt, answers)


def test_shortened_items_keep_their_special_strings_as_text(tiny, processed):
    _, tok = tiny
    strings = list(specials(tok))
    builder = builder_for(processed, "anecdotes", True, shots=0)
    row = inject(pd.read_parquet(processed["anecdotes"] / "dev.parquet").head(1), strings).iloc[0]
    clean = builder.encode(tok, {**row.to_dict(), "text": "", "title": ""})
    full = builder.encode(tok, row)
    short = builder.encode(tok, row, max_length=len(clean.ids) + (len(full.ids) - len(clean.ids)) // 2)
    assert short.shortened and len(short.ids) < len(full.ids)
    assert strings[0] in short.fields["text"], "the cut keeps the strings as text"
    assert special_sequence(tok, short.ids) == special_sequence(tok, clean.ids)


def test_extraction_by_continuation_scores_the_plain_ids(tmp_path, tiny_models, processed):
    """Multi-token answers through the predictor: each answer scored after the prompt's plain ids."""
    base = model_dir(tmp_path, tiny_models, "mistral")
    raw = demo_config()
    raw["prompts"]["dilemmas"]["answers"] = ["A really", "B really"]
    cfg = validate(raw)
    predictor = hf_predictor.build(cfg, "tiny-mistral", "dilemmas", "base", CellInputs(processed["dilemmas"], base))
    tok = predictor.tokenizer
    assert not predictor.answers.single_token
    frame = inject(pd.read_parquet(processed["dilemmas"] / "dev.parquet").head(3), list(specials(tok)))
    got = predictor.predict(frame)
    model = load_model(str(base), None, torch.device("cpu"), torch.float32)
    want = []
    for prompt in predictor.encode(frame):
        pairs = [ex.continuation(tok, prompt.text, a, prompt.plain) for a in predictor.builder.answers]
        assert all(ctx == prompt.ids for ctx, _ in pairs)
        want.append([naive_sequence(model, ctx, cont) for ctx, cont in pairs])
    np.testing.assert_allclose(np.stack(got["logp_choice"]), want, atol=1e-4)


def test_text_after_a_markup_token_is_tokenized_in_place(tiny_models):
    """A template that writes message text straight after a special token, on a SentencePiece-style tokenizer.

    Its prefix space goes only at the start of the whole text, so the message's tokens are those of the same text
    in the middle of a text: computed here by a copy whose pre-tokenizer never adds the prefix space.
    """
    tok = load_tokenizer(str(tiny_models["mistral"]))
    tok.chat_template = "{{ bos_token }}{% for m in messages %}[INST]{{ m['content'] }}[/INST]{% endfor %}"
    builder = PromptBuilder(TASKS["dilemmas"], {"template": "{action1}</s>{action2}", "answers": ["A", "B"]}, True)
    row = {"id": "x", "action1": "lying</s>to", "action2": "them"}
    prompt = builder.encode(tok, row)
    reference = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")]
    )
    reference.encode_special_tokens = True
    body = reference.encode("lying</s>to</s>them", add_special_tokens=False).ids
    ids = specials(tok)
    assert prompt.ids == [tok.bos_token_id, ids["[INST]"], *body, ids["[/INST]"]]
    assert tok.convert_ids_to_tokens(body[:1]) != tok.convert_ids_to_tokens(encode_text(tok, "lying")[1:2])


def test_a_template_that_rewrites_special_strings_is_an_error(tiny):
    _, tok = tiny
    template = tok.chat_template
    tok.chat_template = "{% for m in messages %}{{ m['content'][:3] }}|{% endfor %}"
    builder = PromptBuilder(TASKS["dilemmas"], {"template": "{action1} or {action2}", "answers": ["A", "B"]}, True)
    try:
        assert builder.encode(tok, {"id": "d1", "action1": "a", "action2": "b"}).plain == ()
        with pytest.raises(ValueError, match=r"item d2: .*special tokens' strings"):
            builder.encode(tok, {"id": "d2", "action1": f"a{tok.eos_token}", "action2": "b"})
    finally:
        tok.chat_template = template


def test_a_copy_that_does_not_reproduce_the_tokenizer_is_refused(tiny):
    _, tok = tiny
    text = f"Some Text {tok.eos_token} More"
    plain = plain_text.special_spans(tok, text)
    good = encode_text(tok, text, plain)
    known = plain_text._COPIES[tok]
    broken = copy.deepcopy(known[1])
    broken.normalizer = normalizers.Lowercase()
    plain_text._COPIES[tok] = (known[0], broken)
    try:
        with pytest.raises(ValueError, match="cannot tokenize 'Some Text"):
            encode_text(tok, text, plain)
    finally:
        plain_text._COPIES[tok] = known
    assert encode_text(tok, text, plain) == good


def test_special_strings_need_a_fast_tokenizer():
    slow = types.SimpleNamespace(is_fast=False)
    with pytest.raises(ValueError, match="needs a fast tokenizer"):
        encode_text(slow, "a </s>", ((2, 6),))
