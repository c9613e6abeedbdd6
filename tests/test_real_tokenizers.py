"""The real tokenizers and published chat templates of the three paper models, checked against the vendors' encoders.

The tokenizer files ship on PyPI: Llama 3's tiktoken BPE in `llama-models`, Mistral-7B v0.1's SentencePiece
model (Zephyr-7B-beta's tokenizer) and Mistral-7B-Instruct v0.3's in `mistral-common`. Each is set up the way
its Hub repository publishes it (`tokenizer_config.json`: tokenizer class, `add_bos_token`, `legacy`; Llama 3's
post-processor prepends BOS) with the model's published chat template (src/moralign/chat_templates/).

Independent references for the prompt ids moralign builds:
- Mistral-7B-Instruct-v0.3: mistral-common's v3 instruct tokenizer (`encode_chat_completion`);
- Llama-3.1-8B-Instruct: llama-models' `ChatFormat.encode_dialog_prompt`. By design the published template
  opens every conversation with a system turn starting "Cutting Knowledge Date: December 2023\\nToday Date:
  26 Jul 2024\\n\\n" and Meta's ChatFormat writes the system turn exactly as given: the reference gets those
  lines written into its system message, and the test asserts the template's output;
- Zephyr-7B-beta (no vendor encoder): its published format written out by hand (`<|system|>`, `<|user|>`,
  `<|assistant|>` turns, `</s>` and a newline after each) encoded with the `sentencepiece` library itself,
  segment by segment between the `</s>` tokens the format writes, plus exactly one BOS.
All three encode a message's content as text: a special token's string inside it is not that token (tiktoken with
`allowed_special` empty; SentencePiece never reads a control symbol from text).
"""

import json
import shutil
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from moralign import extraction as ex
from moralign import training
from moralign.data import TASKS
from moralign.plain_text import encode_text
from moralign.prompts import TEMPLATE_KWARGS, PromptBuilder, select_shots
from moralign.tinymodels import published_template
from tests.test_extraction import naive_logp, naive_sequence

pytest.importorskip("mistral_common")
pytest.importorskip("llama_models")
pytest.importorskip("sentencepiece")

SYSTEM = "Judge like a typical reader."
SPECS = {
    "anecdotes": {
        "system": SYSTEM,
        "template": "Title: {title}\n{text}\n\nIs the author in the wrong?",
        "answers": ["Yes", "No"],
        "n_shots": 0,
        "shot_seed": 0,
    },
    "dilemmas": {
        "system": SYSTEM,
        "template": "A: {action1}\nB: {action2}\n\nWhich is less ethical?",
        "answers": ["A", "B"],
        "n_shots": 0,
        "shot_seed": 0,
    },
}
LLAMA_SYSTEM_HEADER = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"


def llama_tiktoken_path() -> Path:
    return Path(str(resources.files("llama_models") / "llama3" / "tokenizer.model"))


def mistral_common_file(filename: str) -> Path:
    return Path(str(resources.files("mistral_common") / "data" / filename))


@cache
def vendor_tokenizer(name: str):
    """The vendor's tokenizer of a family, loaded once (Meta's takes about a second)."""
    if name == "mistral-v0.3":
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        return MistralTokenizer.from_file(str(mistral_common_file("mistral_instruct_tokenizer_240323.model.v3")))
    if name == "llama-3.1":
        from llama_models.llama3.tokenizer import Tokenizer

        return Tokenizer(llama_tiktoken_path())
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(mistral_common_file("tokenizer.model.v1")))


