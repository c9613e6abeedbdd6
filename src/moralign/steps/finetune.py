"""finetune: train one LoRA (QLoRA on GPU) adapter for a (model, dataset, recipe); resumes after an interruption."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from moralign import extraction as ex
from moralign import training
from moralign.config import Config, digest
from moralign.data import counts_matrix
from moralign.io import atomic_dir, environment, read_json, write_json
from moralign.modelfiles import base_identity, canonicalize_adapter_config, check_model_folder
from moralign.prompts import EncodedPrompt, PromptBuilder
from moralign.trainer import build_trainer, plan_for, train

log = logging.getLogger(__name__)


def run(
    cfg: Config, model: str, dataset: str, recipe: str, data_dir: Path, base_dir: Path, out_dir: Path, seed: int = 0
) -> None:
    """Write the adapter trained with ``seed`` and its ``metadata.json`` to ``out_dir``; checkpoints live beside it."""
    import torch

    from moralign.modeling import configure_torch, load_model, load_tokenizer, resolve_device

    settings = cfg.finetune(recipe, seed)
    check_model_folder(base_dir, cfg.model(model)["chat_template"])
    meta_path = out_dir / "metadata.json"
    fingerprint = digest({"settings": settings, "prompt": cfg.prompt(dataset), "model": cfg.model(model)})
    if meta_path.exists() and read_json(meta_path).get("fingerprint") == fingerprint:
        log.info("%s is already trained with these settings; nothing to do", out_dir)
        return
    device = resolve_device(settings["device"])
    runtime = configure_torch(settings["threads"], device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(settings["seed"])
    tokenizer = load_tokenizer(str(base_dir))
    base = load_model(str(base_dir), None, device, dtype, settings["quantization"])
    builder = PromptBuilder.from_config(cfg, model, dataset, pd.read_parquet(data_dir / "train.parquet"))
    answers = ex.answer_variants(tokenizer, builder.answers)
    if not answers.single_token and settings["objective"] == "soft":
        raise ValueError(f"recipe {recipe}: the soft objective needs single-token answers; {builder.answers} are not")

    def split_prompts(split: str, cap: int | None) -> tuple[pd.DataFrame, list[EncodedPrompt], np.ndarray]:
        frame = pd.read_parquet(data_dir / f"{split}.parquet")
        if cap:
            frame = frame.head(cap)
        prompts = training.encode_items(builder, tokenizer, frame, settings["max_length"])
        shortened[split] = sum(p.shortened for p in prompts)
        if shortened[split]:
            log.warning("%s: %d items shortened to fit max_length=%d", split, shortened[split], settings["max_length"])
        return frame, prompts, counts_matrix(frame)

    shortened: dict[str, int] = {}
    train_items, train_prompts, train_counts = split_prompts("train", settings["max_train_items"])
    _, dev_prompts, dev_counts = split_prompts("dev", settings["max_dev_items"])
    dev_ids = [p.ids for p in dev_prompts]
    rows = training.training_rows(
        settings["objective"], tokenizer, builder, train_items, train_prompts, train_counts, answers, settings
    )
    train_answers = None
    if settings["objective"] == "soft":
        train_answers = training.soft_training_answers(builder, tokenizer, train_items, train_prompts, answers)
        log.info("soft recipe: training mass on the variants %s", train_answers.variant_strings)
    plan = plan_for(base, settings, device)  # gradient checkpointing and micro-batch size: memory only
    resolved = {**settings, **{k: plan[k] for k in ("gradient_checkpointing", "token_budget")}}
    lm = training.wrap_lora(base, resolved, settings["quantization"] == "4bit")
    checkpoints = out_dir.with_name(out_dir.name + ".checkpoints")
    trainer = build_trainer(
        settings["objective"],
        lm,
        tokenizer,
        rows,
        (dev_ids, dev_counts / dev_counts.sum(1, keepdims=True)),
        answers,
        resolved,
        checkpoints,
        device,
        train_answers,
    )
    result = train(trainer, checkpoints)
    meta = {
        "fingerprint": fingerprint,
        "model": model,
        "base": base_identity(base_dir),
        "dataset": dataset,
        "recipe": recipe,
        "hyperparameters": settings,
        "template_hash": builder.fingerprint(tokenizer),
        # the answer spellings the loss puts mass on (soft: training_variants; votes: the answer tokens)
        "training_variants": [list(v) for v in train_answers.variant_strings] if train_answers else None,
        "train_items": len(train_prompts),
        # one row per item, whatever the recipe: each item is seen once per epoch
        "train_rows": len(rows),
        "memory_plan": plan,
        "dev_items": len(dev_ids),
        # items whose text was cut to fit max_length (moralign.prompts.PromptBuilder.encode), per split
        "shortened_items": shortened,
        **result,
        "runtime": runtime,
        "environment": environment(),
    }
    with atomic_dir(out_dir) as tmp:
        trainer.model.save_pretrained(tmp)
        canonicalize_adapter_config(tmp)
        write_json(tmp / "metadata.json", meta)
    log.info(
        "%s: best dev xentropy %.4f after %d steps (%.1f s)",
        out_dir,
        result["best_dev_xentropy"] or float("nan"),
        result["steps"],
        result["wall_seconds"],
    )
    shutil.rmtree(checkpoints, ignore_errors=True)
