"""train_encoder: fine-tune one encoder baseline (BERT, RoBERTa) on one dataset, the Scruples way; resumable."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd

from moralign.config import Config, ConfigError, digest
from moralign.encoder_heads import head_counts, head_labels
from moralign.encoder_inputs import InputEncoder, max_length_of
from moralign.encoder_losses import SELECTION
from moralign.encoder_model import METADATA, load_model
from moralign.encoder_training import Split, Trainer
from moralign.io import atomic_dir, environment, read_json, write_json
from moralign.modelfiles import base_identity, check_model_folder

log = logging.getLogger(__name__)


def run(cfg: Config, model: str, dataset: str, data_dir: Path, base_dir: Path, out_dir: Path, seed: int = 0) -> None:
    """Write the encoder trained with ``seed`` (weights, tokenizer, ``metadata.json``) to ``out_dir``; resumable."""
    import torch

    from moralign.modeling import configure_torch, load_tokenizer, resolve_device, resolve_dtype

    settings = {**cfg["encoder"], "seed": seed}
    check_model_folder(base_dir, chat_template=False)
    frames = {split: pd.read_parquet(data_dir / f"{split}.parquet") for split in ("train", "dev")}
    fingerprint = digest(
        {
            "settings": settings,
            "model": cfg.model(model),
            "dataset": dataset,
            "head": head_labels(dataset),
            "selection": SELECTION,
            "base": base_identity(base_dir)["weights"],
            "data": {s: [list(f["id"]), head_counts(f, dataset).tolist()] for s, f in frames.items()},
        }
    )
    meta_path = out_dir / METADATA
    if meta_path.exists() and read_json(meta_path).get("fingerprint") == fingerprint:
        log.info("%s is already trained with these settings; nothing to do", out_dir)
        return
    device = resolve_device(settings["device"])
    runtime = configure_torch(settings["threads"], device)
    bf16 = resolve_dtype(settings["dtype"], device) == torch.bfloat16
    if bf16 and device.type != "cuda":
        raise ConfigError("encoder.dtype: bfloat16 autocast needs CUDA; use auto or float32 on a CPU")
    tokenizer = load_tokenizer(str(base_dir))
    max_length = max_length_of(settings, dataset)
    encoder = InputEncoder(tokenizer, dataset, max_length)
    train, dev = (Split(encoder.encode(f), head_counts(f, dataset)) for f in frames.values())
    torch.manual_seed(settings["seed"])  # the new head's initial weights
    net = load_model(base_dir, dataset, device, autocast=bf16)
    checkpoints = out_dir.with_name(out_dir.name + ".checkpoints")
    result = Trainer(net, settings, checkpoints, fingerprint).train(train, dev)
    meta = {
        "fingerprint": fingerprint,
        "model": model,
        "base": base_identity(base_dir),
        "dataset": dataset,
        "head": encoder.head,
        "head_labels": list(head_labels(dataset)),
        "max_length": max_length,
        "hyperparameters": settings,
        "train_items": len(train.items),
        "dev_items": len(dev.items),
        **result,
        "runtime": {**runtime, "bf16_autocast": bf16},
        "environment": environment(),
    }
    with atomic_dir(out_dir) as tmp:
        net.net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / METADATA, meta)
    log.info(
        "%s: best dev calibrated xentropy %.4f (T %.3f; xentropy %.4f) at epoch %d of %d (%.1f s)",
        out_dir,
        result["best_dev_calibrated_xentropy"],
        result["best_dev_temperature"],
        result["best_dev_xentropy"],
        result["best_epoch"],
        settings["epochs"],
        result["wall_seconds"],
    )
    shutil.rmtree(checkpoints, ignore_errors=True)
