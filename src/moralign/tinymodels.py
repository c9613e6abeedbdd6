"""Tiny random models of the real architectures, with a tokenizer trained on the sample text.

The demo and the tests cannot download Llama or Mistral weights. They build a LlamaForCausalLM or
MistralForCausalLM with a few thousand parameters per layer, a BPE tokenizer trained on the sample's text and
a chat template in the real model's official format, save them with ``save_pretrained`` and load them back
through the same ``from_pretrained(path)`` code the real models use.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

# Chat templates in each model family's official format (written here, not downloaded).
CHAT_FORMATS: dict[str, dict[str, Any]] = {
    # Llama 3 / 3.1 Instruct: header tokens, <|eot_id|> after every turn, system role supported.
    "llama3": {
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "extra": ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
        "byte_level": True,
        "template": (
            "{{ bos_token }}{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
            " + '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
        ),
    },
    # Mistral-7B-Instruct v0.3: [INST] ... [/INST]; no system role (the template raises on one).
    "mistral": {
        "bos": "<s>",
        "eos": "</s>",
        "extra": ["[INST]", "[/INST]"],
        "byte_level": False,
        "template": (
            "{{ bos_token }}{% for message in messages %}"
            "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
            "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
            "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
        ),
    },
    # Zephyr-7B-beta: <|system|>/<|user|>/<|assistant|> turns closed by </s>.
    "zephyr": {
        "bos": "<s>",
        "eos": "</s>",
        "extra": ["<|system|>", "<|user|>", "<|assistant|>"],
        "byte_level": False,
        "template": (
            "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        ),
    },
}
PAD = "<pad>"
UNK = "<unk>"


def sample_corpus(archives: Iterable[str | Path]) -> Iterator[str]:
    """Every text field of the sample archives (titles, stories, actions), for tokenizer training."""
    import json

    for archive in archives:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if not member.name.endswith(".jsonl"):
                    continue
                for line in tar.extractfile(member).read().decode().splitlines():
                    rec = json.loads(line)
                    if "text" in rec:
                        yield rec["title"]
                        yield rec["text"]
                    else:
                        yield from (a["description"] for a in rec["actions"])


def train_tokenizer(texts: Iterable[str], chat_format: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer: byte-level like Llama 3's, or SentencePiece-style (metaspace) like Mistral's."""
    fmt = CHAT_FORMATS[chat_format]
    specials = [fmt["bos"], fmt["eos"], PAD, UNK, *fmt["extra"]]
    if fmt["byte_level"]:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=False))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    # Question and answer words of the default prompts are part of the corpus, so "Yes", " Yes" etc. exist.
    prompt_words = ["Yes No yes no A B Answer: Is the author in the wrong? Which action is less ethical?"] * 200
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator([*prompt_words, *texts], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=fmt["bos"],
        eos_token=fmt["eos"],
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=fmt["extra"],
        chat_template=fmt["template"],
    )


def build_tiny_model(spec: dict[str, Any], archives: Iterable[str | Path], out_dir: str | Path) -> None:
    """Build a tiny random model per ``spec`` (the config's ``models.<name>.build``) and save it to ``out_dir``."""
    tokenizer = train_tokenizer(sample_corpus(archives), spec["chat_format"], spec["vocab_size"])
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec["seed"])
    if spec["architecture"] == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
