"""LoRA / QLoRA fine-tuning toward human vote distributions, through trl's SFTTrainer.

Two recipes (design.md §4), both on prompts rendered and tokenized exactly as extraction does (both call
``moralign.prompts.PromptBuilder.encode``: one BOS where due, over-long items shortened inside the template):

* ``votes`` — the paper's text-to-text SFT: prompt -> answer text, completion-only loss. Each training item
  becomes ``votes_per_item`` examples whose answers are drawn from its vote distribution by systematic
  sampling (one random offset per item): answer j appears K·h_j times in expectation (exactly y_j times when
  K equals the item's vote total), so the expected loss is the soft-label cross-entropy on the answer tokens,
  every item weighs the same however many votes it has, and the data stays bounded for items with thousands.
  The target is the token the model would produce: the first token of the answer as the tokenizer encodes the
  whole conversation (prompt + the assistant's answer turn, rendered by the chat template), checked to be one
  of the answer's variants (``answer_targets``).
* ``soft`` — the loss is the cross-entropy between the human distribution h and the model's distribution over
  the choices at the answer position (variants summed, renormalised): exactly what the metrics score.

Model selection: dev ``xentropy`` (computed by the extraction engine) every ``eval_steps``; the best checkpoint
is kept. Checkpoints live beside the output, so a killed job resumes from its last one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moralign.extraction import AnswerTokens, Scorer, continuation, normalise, pad_batch
from moralign.prompts import EncodedPrompt, PromptBuilder, encode_text

log = logging.getLogger(__name__)


def vote_examples(counts: np.ndarray, per_item: int, seed: int) -> list[tuple[int, int]]:
    """(item, choice) training pairs: ``per_item`` answers per item by systematic sampling of its votes."""
    rng = np.random.default_rng(seed)
    probs = counts / counts.sum(axis=1, keepdims=True)
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = 1.0
    points = (rng.random(len(counts))[:, None] + np.arange(per_item)[None, :]) / per_item
    choices = (points[:, :, None] >= cdf[:, None, :]).sum(axis=2)
    return [(i, int(c)) for i in range(len(counts)) for c in choices[i]]


def choice_index(answers: AnswerTokens, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (choices x variants) token index and its validity mask."""
    width = max(len(v) for v in answers.variants)
    index = torch.zeros((len(answers.variants), width), dtype=torch.long)
    valid = torch.zeros_like(index, dtype=torch.bool)
    for j, v in enumerate(answers.variants):
        index[j, : len(v)] = torch.tensor(v)
        valid[j, : len(v)] = True
    return index.to(device), valid.to(device)


