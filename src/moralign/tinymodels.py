"""Tiny random models of the real architectures, with a tokenizer trained on the sample's train text.

The demo and the tests cannot download Llama or Mistral weights. They build a LlamaForCausalLM or
MistralForCausalLM with a few thousand parameters per layer, a BPE tokenizer trained on the sample's TRAIN text
and the real model's published chat template (``chat_templates/``), save them with ``save_pretrained`` and
load them back through the same ``from_pretrained(path)`` code the real models use.
"""

from __future__ import annotations

import string
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from moralign.tinyspec import shape

TEMPLATE_DIR = Path(__file__).with_name("chat_templates")


def published_template(model: str) -> str:
    """A paper model's published chat template (``chat_templates/<model>.jinja``; sources in its README)."""
    return (TEMPLATE_DIR / f"{model}.jinja").read_text()


# Each family: its special tokens and the REAL published chat template of the paper model of that family, so a
# tiny model renders exactly like the real one. "extra" = the special tokens the template writes (each one id).
CHAT_FORMATS: dict[str, dict[str, Any]] = {
    # Llama-3.1-8B-Instruct: header tokens, <|eot_id|> after every turn (<|eom_id|>, <|python_tag|> for tools).
    "llama3": {
        "model": "llama-3.1-8b-instruct",
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "extra": ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>", "<|eom_id|>", "<|python_tag|>"],
        "markup": "",
        "byte_level": True,
    },
    # Mistral-7B-Instruct-v0.3: [INST] ... [/INST] control tokens, system text in the last user turn.
    "mistral": {
        "model": "mistral-7b-instruct-v0.3",
        "bos": "<s>",
        "eos": "</s>",
        "extra": [
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ],
        "markup": "\n\n",
        "byte_level": False,
    },
    # Zephyr-7B-beta: <|system|>/<|user|>/<|assistant|> turns closed by </s>. Those tags are plain text in
    # Zephyr's tokenizer, not special tokens, so their characters go into the tokenizer's training text.
    "zephyr": {
        "model": "zephyr-7b-beta",
        "bos": "<s>",
        "eos": "</s>",
        "extra": [],
        "markup": "<|system|>\n<|user|>\n<|assistant|>\n",
        "byte_level": False,
    },
}
PAD = "<pad>"
UNK = "<unk>"


def sample_corpus(archives: Iterable[str | Path]) -> Iterator[str]:
    """Every text field of the TRAIN split of the sample archives (titles, stories, actions), for tokenizer training.

    Only train: a vocabulary fitted to dev or test text would leak the evaluation items into the model.
    """
    import json

    for archive in archives:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if not Path(member.name).name.startswith("train."):
                    continue
                for line in tar.extractfile(member).read().decode().splitlines():
                    rec = json.loads(line)
                    if "text" in rec:
                        yield rec["title"]
                        yield rec["text"]
                        if rec.get("action"):
                            yield rec["action"]["description"]
                    else:
                        yield from (a["description"] for a in rec["actions"])


def train_tokenizer(texts: Iterable[str], chat_format: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer: byte-level like Llama 3's, or SentencePiece-style (metaspace) like Mistral's.

    Like the real ones, it prepends BOS by default (its post-processor) and carries its family's published chat
    template; every special token that template writes is one token.
    """
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
        # newlines are tokens of their own (as SentencePiece's byte fallback makes them), so no merge crosses one
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")]
        )
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        # every printable ASCII character is a token, so no prompt text (system text, shots) maps to <unk>
        alphabet = list(string.printable)
    # Question and answer words of the default prompts are part of the corpus, so "Yes", " Yes" etc. exist; so is
    # the text of the chat template's plain-text markup (Zephyr's tags, newlines), so it never maps to <unk>.
    prompt_words = ["Yes No yes no A B Answer: Is the author in the wrong? Which action is less ethical?"] * 200
    markup = [fmt["markup"]] * 50 if fmt["markup"] else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator([*prompt_words, *markup, *texts], trainer=trainer)
    bos = fmt["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=fmt["eos"],
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=fmt["extra"],
        chat_template=published_template(fmt["model"]),
    )


def build_tiny_model(spec: dict[str, Any], archives: Iterable[str | Path], out_dir: str | Path) -> None:
    """Build a tiny random model per ``spec`` (the config's ``models.<name>.build``) and save it to ``out_dir``."""
    tokenizer = train_tokenizer(sample_corpus(archives), spec["chat_format"], spec["vocab_size"])
    common = dict(
        **shape(spec, len(tokenizer), tokenizer.pad_token_id),
        num_key_value_heads=spec["num_kv_heads"],
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
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
