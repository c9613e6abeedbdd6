"""The engine with the REAL tokenizers of the three paper models, each paired with a tiny random model.

The tokenizer files ship on PyPI: Llama 3's tiktoken BPE in `llama-models`, Mistral-7B v0.1's SentencePiece
model (Zephyr-7B-beta's tokenizer) and Mistral-7B-Instruct v0.3's in `mistral-common`. Chat templates are
written by the project in each model's official format (moralign.tinymodels.CHAT_FORMATS).
"""

import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from moralign import extraction as ex
from moralign.data import TASKS
from moralign.prompts import PromptBuilder
from moralign.tinymodels import CHAT_FORMATS
from tests.test_extraction import naive_logp, naive_sequence

pytest.importorskip("mistral_common")
pytest.importorskip("llama_models")

SPEC = {
    "system": "Judge like a typical reader.",
    "template": "Title: {title}\n{text}\n\nIs the author in the wrong?",
    "answers": ["Yes", "No"],
    "n_shots": 0,
    "shot_seed": 0,
}


def llama3_tokenizer(folder):
    from llama_models.llama3.tokenizer import Tokenizer
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = Path(str(resources.files("llama_models") / "llama3" / "tokenizer.model"))
    reference = Tokenizer(path)
    converted = TikTokenConverter(vocab_file=str(path), pattern=reference.pat_str).converted()
    # Meta's 256 special tokens follow the 128,000 BPE ranks, in id order
    specials = sorted(reference.special_tokens.items(), key=lambda kv: kv[1])
    assert converted.get_vocab_size() == specials[0][1]
    converted.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=converted,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        chat_template=CHAT_FORMATS["llama3"]["template"],
    )
    # the conversion must reproduce Meta's own tokenizer, chat markup included
    chat = tok.apply_chat_template(
        [{"role": "system", "content": "Be fair."}, {"role": "user", "content": "AITA?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert tok(chat, add_special_tokens=False)["input_ids"] == reference.encode(
        chat, bos=False, eos=False, allowed_special="all"
    )
    assert len(tok) == reference.n_words == 128256
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def sentencepiece_tokenizer(folder, filename, chat_format):
    src = resources.files("mistral_common") / "data" / filename
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, folder / "tokenizer.model")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_FORMATS[chat_format]["template"]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


CASES = {
    "llama-3.1 (tiktoken)": ("llama", lambda d: llama3_tokenizer(d)),
    "zephyr / mistral v0.1 (sentencepiece)": (
        "mistral",
        lambda d: sentencepiece_tokenizer(d, "tokenizer.model.v1", "zephyr"),
    ),
    "mistral v0.3 (sentencepiece)": (
        "mistral",
        lambda d: sentencepiece_tokenizer(d, "mistral_instruct_tokenizer_240323.model.v3", "mistral"),
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
    builder = PromptBuilder(TASKS["anecdotes"], SPEC, chat=True)
    texts = [builder.render(tok, r) for _, r in frame.iterrows()]
    return request.param, tok, model, texts


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
    ids = ex.encode_prompts(tok, texts, chat=True)
    got = ex.Scorer(model, tok.pad_token_id, 10**9, 3).score_tokens(ids, answers)
    want = np.stack([naive_logp(model, i, answers.variants) for i in ids])
    np.testing.assert_allclose(got, want, atol=1e-5)
    coverage, _ = ex.normalise(got)
    assert ((coverage > 0) & (coverage < 1)).all()


def test_joint_tokenization_at_the_boundary(real):
    _name, tok, model, texts = real
    raw = texts[0].rstrip()
    for answer in (" Yes", " Not at all"):
        ctx, cont = ex.continuation(tok, raw, answer, add_special_tokens=False)
        assert ctx + cont == tok(raw + answer, add_special_tokens=False)["input_ids"]
        assert tok.decode(cont).strip() == answer.strip()
    # a prompt ending in a space: the space belongs to the answer's token, as the tokenizer would merge it
    ctx, cont = ex.continuation(tok, "Answer: ", "Yes", add_special_tokens=False)
    assert ctx == tok("Answer:", add_special_tokens=False)["input_ids"]
    assert len(cont) == 1 and cont[0] in ex.answer_variants(tok, ["Yes", "No"]).variants[0]
    pairs = [ex.continuation(tok, t, " Not at all", add_special_tokens=False) for t in texts[:3]]
    got = ex.Scorer(model, tok.pad_token_id).score_sequences(pairs)
    np.testing.assert_allclose(got, [naive_sequence(model, c, k) for c, k in pairs], atol=1e-4)