def llama3_tokenizer(folder):
    """Llama-3.1-8B-Instruct's tokenizer: Meta's tiktoken ranks, BOS prepended by the post-processor (as published)."""
    from llama_models.llama3.tokenizer import Tokenizer
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = llama_tiktoken_path()
    reference = Tokenizer(path)
    converted = TikTokenConverter(vocab_file=str(path), pattern=reference.pat_str).converted()
    # Meta's 256 special tokens follow the 128,000 BPE ranks, in id order
    specials = sorted(reference.special_tokens.items(), key=lambda kv: kv[1])
    assert converted.get_vocab_size() == specials[0][1]
    converted.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    # the published tokenizer.json: byte-level, then <|begin_of_text|> prepended (so text from the chat template,
    # which writes its own, must not get a second one)
    bos = reference.special_tokens["<|begin_of_text|>"]
    converted.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=converted,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        chat_template=published_template("llama-3.1-8b-instruct"),
    )
    # the conversion must reproduce Meta's own tokenizer, chat markup included
    text = "<|start_header_id|>system<|end_header_id|>\n\nBe fair.<|eot_id|>"
    assert tok(text, add_special_tokens=False)["input_ids"] == reference.encode(
        text, bos=False, eos=False, allowed_special="all"
    )
    assert len(tok) == reference.n_words == 128256
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def sentencepiece_tokenizer(folder, filename, model, **config):
    """A Mistral-family tokenizer as its repository publishes it: tokenizer.model plus tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(mistral_common_file(filename), folder / "tokenizer.model")
    published = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": published_template(model),
        **config,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(published))
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


MODELS = {"llama-3.1": "llama-3.1-8b-instruct", "zephyr": "zephyr-7b-beta", "mistral-v0.3": "mistral-7b-instruct-v0.3"}
# name -> (architecture, tokenizer factory)
CASES = {
    "llama-3.1": ("llama", llama3_tokenizer),
    # Zephyr's tokenizer_config.json: legacy SentencePiece behaviour, pad = </s>
    "zephyr": (
        "mistral",
        lambda d: sentencepiece_tokenizer(d, "tokenizer.model.v1", "zephyr-7b-beta", legacy=True, pad_token="</s>"),
    ),
    "mistral-v0.3": (
        "mistral",
        lambda d: sentencepiece_tokenizer(d, "mistral_instruct_tokenizer_240323.model.v3", "mistral-7b-instruct-v0.3"),
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def real(request, tmp_path_factory, processed):
    arch, make = CASES[request.param]
    tok = make(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    shape = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = (
        LlamaForCausalLM(LlamaConfig(**shape))
        if arch == "llama"
        else MistralForCausalLM(MistralConfig(sliding_window=None, **shape))
    ).eval()
    frame = pd.read_parquet(processed["anecdotes"] / "dev.parquet").head(8)
    builder = PromptBuilder(TASKS["anecdotes"], SPECS["anecdotes"], chat=True)
    texts = [builder.encode(tok, r).text for _, r in frame.iterrows()]
    return request.param, tok, model, texts


def builders(processed, dataset: str, shots: int, system: bool):
    train = pd.read_parquet(processed[dataset] / "train.parquet")
    spec = {**SPECS[dataset], "n_shots": shots, "system": SYSTEM if system else None}
    return PromptBuilder(TASKS[dataset], spec, chat=True, shots=select_shots(train, shots, 0))


def vendor_reference(name: str, msgs: list[dict[str, str]]) -> list[int]:
    """The prompt ids the model's vendor (or, for Zephyr, its published format and SentencePiece) gives."""
    if name == "mistral-v0.3":
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        vendor = vendor_tokenizer(name)
        request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in msgs])
        return vendor.encode_chat_completion(request).tokens
    if name == "llama-3.1":
        from llama_models.datatypes import RawMessage, StopReason
        from llama_models.llama3.chat_format import ChatFormat

        # the published template always opens with a system turn carrying the knowledge-cutoff and date lines
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
        turns = msgs[1:] if msgs[0]["role"] == "system" else msgs
        raw = [RawMessage(role="system", content=LLAMA_SYSTEM_HEADER + system)]
        raw += [RawMessage(role=m["role"], content=m["content"], stop_reason=StopReason.end_of_turn) for m in turns]
        return ChatFormat(vendor_tokenizer(name)).encode_dialog_prompt(raw).tokens
    # Zephyr: its published format by hand, SentencePiece per segment between the </s> (id 2) closing each turn,
    # one BOS (id 1)
    sp = vendor_tokenizer(name)
    ids, segment = [1], ""
    for m in msgs:
        ids += [*sp.encode(f"{segment}<|{m['role']}|>\n{m['content']}"), 2]
        segment = "\n"
    return ids + sp.encode(f"{segment}<|assistant|>\n")