def choice_logprobs(last_logits: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Log p over the choices (renormalised) from the logits at the answer position: (batch, choices)."""
    logp = torch.log_softmax(last_logits.float(), dim=-1)
    picked = logp[:, index].masked_fill(~valid, -torch.inf)
    logp_choice = torch.logsumexp(picked, dim=-1)
    return torch.log_softmax(logp_choice, dim=-1)


@dataclass
class SoftCollator:
    """Batches prompts with their target distributions for the ``soft`` recipe."""

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Left-padded prompts plus a ``target`` (batch x choices) tensor."""
        batch = pad_batch([f["input_ids"] for f in features], self.pad_id)
        batch["target"] = torch.tensor(np.array([f["target"] for f in features]), dtype=torch.float32)
        return batch


def dev_xentropy(model: Any, pad_id: int, prompts: list[list[int]], answers: AnswerTokens, human: np.ndarray) -> float:
    """Soft-label cross-entropy of the model's choice distribution on dev prompts (the selection metric)."""
    was_training = model.training
    model.eval()
    logp = Scorer(model, pad_id, token_budget=8192, max_batch_size=32).score_tokens(prompts, answers)
    model.train(was_training)
    _, p = normalise(logp)
    return float(-(human * np.log(np.clip(p, 1e-300, None))).sum(axis=1).mean())


def build_trainer(
    objective: str,
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    dev: tuple[list[list[int]], np.ndarray],
    answers: AnswerTokens,
    settings: dict[str, Any],
    output_dir: Path,
    device: torch.device,
) -> Any:
    """An SFTTrainer (subclass) for ``objective`` with dev-xentropy model selection."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dev_prompts, dev_human = dev
    pad_id = tokenizer.pad_token_id
    index, valid = choice_index(answers, device)

    class MoralignTrainer(SFTTrainer):
        """Evaluates dev xentropy with the extraction engine; ``soft`` overrides the loss."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if objective != "soft":
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            target = inputs.pop("target")
            out = model(**inputs, logits_to_keep=1, use_cache=False)
            loss = -(target * choice_logprobs(out.logits[:, -1], index, valid)).sum(-1).mean()
            return (loss, out) if return_outputs else loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            metrics = {
                f"{metric_key_prefix}_xentropy": dev_xentropy(self.model, pad_id, dev_prompts, answers, dev_human)
            }
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    on_cuda = device.type == "cuda"
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=settings["max_steps"] if settings["max_steps"] > 0 else -1,
        num_train_epochs=settings["epochs"],
        per_device_train_batch_size=settings["batch_size"],
        gradient_accumulation_steps=settings["grad_accum"],
        learning_rate=settings["learning_rate"],
        lr_scheduler_type=settings["lr_scheduler"],
        warmup_steps=settings["warmup_ratio"],
        seed=settings["seed"],
        data_seed=settings["seed"],
        eval_strategy="steps",
        eval_steps=settings["eval_steps"],
        save_strategy="steps",
        save_steps=settings["eval_steps"],
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="xentropy",
        greater_is_better=False,
        logging_steps=max(1, settings["eval_steps"] // 4),
        report_to="none",
        bf16=on_cuda,
        use_cpu=not on_cuda,
        gradient_checkpointing=settings["gradient_checkpointing"] and on_cuda,
        max_length=None,  # prompts are shortened by the project (inside the template), never the answer
        completion_only_loss=True,
        dataset_kwargs={"skip_prepare_dataset": objective == "soft"},
        remove_unused_columns=objective != "soft",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    train = Dataset.from_list(train_rows)
    eval_stub = train.select(range(min(2, len(train))))  # Trainer requires one; evaluate() uses the dev prompts
    return MoralignTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=eval_stub,
        processing_class=tokenizer,
        data_collator=SoftCollator(pad_id) if objective == "soft" else None,
    )


def encode_items(builder: PromptBuilder, tokenizer: Any, frame: Any, max_length: int | None) -> list[EncodedPrompt]:
    """The prompts of a split's items, as extraction encodes them (the same function, the same ``max_length`` rule)."""
    return [builder.encode(tokenizer, row, max_length) for _, row in frame.iterrows()]


def answer_targets(
    builder: PromptBuilder, tokenizer: Any, row: Any, prompt: EncodedPrompt, answers: AnswerTokens
) -> list[int]:
    """Per choice, the token the model would produce: the first answer token of the encoded whole conversation.

    The conversation is the prompt as scored followed by the assistant's answer turn as the chat template writes
    it (``PromptBuilder.conversation``; raw text: a space and the answer), encoded like every prompt. Its ids must
    continue the prompt's ids, and the next one must be a variant of the answer; anything else is an error.
    """
    targets = []
    for j, answer in enumerate(answers.answers):
        whole = encode_text(tokenizer, builder.conversation(tokenizer, row, prompt.fields, answer))
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


def training_rows(
    objective: str,
    tokenizer: Any,
    builder: PromptBuilder,
    items: Any,
    prompts: list[EncodedPrompt],
    counts: np.ndarray,
    answers: AnswerTokens,
    settings: dict[str, Any],
) -> list[dict[str, Any]]:
    """Tokenized training examples of one recipe; ``prompts`` are ``encode_items`` of ``items`` (a split's rows)."""
    if objective == "soft":
        human = counts / counts.sum(axis=1, keepdims=True)
        return [{"input_ids": p.ids, "target": h.tolist()} for p, h in zip(prompts, human, strict=True)]
    rows = [row for _, row in items.iterrows()]
    sep = "" if builder.chat else " "
    targets: dict[int, list[int]] = {}
    examples = []
    for i, j in vote_examples(counts, settings["votes_per_item"], settings["seed"]):
        if answers.single_token:
            if i not in targets:
                targets[i] = answer_targets(builder, tokenizer, rows[i], prompts[i], answers)
            ctx, cont = prompts[i].ids, [targets[i][j]]
        else:
            # the continuation route extraction scores: the answer tokenized jointly with the prompt text
            ctx, cont = continuation(tokenizer, prompts[i].text, sep + answers.answers[j])
        examples.append({"input_ids": ctx + cont, "completion_mask": [0] * len(ctx) + [1] * len(cont)})
    return examples


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
    """Attach fresh LoRA adapters (after k-bit preparation for QLoRA)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings["gradient_checkpointing"])
    return get_peft_model(model, lora_config(settings))


def train(trainer: Any, checkpoints: Path) -> dict[str, Any]:
    """Run (or resume, from the last checkpoint in ``checkpoints``) training; returns steps, time and best dev."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last:
        log.info("resuming from the last checkpoint, %s", last)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    best = trainer.state.best_model_checkpoint
    return {
        "steps": trainer.state.global_step,
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "best_dev_xentropy": trainer.state.best_metric,
        "best_checkpoint": Path(best).name if best else None,
        "resumed_from_step": int(Path(last).name.split("-")[-1]) if last else None,
        "log_history": trainer.state.log_history,
    }
