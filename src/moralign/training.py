"""LoRA / QLoRA fine-tuning toward human vote distributions, through trl's SFTTrainer.

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
budgets.

Batches (``MoralignTrainer.training_step``): one optimiser step takes ``batch_size`` ITEMS, whatever the hardware.
They are length-sorted and split into micro-batches of at most ``token_budget`` padded tokens (as extraction
batches), each micro-batch's loss is its items' summed loss divided by the step's item count, and the gradients
add up: the step's gradient is the mean over its items however the items were split. Memory decides only the
split (and whether to recompute activations, ``memory_plan``), never the optimisation; a step that runs out of
CUDA memory is redone with half the budget. Shuffling, checkpoints and resumption are the Trainer's, per step.

Model selection: dev ``xentropy`` (computed by the extraction engine) every ``eval_steps`` and at the last step;
the best checkpoint is kept. Each evaluation's time is logged next to the training time. Checkpoints live beside
the output, so a killed job resumes from its last one.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moralign.extraction import (
    AnswerTokens,
    Scorer,
    common_prefix_length,
    continuation,
    make_batches,
    normalise,
    pad_batch,
)
from moralign.prompts import EncodedPrompt, PromptBuilder

log = logging.getLogger(__name__)

# Activation memory of training without gradient checkpointing, in bytes per token per (layer x hidden unit):
# the slope of the peak memory measured at the Llama-3.1-8B shape on an H200 (docs/performance.md, "Measured on a
# GPU"; commit 7e99624, LoRA on all linear layers, loss at the answer position): bf16 base 57 -> 98 GiB from 4,096
# to 8,192 tokens (82 B); 4-bit base (QLoRA keeps norms, embeddings and head in fp32) 134 GiB at 8,192 tokens
# over ~10 GiB of weights (124 B). Rounded up.
ACTIVATION_BYTES = {"bf16": 84, "4bit": 128}
# Below this many tokens per micro-batch an 8B-shape step stops filling the GPU (8 x 512 tokens reached 40.5 %
# MFU there, 16 x 512 41.7 %): ``memory_plan`` shrinks the budget down to it before it turns recomputation on.
MIN_EFFICIENT_BUDGET = 4096
# A prefix shared by a micro-batch's prompts is computed once when it is at least this long (as extraction does).
MIN_SHARED_PREFIX = 32
# Padded tokens per dev-evaluation batch: extraction's fastest budget at the 8B shape on an H200 (device.md).
DEV_TOKEN_BUDGET = 16384
# Share of the free memory the plan may use (allocator fragmentation, the CUDA context, temporaries).
MEMORY_HEADROOM = 0.85


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


@dataclass
class StepItems:
    """The rows of one optimiser step, untouched (a plain holder: accelerate would walk a list of lists)."""

    rows: list[dict[str, Any]]


@dataclass
class StepCollator:
    """Passes the items of one optimiser step through as they are: the trainer splits them into micro-batches."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """``{"items": StepItems(features)}``."""
        return {"items": StepItems(features)}


def dev_xentropy(
    model: Any,
    pad_id: int,
    prompts: list[list[int]],
    answers: AnswerTokens,
    human: np.ndarray,
    token_budget: int = 8192,
) -> float:
    """Soft-label cross-entropy of the model's choice distribution on dev prompts (the selection metric)."""
    was_training = model.training
    model.eval()
    logp = Scorer(model, pad_id, token_budget=token_budget, max_batch_size=256).score_tokens(prompts, answers)
    model.train(was_training)
    _, p = normalise(logp)
    return float(-(human * np.log(np.clip(p, 1e-300, None))).sum(axis=1).mean())


def memory_plan(
    setting: bool | str,
    token_budget: int,
    n_layers: int,
    hidden_size: int,
    quantized: bool,
    free_bytes: int | None,
    reserved_bytes: int = 0,
) -> dict[str, Any]:
    """Whether to recompute activations, and the micro-batch token budget: what memory allows, logged by the caller.

    ``setting`` True or False is used as configured. ``auto`` turns gradient checkpointing off on a CPU (memory is
    not the limit there; recomputation costs a third more time) and on a GPU whenever the activations of a
    ``token_budget`` micro-batch fit in the free memory (``free_bytes`` minus ``reserved_bytes`` for gradients
    and optimiser state, times ``MEMORY_HEADROOM``); if they do not, the budget is halved down to
    ``MIN_EFFICIENT_BUDGET`` first, and only then is recomputation turned on at the configured budget.
    Activation memory per token is ``ACTIVATION_BYTES`` x layers x hidden size.
    """
    if setting is not None and setting != "auto":
        return {"gradient_checkpointing": bool(setting), "token_budget": token_budget, "reason": "as configured"}
    if free_bytes is None:
        return {"gradient_checkpointing": False, "token_budget": token_budget, "reason": "auto: CPU, memory not short"}
    per_token = ACTIVATION_BYTES["4bit" if quantized else "bf16"] * n_layers * hidden_size
    usable = MEMORY_HEADROOM * free_bytes - reserved_bytes
    budget = token_budget
    while True:
        need = budget * per_token
        if need <= usable:
            return {
                "gradient_checkpointing": False,
                "token_budget": budget,
                "reason": f"auto: activations of {budget} tokens ~{need / 2**30:.1f} GiB fit in "
                f"{usable / 2**30:.1f} GiB usable of {free_bytes / 2**30:.1f} GiB free",
            }
        if budget // 2 < min(MIN_EFFICIENT_BUDGET, token_budget):
            break
        budget //= 2
    return {
        "gradient_checkpointing": True,
        "token_budget": token_budget,
        "reason": f"auto: activations of {budget} tokens ~{budget * per_token / 2**30:.1f} GiB exceed "
        f"{usable / 2**30:.1f} GiB usable of {free_bytes / 2**30:.1f} GiB free",
    }