@pytest.mark.parametrize("dataset", ["anecdotes", "dilemmas"])
@pytest.mark.parametrize(("shots", "system"), [(0, True), (2, True), (2, False)])
def test_prompt_ids_equal_the_vendor_reference(real, processed, dataset, shots, system):
    name, tok, _, _ = real
    builder = builders(processed, dataset, shots, system)
    for _, row in pd.read_parquet(processed[dataset] / "dev.parquet").head(5).iterrows():
        msgs = builder.messages(row)
        assert [m["role"] for m in msgs] == ["system"] * system + ["user", "assistant"] * shots + ["user"]
        assert builder.encode(tok, row).ids == vendor_reference(name, msgs), name


# Every family's special tokens' strings (each a special token of its own family)
FAMILY_SPECIALS = {
    "llama-3.1": ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>"],
    "mistral-v0.3": ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "<unk>"],
    "zephyr": ["<s>", "</s>", "<unk>"],
}
INJECTED = list(dict.fromkeys(s for strings in FAMILY_SPECIALS.values() for s in strings))


def injected(row: pd.Series, k: int = 0) -> pd.Series:
    """The item with every family's special strings in its text: first, last, alone and run together."""
    out = row.copy()
    for f in ("title", "text") if "text" in row else ("action1", "action2"):
        first, last = INJECTED[k % len(INJECTED)], INJECTED[-1 - k % len(INJECTED)]
        out[f] = f"{first}{row[f]} {' '.join(INJECTED)}\n{''.join(INJECTED)} end{last}"
    return out


@pytest.mark.parametrize("dataset", ["anecdotes", "dilemmas"])
@pytest.mark.parametrize("template", ["published", "bare"])
def test_special_strings_in_message_text_stay_text(real, processed, dataset, template):
    """Item, shots and system text holding special tokens' strings: moralign's ids are the vendor's, which read
    them as text; a bare template (the item's fields alone) puts them right next to the template's markup."""
    name, tok, _, _ = real
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert set(FAMILY_SPECIALS[name]) <= special
    train = pd.read_parquet(processed[dataset] / "train.parquet")
    shots = pd.DataFrame([injected(r, k) for k, (_, r) in enumerate(select_shots(train, 2, 0).iterrows())])
    spec = {**SPECS[dataset], "n_shots": 2, "system": f"{SYSTEM} {INJECTED[1]}{INJECTED[0]}"}
    if template == "bare":
        spec["template"] = "{title}{text}" if dataset == "anecdotes" else "{action1}{action2}"
    builder = PromptBuilder(TASKS[dataset], spec, chat=True, shots=shots)
    for k, (_, row) in enumerate(pd.read_parquet(processed[dataset] / "dev.parquet").head(3).iterrows()):
        row = injected(row, k)
        prompt = builder.encode(tok, row)
        assert all(s in prompt.text for s in INJECTED)
        assert prompt.ids == vendor_reference(name, builder.messages(row)), name
        # the continuation route: the same prompt ids, then the answer
        ctx, cont = ex.continuation(tok, prompt.text, "Not at all", prompt.plain)
        assert ctx == prompt.ids and tok.decode(cont).strip() == "Not at all"


def test_system_text_goes_where_the_published_template_puts_it(real, processed):
    name, tok, _, _ = real
    builder = builders(processed, "dilemmas", 2, True)
    text = builder.encode(tok, pd.read_parquet(processed["dilemmas"] / "dev.parquet").iloc[0]).text
    if name == "mistral-v0.3":  # in the LAST user turn, as mistral-common's v3 encoder does
        assert text.count(SYSTEM) == 1 and text.rindex("[INST]") < text.index(SYSTEM)
    elif name == "zephyr":
        assert text.startswith(f"<|system|>\n{SYSTEM}</s>\n<|user|>\n")
    else:
        assert f"<|start_header_id|>system<|end_header_id|>\n\n{LLAMA_SYSTEM_HEADER}{SYSTEM}<|eot_id|>" in text


