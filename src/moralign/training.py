"""LoRA / QLoRA fine-tuning toward human vote distributions: the recipes' rows, losses and adapters.

Two recipes (docs/design.md, "Fine-tuning"), both on prompts rendered and tokenized exactly as extraction does
(both call ``moralign.prompts.PromptBuilder.encode``: one BOS where due, over-long items shortened inside the
template):

* ``votes`` — the paper's text-to-text SFT: prompt -> answer, the loss being the negative log-likelihood of the
  answer tokens. Each training item gets ``votes_per_item`` = K answers drawn from its vote distribution by
  systematic sampling (one random offset per item): answer j appears K·h_j times in expectation (exactly y_j
  times when K equals the item's vote total), so the expected loss is the soft-label cross-entropy on the answer
  tokens, every item weighs the same however many votes it has, and the data stays bounded for items with
  thousands. The target is the token the model would produce: the first token of the answer as the tokenizer
  encodes the whole conversation (prompt + the assistant's answer turn, rendered by the chat template), checked
  to be one of the answer's variants (``answer_targets``). No EOS follows the answer: the loss is on the answer
  alone, the quantity extraction scores.
  With single-token answers (every task here) the K answers of an item share the prompt and sit at the same
  position, so they are ONE forward/backward pass: the loss at the answer position weighted by the sampled
  answers' shares (``vote_weights``) — the same loss and gradient as K duplicate rows, at 1/K of the cost
  (``tests/test_training.py`` checks the two paths agree). Answers of several tokens keep one row per sampled
  answer, through trl's own loss (the ``rows`` path).
* ``soft`` — the loss is -sum_j h_j log P(choice j): the human shares h against the model's full-vocabulary
  probability of each choice at the answer position, its training variants summed and NOT renormalised over the
  choices. It equals the cross-entropy of the renormalised distribution (what the metrics score) minus
  log(coverage), so the model is trained both to say an answer and to split its mass as the humans do.
  Renormalising alone would be blind to a constant added to every answer logit: nothing would push mass onto the
  answers, and the tiny demo models stopped answering (coverage 0.01). Training mass goes only to the variants
  the model produces at that position (``training_variants``): the answer token of the encoded conversation and
  its plain-whitespace and case twins, never byte-fallback tokens or exotic spellings.

Both recipes see each training item once per epoch, so equal ``epochs``/``max_steps`` give them equal optimiser
budgets. The trainer that runs them (micro-batches, model selection, resumption) is moralign.trainer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from moralign.extraction import (
    AnswerTokens,
    continuation,
)
from moralign.prompts import EncodedPrompt, PromptBuilder

log = logging.getLogger(__name__)


def sampled_choices(counts: np.ndarray, per_item: int, seed: int) -> np.ndarray:
    """(items x per_item) answers per item by systematic sampling of its votes (one random offset per item)."""
    rng = np.random.default_rng(seed)
    probs = counts / counts.sum(axis=1, keepdims=True)
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = 1.0
    points = (rng.random(len(counts))[:, None] + np.arange(per_item)[None, :]) / per_item
    return (points[:, :, None] >= cdf[:, None, :]).sum(axis=2)


def vote_examples(counts: np.ndarray, per_item: int, seed: int) -> list[tuple[int, int]]:
    """(item, choice) training pairs: ``per_item`` answers per item by systematic sampling of its votes."""
    choices = sampled_choices(counts, per_item, seed)
    return [(i, int(c)) for i in range(len(counts)) for c in choices[i]]


def vote_weights(counts: np.ndarray, per_item: int, seed: int) -> np.ndarray:
    """(items x choices) share of each item's ``per_item`` sampled answers that are each choice (rows sum to 1)."""
    choices = sampled_choices(counts, per_item, seed)
    weights = np.zeros(counts.shape, dtype=np.float64)
    np.add.at(weights, (np.repeat(np.arange(len(counts)), per_item), choices.ravel()), 1.0)
    return weights / per_item


