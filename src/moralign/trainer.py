"""The trainer of both recipes: one optimiser step of ``batch_size`` items, whatever the hardware.

``MoralignTrainer`` (trl's SFTTrainer with its own ``training_step`` and ``evaluate``): a step's items are
length-sorted and split into micro-batches of at most ``token_budget`` padded tokens (as extraction batches); each
micro-batch's loss is its items' summed loss divided by the step's item count, and the gradients add up, so the
step's gradient is the mean over its items however they were split. Memory decides only the split (and whether to
recompute activations, ``memory_plan``), never the optimisation; a step that runs out of CUDA memory is redone with
half the budget. Shuffling, checkpoints and resumption are the Trainer's, per step. Model selection: dev
``xentropy`` (computed by the extraction engine) every ``eval_steps`` and at the last step; the best checkpoint is
kept, and each evaluation's time is logged next to the training time. The losses and the training rows are in
moralign.training.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from moralign.extraction import AnswerTokens, Scorer, common_prefix_length, make_batches, normalise, pad_batch
from moralign.training import choice_index, soft_losses, votes_losses

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


class MoralignTrainer(SFTTrainer):
    """One optimiser step = ``batch_size`` items in token-budget micro-batches; dev xentropy by extraction.

    ``objective`` (``soft``/``votes``), the soft loss's answer ``index``/``valid`` (``choice_index``), the ``dev``
    prompts and human shares, extraction's ``answers`` (dev evaluation) and the ``device`` come with the usual
    SFTTrainer arguments; ``token_budget`` is the resolved micro-batch budget (``memory_plan``).
    """

    def __init__(
        self,
        *args: Any,
        objective: str,
        token_budget: int,
        index: torch.Tensor,
        valid: torch.Tensor,
        dev: tuple[list[list[int]], np.ndarray],
        answers: AnswerTokens,
        device: torch.device,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.objective, self.index, self.valid, self.answers, self.device = objective, index, valid, answers, device
        self.dev_prompts, self.dev_human = dev
        self.pad_id = self.processing_class.pad_token_id
        self.lm_collator = DataCollatorForLanguageModeling(pad_token_id=self.pad_id)
        self.token_budget = int(token_budget)
        self.reuse_prefix = True  # run a prefix shared by a micro-batch's prompts once (``_last_logits``)
        self.step_seconds = 0.0  # forward/backward/optimiser time, what dev evaluation is compared with
        self.eval_seconds = 0.0
        # prompt tokens trained on; tokens the model computed (a shared prefix once per micro-batch); the same
        # with padding (what the micro-batches cost): throughput accounting (benchmarks/gpu_finetune.py)
        self.tokens = {"prompt": 0, "computed": 0, "padded": 0}

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """One optimiser step's forward/backward passes (``_step``), redone at half the budget after a CUDA OOM."""
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
                log.warning("CUDA out of memory: this step is redone with %d tokens per micro-batch", self.token_budget)
        self.step_seconds += time.perf_counter() - t0
        return loss

    def _step(self, model, items):
        if "sequences" in items[0]:  # multi-token answers: one row per sampled answer
            return self._rows_step(model, items)
        total = 0.0
        for chunk in make_batches([len(it["input_ids"]) for it in items], self.token_budget, len(items)):
            rows = [items[i] for i in chunk]
            target = torch.tensor([r["target"] for r in rows], device=self.device)
            with self.compute_loss_context_manager():
                last = self._last_logits(model, [r["input_ids"] for r in rows])
                if self.objective == "soft":
                    losses = soft_losses(last, target, self.index, self.valid)
                else:
                    answer_ids = torch.tensor([r["answer_ids"] for r in rows], device=self.device)
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
            batch = {k: v.to(self.device) for k, v in pad_batch(rows, self.pad_id).items()}
            return model(**batch, logits_to_keep=1, use_cache=False).logits[:, -1]
        self.tokens["computed"] += n + sum(len(r) - n for r in rows)
        self.tokens["padded"] += n + len(rows) * (longest - n)
        ids = torch.tensor([rows[0][:n]], device=self.device)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
        cache.batch_repeat_interleave(len(rows))
        batch = {k: v.to(self.device) for k, v in pad_batch([r[n:] for r in rows], self.pad_id, prefix_len=n).items()}
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
            batch = self.lm_collator([{"input_ids": seqs[i][0], "labels": seqs[i][1]} for i in chunk])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.compute_loss_context_manager():
                loss = SFTTrainer.compute_loss(self, model, batch, num_items_in_batch=n_tokens)
            self.accelerator.backward(loss)
            total = total + loss.detach()
        return total

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict:
        """Dev xentropy of the model's choice distribution (the selection metric), timed and logged."""
        t0 = time.perf_counter()
        # inference keeps no activations: a larger batch than training's fits (the engine halves it on OOM)
        budget = max(self.token_budget, DEV_TOKEN_BUDGET)
        xent = dev_xentropy(self.model, self.pad_id, self.dev_prompts, self.answers, self.dev_human, budget)
        seconds = time.perf_counter() - t0
        self.eval_seconds += seconds
        log.info(
            "step %d: dev xentropy %.4f; %d dev items in %.1f s (dev evaluation so far %.1f s = %.1f %% of the "
            "%.1f s of training steps)",
            self.state.global_step,
            xent,
            len(self.dev_prompts),
            seconds,
            self.eval_seconds,
            100 * self.eval_seconds / max(self.step_seconds, 1e-9),
            self.step_seconds,
        )
        metrics = {f"{metric_key_prefix}_xentropy": xent, f"{metric_key_prefix}_seconds": round(seconds, 3)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


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
    from trl import SFTConfig

    index, valid = choice_index(train_answers or answers, device)
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
        objective=objective,
        token_budget=settings["token_budget"],
        index=index,
        valid=valid,
        dev=dev,
        answers=answers,
        device=device,
    )


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