def test_the_answered_conversation_keeps_the_prompt_as_scored(real, processed):
    """Mistral v0.3's template drops the system text once the conversation ends with an assistant turn."""
    name, tok, _, _ = real
    builder = builders(processed, "dilemmas", 2, True)
    row = pd.read_parquet(processed["dilemmas"] / "dev.parquet").iloc[0]
    prompt = builder.encode(tok, row)
    whole = builder.conversation(tok, row, prompt.fields, "A")
    fresh = builder.rendered(tok, row, prompt.fields, answer="A").text
    assert whole.startswith(prompt.text) and whole.count(SYSTEM) == 1
    assert whole[len(prompt.text) :] == {"mistral-v0.3": " A</s>", "zephyr": "A</s>\n"}.get(name, "A<|eot_id|>")
    assert (SYSTEM in fresh) == (name != "mistral-v0.3")


def test_every_prompt_starts_with_exactly_one_bos(real, processed):
    """Zephyr's template writes no BOS (its tokenizer adds one); Llama's and Mistral's write one (add no second)."""
    name, tok, _, _ = real
    assert tok("a")["input_ids"][0] == tok.bos_token_id, "the published tokenizer adds BOS by default"
    writes_bos = "bos_token" in published_template(MODELS[name])
    assert writes_bos == (name != "zephyr")
    for dataset in ("anecdotes", "dilemmas"):
        builder = builders(processed, dataset, 2, True)
        for _, row in pd.read_parquet(processed[dataset] / "dev.parquet").head(4).iterrows():
            ids = builder.encode(tok, row).ids
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, name


def test_llama_date_line_is_pinned(real, processed):
    """The date a Llama 3.x template prints never depends on the day the prompt is rendered."""
    name, tok, _, _ = real
    row = pd.read_parquet(processed["dilemmas"] / "dev.parquet").iloc[0]
    builder = builders(processed, "dilemmas", 0, True)
    if name == "llama-3.1":
        assert "Today Date: 26 Jul 2024\n" in builder.encode(tok, row).text
    # a Llama 3.2-style template fills the date from today unless date_string is given
    dated = tok.chat_template
    tok.chat_template = (
        '{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}'
        "{{ bos_token + 'Today Date: ' + date_string + messages[-1]['content'] }}"
    )
    try:
        assert builder.encode(tok, row).text.startswith(f"{tok.bos_token}Today Date: {TEMPLATE_KWARGS['date_string']}")
    finally:
        tok.chat_template = dated


def first_answer_token(name: str, tok, answer: str) -> int:
    """The vendor's first token of an assistant answer (the token the model produces after the prompt)."""
    if name == "mistral-v0.3":
        return vendor_tokenizer(name).instruct_tokenizer.tokenizer.encode(answer, bos=False, eos=False)[0]
    if name == "llama-3.1":
        from llama_models.datatypes import RawMessage, StopReason
        from llama_models.llama3.chat_format import ChatFormat

        chat = ChatFormat(vendor_tokenizer(name))
        tokens, _ = chat.encode_message(
            RawMessage(role="assistant", content=answer, stop_reason=StopReason.end_of_turn), None
        )
        return tokens[len(chat._encode_header("assistant"))]
    sp = vendor_tokenizer(name)
    head = sp.encode("\n<|assistant|>\n")
    whole = sp.encode(f"\n<|assistant|>\n{answer}")
    assert whole[: len(head)] == head
    return whole[len(head)]