def choice_index(answers: AnswerTokens, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (choices x variants) token index and its validity mask."""
    width = max(len(v) for v in answers.variants)
    index = torch.zeros((len(answers.variants), width), dtype=torch.long)
    valid = torch.zeros_like(index, dtype=torch.bool)
    for j, v in enumerate(answers.variants):
        index[j, : len(v)] = torch.tensor(v)
        valid[j, : len(v)] = True
    return index.to(device), valid.to(device)


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (a bf16 log-softmax over 128k tokens loses the small probabilities)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def answer_logprobs(last_logits: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Log P(choice j) over the full vocabulary, variants summed, NOT renormalised: (batch, choices)."""
    logp = torch.log_softmax(upcast(last_logits), dim=-1)
    picked = logp[:, index].masked_fill(~valid, -torch.inf)
    return torch.logsumexp(picked, dim=-1)


def choice_logprobs(last_logits: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Log p over the choices (renormalised, what extraction reports) from the logits at the answer position."""
    return torch.log_softmax(answer_logprobs(last_logits, index, valid), dim=-1)


def soft_losses(
    last_logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Per item: -sum_j target_j log P(choice j), P unnormalised (= renormalised cross-entropy - log coverage)."""
    return -(target * answer_logprobs(last_logits, index, valid)).sum(-1)


# sentencepiece byte-fallback pieces (<0x41> decodes to "A"): a spelling no model writes as its answer
BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
ASCII_SPACE = " \t\n\r"


def _plain_variant(decoded: str, piece: str, answer: str) -> bool:
    """The answer word itself, in another case (words of 2+ letters) or with plain ASCII whitespace around it."""
    if BYTE_TOKEN.match(piece):
        return False
    word = decoded.strip(ASCII_SPACE)
    return word == answer or (len(answer) > 1 and word.lower() == answer.lower() and word.isascii())


def training_variants(tokenizer: Any, answers: AnswerTokens, targets: Iterable[Iterable[int]] = ()) -> AnswerTokens:
    """The variants of each answer that receive the soft recipe's training mass.

    Of extraction's variants (which keep every spelling, so that the reading misses no mass), only those the model
    produces at the answer position: every token in ``targets`` (per item, the answer token of the encoded
    conversation, ``answer_targets``) and the variants that are the answer word with plain ASCII whitespace
    around it or in another case (not for one-letter answers, as extraction). Never a byte-fallback token
    (``<0x41>``) or a spelling with other characters (a no-break space): mass put there is mass on no answer a
    reader would see.
    """
    wanted = [set() for _ in answers.answers]
    for item in targets:
        for j, token in enumerate(item):
            wanted[j].add(int(token))
    variants, strings = [], []
    for j, answer in enumerate(answers.answers):
        keep = [
            (v, s)
            for v, s in zip(answers.variants[j], answers.variant_strings[j], strict=True)
            if v in wanted[j] or _plain_variant(s, tokenizer.convert_ids_to_tokens(v), answer)
        ]
        if not keep:
            raise ValueError(f"answer {answer!r}: none of its token variants {answers.variant_strings[j]} is plain")
        variants.append(tuple(v for v, _ in keep))
        strings.append(tuple(s for _, s in keep))
    return AnswerTokens(answers.answers, tuple(variants), tuple(strings))


def votes_losses(last_logits: torch.Tensor, target: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """Per item: the K sampled answers' mean NLL at the answer position (``target`` = their shares per choice).

    Full-vocabulary log-softmax, as SFT's loss: the same value as the mean loss of K rows, one per sampled answer.
    """
    logp = torch.log_softmax(upcast(last_logits), dim=-1)
    return -(target * logp.gather(1, answer_ids)).sum(-1)


def encode_items(builder: PromptBuilder, tokenizer: Any, frame: Any, max_length: int | None) -> list[EncodedPrompt]:
    """The prompts of a split's items, as extraction encodes them (the same function, the same ``max_length`` rule)."""
    return [builder.encode(tokenizer, row, max_length) for _, row in frame.iterrows()]


def answer_targets(
    builder: PromptBuilder, tokenizer: Any, row: Any, prompt: EncodedPrompt, answers: AnswerTokens
) -> list[int]:
    """Per choice, the token the model would produce: the first answer token of the encoded whole conversation.

    The conversation is the prompt as scored followed by the assistant's answer turn as the chat template writes
    it (``PromptBuilder.encode_conversation``; raw text: a space and the answer), encoded like every prompt. Its ids
    must continue the prompt's ids, and the next one must be a variant of the answer; anything else is an error.
    """
    targets = []
    for j, answer in enumerate(answers.answers):
        whole = builder.encode_conversation(tokenizer, row, prompt, answer)
        n = len(prompt.ids)
        if whole[:n] != prompt.ids or len(whole) == n:
            raise ValueError(
                f"item {row['id']}: the conversation answered {answer!r} does not continue the prompt's tokens "
                f"(the answer merges with the prompt's last token)"
            )
        if whole[n] not in answers.variants[j]:
            raise ValueError(
                f"item {row['id']}: the answer turn {answer!r} starts with token {whole[n]} "
                f"({tokenizer.decode([whole[n]])!r}), which is not one of the answer's variants {answers.variants[j]}"
            )
        targets.append(whole[n])
    return targets


def soft_training_answers(
    builder: PromptBuilder,
    tokenizer: Any,
    items: Any,
    prompts: list[EncodedPrompt],
    answers: AnswerTokens,
    sample: int = 32,
) -> AnswerTokens:
    """``training_variants`` with the answer tokens of the encoded conversations of the first ``sample`` items.

    The token that starts the assistant's answer turn is the template's, not the item's: a sample of items shows
    it (and ``answer_targets`` checks each one is a variant of its answer).
    """
    rows = [row for _, row in items.head(sample).iterrows()]
    targets = [answer_targets(builder, tokenizer, r, p, answers) for r, p in zip(rows, prompts, strict=False)]
    return training_variants(tokenizer, answers, targets)


def soft_rows(prompts: list[list[int]], human: np.ndarray) -> list[dict[str, Any]]:
    """``soft`` rows: the prompt and the human distribution over the choices."""
    return [{"input_ids": ids, "target": h.tolist()} for ids, h in zip(prompts, human, strict=True)]


def vote_rows(prompts: list[list[int]], weights: np.ndarray, targets: list[list[int]]) -> list[dict[str, Any]]:
    """One-pass ``votes`` rows: the prompt, each choice's answer token and its share of the sampled answers."""
    return [
        {"input_ids": ids, "target": w.tolist(), "answer_ids": t}
        for ids, w, t in zip(prompts, weights, targets, strict=True)
    ]


def training_rows(
    objective: str,
    tokenizer: Any,
    builder: PromptBuilder,
    items: Any,
    prompts: list[EncodedPrompt],
    counts: np.ndarray,
    answers: AnswerTokens,
    settings: dict[str, Any],
    one_pass: bool | None = None,
) -> list[dict[str, Any]]:
    """One training row per item of ``items`` (a split's rows; ``prompts`` = ``encode_items`` of them).

    ``soft``: the prompt and the human distribution. ``votes``: with single-token answers (``one_pass``, the
    default when possible) the prompt, the answer token of each choice and the shares of the item's sampled
    answers; otherwise (the rows path) the item's ``votes_per_item`` sequences, prompt + sampled answer each,
    with ``labels`` -100 on the prompt (trl's SFT loss is then on the answer tokens only).
    """
    if objective == "soft":
        return soft_rows([p.ids for p in prompts], counts / counts.sum(axis=1, keepdims=True))
    one_pass = answers.single_token if one_pass is None else one_pass
    if one_pass and not answers.single_token:
        raise ValueError(f"one-pass votes needs single-token answers; {answers.answers} are not")
    rows = [row for _, row in items.iterrows()]
    per_item, seed = settings["votes_per_item"], settings["seed"]
    if answers.single_token:
        targets = [answer_targets(builder, tokenizer, r, p, answers) for r, p in zip(rows, prompts, strict=True)]
    if one_pass:
        return vote_rows([p.ids for p in prompts], vote_weights(counts, per_item, seed), targets)
    sep = "" if builder.chat else " "
    out = [{"sequences": [], "labels": []} for _ in rows]
    for i, j in vote_examples(counts, per_item, seed):
        if answers.single_token:
            ctx, cont = prompts[i].ids, [targets[i][j]]
        else:
            # the continuation route extraction scores: the answer tokenized jointly with the prompt text
            ctx, cont = continuation(tokenizer, prompts[i].text, sep + answers.answers[j], prompts[i].plain)
        out[i]["sequences"].append(ctx + cont)
        out[i]["labels"].append([-100] * len(ctx) + cont)
    return out


def lora_config(settings: dict[str, Any]) -> Any:
    """Peft LoraConfig from the recipe's hyperparameters."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings["lora_r"],
        lora_alpha=settings["lora_alpha"],
        lora_dropout=settings["lora_dropout"],
        target_modules=settings["target_modules"],
        modules_to_save=settings["modules_to_save"] or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def wrap_lora(model: Any, settings: dict[str, Any], quantized: bool) -> Any:
    """Attach fresh LoRA adapters (after k-bit preparation for QLoRA).

    ``settings["gradient_checkpointing"]`` is the resolved choice (``memory_plan``), a boolean.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(settings["gradient_checkpointing"]),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return get_peft_model(model, lora_config(settings))