def plan_for(model: Any, settings: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``memory_plan`` for a loaded base model on ``device`` (free memory measured now); logged."""
    config = model.config.get_text_config()
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    # LoRA's trainable weights are a fraction of a percent; their fp32 gradients and two Adam moments are
    # reserved as if 1 % of the base were trainable (generous; modules_to_save can add a head)
    reserved = int(0.01 * sum(p.numel() for p in model.parameters()) * 12)
    plan = memory_plan(
        settings["gradient_checkpointing"],
        settings["token_budget"],
        config.num_hidden_layers,
        config.hidden_size,
        settings["quantization"] == "4bit",
        free,
        reserved,
    )
    log.info(
        "memory plan: gradient checkpointing %s, %d tokens per micro-batch (%s)",
        "on" if plan["gradient_checkpointing"] else "off",
        plan["token_budget"],
        plan["reason"],
    )
    return plan


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
    train_answers: AnswerTokens | None = None,
) -> Any:
    """An SFTTrainer (subclass) for ``objective`` with token-budget micro-batches and dev-xentropy model selection.

    ``settings`` are the recipe's, with ``token_budget`` and ``gradient_checkpointing`` as ``memory_plan``
    resolved them. ``train_rows`` come from ``training_rows`` (one per item). ``answers`` are extraction's
    variants (dev evaluation); ``train_answers`` the variants the soft loss puts mass on (``training_variants``;
    default ``answers``).
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    dev_prompts, dev_human = dev
    pad_id = tokenizer.pad_token_id
    index, valid = choice_index(train_answers or answers, device)
    rows_path = "sequences" in train_rows[0]

    class MoralignTrainer(SFTTrainer):
        """One optimiser step = ``batch_size`` items in token-budget micro-batches; dev xentropy by extraction."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.token_budget = int(settings["token_budget"])
            self.reuse_prefix = True  # run a prefix shared by a micro-batch's prompts once (``_last_logits``)
            self.step_seconds = 0.0  # forward/backward/optimiser time, what dev evaluation is compared with
            self.eval_seconds = 0.0
            # prompt tokens trained on; tokens the model computed (a shared prefix once per micro-batch); the same
            # with padding (what the micro-batches cost): throughput accounting (benchmarks/gpu_finetune.py)
            self.tokens = {"prompt": 0, "computed": 0, "padded": 0}

        def training_step(self, model, inputs, num_items_in_batch=None):
            t0 = time.perf_counter()
            model.train()
            while True:
                try:
                    loss = self._step(model, inputs["items"].rows)
                    break
                except torch.OutOfMemoryError:
                    if self.token_budget <= 1:
                        raise
                    # the step restarts from zero gradients: the partial sums of the failed split are dropped
                    model.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    self.token_budget //= 2
                    log.warning(
                        "CUDA out of memory: this step is redone with %d tokens per micro-batch", self.token_budget
                    )
            self.step_seconds += time.perf_counter() - t0
            return loss

        def _step(self, model, items):
            if rows_path:
                return self._rows_step(model, items)
            total = 0.0
            for chunk in make_batches([len(it["input_ids"]) for it in items], self.token_budget, len(items)):
                rows = [items[i] for i in chunk]
                target = torch.tensor([r["target"] for r in rows], device=device)
                with self.compute_loss_context_manager():
                    last = self._last_logits(model, [r["input_ids"] for r in rows])
                    if objective == "soft":
                        losses = soft_losses(last, target, index, valid)
                    else:
                        answer_ids = torch.tensor([r["answer_ids"] for r in rows], device=device)
                        losses = votes_losses(last, target, answer_ids)
                    # the step's loss is the mean over ITS items, whichever micro-batch they fall in
                    loss = losses.sum() / len(items)
                self.accelerator.backward(loss)
                total = total + loss.detach()
            return total

        def _last_logits(self, model, rows):
            """Logits at each row's last position; a prefix shared by the rows is run once (then its cache reused).

            Every prompt of a run starts with the same chat markup and system text (over half of a short prompt):
            the prefix's keys and values are computed once per micro-batch, with gradients, and repeated for each
            row, exactly as the rows would see them alone (the gradient is the same; ``tests/test_training.py``).
            Not with activation checkpointing, which turns the cache off.
            """
            n = min(common_prefix_length(rows), min(len(r) for r in rows) - 1)
            longest = max(len(r) for r in rows)
            self.tokens["prompt"] += sum(len(r) for r in rows)
            if not self.reuse_prefix or len(rows) == 1 or n < MIN_SHARED_PREFIX or self.args.activation_checkpointing:
                self.tokens["computed"] += sum(len(r) for r in rows)
                self.tokens["padded"] += len(rows) * longest
                batch = {k: v.to(device) for k, v in pad_batch(rows, pad_id).items()}
                return model(**batch, logits_to_keep=1, use_cache=False).logits[:, -1]
            self.tokens["computed"] += n + sum(len(r) - n for r in rows)
            self.tokens["padded"] += n + len(rows) * (longest - n)
            ids = torch.tensor([rows[0][:n]], device=device)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
            cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
            cache.batch_repeat_interleave(len(rows))
            batch = {k: v.to(device) for k, v in pad_batch([r[n:] for r in rows], pad_id, prefix_len=n).items()}
            return model(**batch, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

        def _rows_step(self, model, items):
            """One row per sampled answer, trl's SFT loss: summed answer-token NLL over the step's answer tokens."""
            seqs = [(s, lab) for it in items for s, lab in zip(it["sequences"], it["labels"], strict=True)]
            n_tokens = sum(sum(t != -100 for t in lab[1:]) for _, lab in seqs)
            total = 0.0
            for chunk in make_batches([len(s) for s, _ in seqs], self.token_budget, len(seqs)):
                lengths = [len(seqs[i][0]) for i in chunk]
                self.tokens["prompt"] += sum(lengths)
                self.tokens["computed"] += sum(lengths)
                self.tokens["padded"] += len(chunk) * max(lengths)
                batch = lm_collator([{"input_ids": seqs[i][0], "labels": seqs[i][1]} for i in chunk])
                batch = {k: v.to(device) for k, v in batch.items()}
                with self.compute_loss_context_manager():
                    loss = SFTTrainer.compute_loss(self, model, batch, num_items_in_batch=n_tokens)
                self.accelerator.backward(loss)
                total = total + loss.detach()
            return total

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            t0 = time.perf_counter()
            # inference keeps no activations: a larger batch than training's fits (the engine halves it on OOM)
            budget = max(self.token_budget, DEV_TOKEN_BUDGET)
            xent = dev_xentropy(self.model, pad_id, dev_prompts, answers, dev_human, budget)
            seconds = time.perf_counter() - t0
            self.eval_seconds += seconds
            log.info(
                "step %d: dev xentropy %.4f; %d dev items in %.1f s (dev evaluation so far %.1f s = %.1f %% of the "
                "%.1f s of training steps)",
                self.state.global_step,
                xent,
                len(dev_prompts),
                seconds,
                self.eval_seconds,
                100 * self.eval_seconds / max(self.step_seconds, 1e-9),
                self.step_seconds,
            )
            metrics = {f"{metric_key_prefix}_xentropy": xent, f"{metric_key_prefix}_seconds": round(seconds, 3)}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    lm_collator = DataCollatorForLanguageModeling(pad_token_id=pad_id)
    on_cuda = device.type == "cuda"
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=settings["max_steps"] if settings["max_steps"] > 0 else -1,
        num_train_epochs=settings["epochs"],
        # items per optimiser step; the trainer splits them into micro-batches (gradient accumulation inside)
        per_device_train_batch_size=settings["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=settings["learning_rate"],
        lr_scheduler_type=settings["lr_scheduler"],
        warmup_steps=settings["warmup_ratio"],  # a value below 1 is a share of the steps (transformers >= 5)
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
        activation_checkpointing=bool(settings["gradient_checkpointing"]) and on_cuda,
        activation_checkpointing_kwargs={"use_reentrant": False},
        max_length=None,  # prompts are shortened by the project (inside the template), never the answer
        dataset_kwargs={"skip_prepare_dataset": True},  # rows are tokenized by the project
        remove_unused_columns=False,
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
        data_collator=StepCollator(),
    )


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


def train(trainer: Any, checkpoints: Path) -> dict[str, Any]:
    """Run (or resume, from the last checkpoint in ``checkpoints``) training; returns steps, times and best dev."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last:
        log.info("resuming from the last checkpoint, %s", last)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    best = trainer.state.best_model_checkpoint
    share = trainer.eval_seconds / max(trainer.step_seconds, 1e-9)
    log.info(
        "training steps %.1f s, dev evaluation %.1f s (%.1f %% of it)",
        trainer.step_seconds,
        trainer.eval_seconds,
        100 * share,
    )
    return {
        "steps": trainer.state.global_step,
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "step_seconds": round(trainer.step_seconds, 2),
        "dev_eval_seconds": round(trainer.eval_seconds, 2),
        "tokens": dict(trainer.tokens),
        "best_dev_xentropy": trainer.state.best_metric,
        "best_checkpoint": Path(best).name if best else None,
        "resumed_from_step": int(Path(last).name.split("-")[-1]) if last else None,
        "log_history": trainer.state.log_history,
    }
