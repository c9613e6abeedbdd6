"""Tiny random BERT and RoBERTa encoders, with a tokenizer trained on the sample's train split.

The demo and the tests cannot download bert-large-uncased or roberta-large. They build a ``BertModel`` or
``RobertaModel`` (with its pooler, like the real checkpoints) of a few thousand parameters per layer from a seed,
and a tokenizer of the real family's kind trained on the TRAIN text of the sample archives only (dev and test text
never shapes the vocabulary): lower-cased WordPiece with ``[CLS] A [SEP] B [SEP]`` for BERT, byte-level BPE with
``<s> A </s></s> B </s>`` for RoBERTa. Both are saved with ``save_pretrained`` and loaded back by the same
``from_pretrained`` code as the real models (:mod:`moralign.encoder_model`), which adds the task's head.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from moralign.data import ARCHIVES, member_name
from moralign.tinyspec import shape

# Special tokens in each family's spelling and order (bert-large-uncased's vocab.txt, roberta-large's vocab.json).
_SPECIALS = {
    "bert": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
    "roberta": {"cls": "<s>", "pad": "<pad>", "sep": "</s>", "unk": "<unk>", "mask": "<mask>"},
}


def train_texts(archives: Iterable[str | Path]) -> Iterator[str]:
    """Every text field of the train split of each sample archive (titles, stories, action descriptions)."""
    for path in archives:
        with tarfile.open(path) as tar:
            names = set(tar.getnames())
            for archive in ARCHIVES:
                member = member_name(archive, "train")
                if member not in names:
                    continue
                for line in tar.extractfile(member).read().decode().splitlines():
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if "actions" in rec:
                        yield from (a["description"] for a in rec["actions"])
                    else:
                        yield rec["title"]
                        yield rec["text"]


def train_tokenizer(texts: Iterable[str], architecture: str, vocab_size: int) -> Any:
    """A BERT-style (uncased WordPiece) or RoBERTa-style (byte-level BPE) tokenizer trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    names = _SPECIALS[architecture]
    specials = list(names.values())
    if architecture == "bert":
        normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        vocab = wordpiece_vocab(texts, normalizer, pre_tokenizer, specials, vocab_size)
        tok = Tokenizer(models.WordPiece(vocab, unk_token=names["unk"]))
        tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = (names["cls"], tok.token_to_id(names["cls"])), (names["sep"], tok.token_to_id(names["sep"]))
    if architecture == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[cls, sep]
        )
    else:
        tok.post_processor = processors.RobertaProcessing(sep, cls, add_prefix_space=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, **{f"{role}_token": token for role, token in names.items()}, model_max_length=512
    )


def wordpiece_vocab(
    texts: Iterable[str], normalizer: Any, pre_tokenizer: Any, specials: list[str], vocab_size: int
) -> dict[str, int]:
    """A WordPiece vocabulary built deterministically.

    Specials, every character (alone and as a ``##`` suffix), then the most frequent words (ties by spelling) up
    to ``vocab_size``. Not the tokenizers library's WordPieceTrainer: it breaks ties between equally frequent
    merges in a hash order that changes from process to process, so the same sample gave a different vocabulary
    (and different numbers) on every build. WordPiece's greedy longest-match encoding works with any vocabulary.
    """
    from collections import Counter

    counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    chars = sorted({c for word in counts for c in word})
    tokens = list(dict.fromkeys([*specials, *chars, *(f"##{c}" for c in chars)]))
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(tokens) >= vocab_size:
            break
        if len(word) > 1:
            tokens.append(word)
    return {token: i for i, token in enumerate(tokens)}


def build_tiny_encoder(spec: dict[str, Any], archives: Iterable[str | Path], out_dir: str | Path) -> None:
    """Build a tiny random encoder per ``spec`` (the config's ``models.<name>.build``) and save it to ``out_dir``."""
    import torch
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    architecture = spec["architecture"]
    tokenizer = train_tokenizer(train_texts(archives), architecture, spec["vocab_size"])
    common = shape(spec, len(tokenizer), tokenizer.pad_token_id)
    torch.manual_seed(spec["seed"])
    if architecture == "bert":
        model = BertModel(BertConfig(max_position_embeddings=512, type_vocab_size=2, **common))
    else:
        # RoBERTa numbers positions from padding_idx + 1, hence 512 + 2 (as roberta-large's config.json)
        config = RobertaConfig(
            max_position_embeddings=514,
            type_vocab_size=1,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            **common,
        )
        model = RobertaModel(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