@pytest.mark.parametrize("dataset", ["anecdotes", "dilemmas"])
def test_votes_target_is_the_token_the_model_would_produce(real, processed, dataset):
    """The votes recipe trains on the answer's first token in the encoded conversation, per the vendor's encoder."""
    name, tok, _, _ = real
    builder = builders(processed, dataset, 2, True)
    frame = pd.read_parquet(processed[dataset] / "dev.parquet").head(6)
    answers = ex.answer_variants(tok, builder.answers)
    prompts = training.encode_items(builder, tok, frame, None)
    counts = np.tile([3, 2], (len(frame), 1))
    settings = {"votes_per_item": 5, "seed": 0}
    want = [first_answer_token(name, tok, a) for a in builder.answers]
    # one pass per item (the default with single-token answers): the prompt and each choice's target token
    rows = training.training_rows("votes", tok, builder, frame, prompts, counts, answers, settings)
    for row, prompt in zip(rows, prompts, strict=True):
        assert row["input_ids"] == prompt.ids and row["answer_ids"] == want
    # one sequence per sampled answer (the path for multi-token answers): prompt + the same target token
    rows = training.training_rows("votes", tok, builder, frame, prompts, counts, answers, settings, one_pass=False)
    sampled = training.vote_examples(counts, 5, 0)
    sequences = [
        (i, seq, lab) for i, row in enumerate(rows) for seq, lab in zip(row["sequences"], row["labels"], strict=True)
    ]
    assert len(sequences) == len(sampled) == 5 * len(frame)
    for (i, j), (k, seq, labels) in zip(sampled, sequences, strict=True):
        assert k == i and seq == [*prompts[i].ids, want[j]] and labels[-1] == want[j]
        assert labels[:-1] == [-100] * len(prompts[i].ids)
    # never SentencePiece's byte token for a letter (<0x41>), which no model writes after its chat template
    assert not any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(want)), tok.convert_ids_to_tokens(want)


def test_votes_target_fails_loudly_when_the_answer_turn_starts_elsewhere(real, processed):
    _, tok, _, _ = real
    builder = builders(processed, "dilemmas", 0, False)
    frame = pd.read_parquet(processed["dilemmas"] / "dev.parquet").head(2)
    answers = ex.answer_variants(tok, builder.answers)
    template = tok.chat_template
    # a template that writes something of its own before the assistant's content
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '[' + m['content'] + ']' }}"
        "{% else %}{{ m['content'] + '\\n' }}{% endif %}{% endfor %}"
    )
    try:
        with pytest.raises(ValueError, match="answer"):
            training.answer_targets(builder, tok, frame.iloc[0], builder.encode(tok, frame.iloc[0]), answers)
    finally:
        tok.chat_template = template


def test_answer_variants_of_real_tokenizers(real):
    name, tok, _, _ = real
    answers = ex.answer_variants(tok, ["Yes", "No"])
    assert answers.single_token, name
    found = {s for strings in answers.variant_strings for s in strings}
    # every family has the bare and the lower-case forms as single tokens
    assert {"Yes", "yes", "No", "no"} <= {s.strip() for s in found}
    if name.startswith("llama"):
        assert " Yes" in found and "Yes" in found  # byte-level BPE: the space is part of the token
    letters = ex.answer_variants(tok, ["A", "B"])
    assert letters.single_token and not any("a" == s.strip() for v in letters.variant_strings for s in v)


def test_engine_agrees_with_naive_reference_on_real_tokenizers(real):
    _, tok, model, texts = real
    answers = ex.answer_variants(tok, ["Yes", "No"])
    ids = [encode_text(tok, t) for t in texts]
    got = ex.Scorer(model, tok.pad_token_id, 10**9, 3).score_tokens(ids, answers)
    want = np.stack([naive_logp(model, i, answers.variants) for i in ids])
    np.testing.assert_allclose(got, want, atol=1e-5)
    # coverage is the mass on the answers' variants, exactly (the reference sums the same probabilities)
    coverage, _ = ex.normalise(got)
    np.testing.assert_allclose(coverage, np.exp(want).sum(1), rtol=1e-5)


def test_joint_tokenization_at_the_boundary(real):
    _name, tok, model, texts = real
    raw = texts[0].rstrip()
    for answer in (" Yes", " Not at all"):
        ctx, cont = ex.continuation(tok, raw, answer)
        assert ctx + cont == encode_text(tok, raw + answer)
        assert tok.decode(cont).strip() == answer.strip()
    # a prompt ending in a space: the space belongs to the answer's token, as the tokenizer would merge it
    ctx, cont = ex.continuation(tok, "Answer: ", "Yes")
    assert ctx == encode_text(tok, "Answer:")
    assert len(cont) == 1 and cont[0] in ex.answer_variants(tok, ["Yes", "No"]).variants[0]
    pairs = [ex.continuation(tok, t, " Not at all") for t in texts[:3]]
    got = ex.Scorer(model, tok.pad_token_id).score_sequences(pairs)
    np.testing.assert_allclose(got, [naive_sequence(model, c, k) for c, k in pairs], atol=1e-4)
