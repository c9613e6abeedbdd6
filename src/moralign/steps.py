"""One function per workflow step; ``workflow/scripts/<step>.py`` parses arguments and calls it.

Every path comes from the orchestrator. Every function reads the configuration it is given (already merged and
validated), writes its outputs atomically, and logs to the rule's log file through the ``logging`` setup of
the calling script.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moralign import data as scruples
from moralign.config import CONDITION_BASE, Config, digest
from moralign.io import atomic_dir, environment, read_json, write_json, write_parquet

log = logging.getLogger(__name__)
SOURCE_FILE = "moralign-source.json"


def download(cfg: Config, archive: str, out: Path) -> None:
    """Fetch one release archive (URL, mirror or synthetic sample) and record its sha256."""
    src = cfg["data"]
    digest_ = scruples.fetch_archive(src["source"], archive, out, src["sha256"].get(archive), src["sample"])
    log.info("%s: sha256 %s", out, digest_)


def prepare(cfg: Config, dataset: str, raw_dir: Path, out_dir: Path) -> None:
    """Parse and validate one dataset's release archive (in ``raw_dir``) into per-split Parquet tables."""
    stats = scruples.prepare(dataset, raw_dir / f"{scruples.TASKS[dataset].archive}.tar.gz", out_dir)
    for split, counts in stats["splits"].items():
        log.info("%s/%s: %s", dataset, split, counts)


def fetch_model(cfg: Config, model: str, archives: list[Path], out: Path) -> None:
    """Put a base model in ``out``: a snapshot of the hub model (pinned revision), or a tiny model built locally.

    Every later step loads the model from ``out``, so compute nodes need no network and DVC can track the
    exact weights; ``moralign-source.json`` records where they came from.
    """
    mcfg = cfg.model(model)
    with atomic_dir(out) as tmp:
        if "build" in mcfg:
            from moralign.tinymodels import build_tiny_model

            build_tiny_model(mcfg["build"], archives, tmp)
            source = {"built": mcfg["build"], "hf_id": None, "revision": None}
        else:
            from huggingface_hub import snapshot_download

            log.info("downloading %s@%s", mcfg["hf_id"], mcfg["revision"] or "main")
            snapshot_download(
                mcfg["hf_id"],
                revision=mcfg["revision"],
                local_dir=tmp,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.jinja"],
            )
            from huggingface_hub import model_info

            commit = mcfg["revision"] or model_info(mcfg["hf_id"]).sha
            source = {"built": None, "hf_id": mcfg["hf_id"], "revision": commit}
        write_json(tmp / SOURCE_FILE, source)
    log.info("%s ready in %s", model, out)


def base_identity(base_dir: Path) -> dict[str, Any]:
    """Where a base model came from: hub id and commit, or the build spec and a hash of the built files."""
    from moralign.modeling import fingerprint_files

    source = read_json(base_dir / SOURCE_FILE)
    return {**source, "weights": source["revision"] or fingerprint_files(base_dir)}


# ------------------------------------------------------------------------------------------------ shared setup


def _prompt_setup(cfg: Config, model: str, dataset: str, data_dir: Path, tokenizer: Any):
    from moralign.prompts import PromptBuilder, select_shots

    spec = cfg.prompt(dataset)
    train = pd.read_parquet(data_dir / "train.parquet")
    mcfg = cfg.model(model)
    return PromptBuilder(
        task=scruples.TASKS[dataset],
        spec=spec,
        chat=mcfg["chat_template"],
        system_role=mcfg["system_role"],
        shots=select_shots(train, spec["n_shots"], spec["shot_seed"]),
    )


def _save_prompt_examples(path: Path, texts: list[str], ids: list[str], n: int = 3) -> None:
    """The rendered prompts of the first items, for a human to read."""
    body = "\n".join(f"===== {i} =====\n{t}\n" for i, t in zip(ids[:n], texts[:n], strict=False))
    path.write_text(body)


# ---------------------------------------------------------------------------------------------------- extract


def extract(
    cfg: Config,
    model: str,
    dataset: str,
    condition: str,
    data_dir: Path,
    base_dir: Path,
    out_dir: Path,
    adapter_dir: Path | None = None,
) -> None:
    """Score every item of the configured splits for one (model, dataset, condition) cell."""
    from moralign import extraction as ex
    from moralign.modeling import fingerprint_files, load_model, load_tokenizer, resolve_device, resolve_dtype
    from moralign.prompts import swap_options

    settings = cfg["extract"]
    source, revision = str(base_dir), None
    device = resolve_device(settings["device"])
    dtype = resolve_dtype(settings["dtype"], device)
    tokenizer = load_tokenizer(source, revision)
    lm = load_model(source, revision, device, dtype, settings["quantization"], adapter_dir)
    builder = _prompt_setup(cfg, model, dataset, data_dir, tokenizer)
    answers = ex.answer_variants(tokenizer, builder.answers)
    task = scruples.TASKS[dataset]
    if settings["debias"] == "swap" and task.option_fields is None:
        raise ValueError(
            f"extract.debias: swap needs a task whose prompt shows its options in order; {dataset} has none"
        )
    provenance = {
        "model": model,
        "base": base_identity(base_dir),
        "adapter": fingerprint_files(adapter_dir) if adapter_dir else None,
        "condition": condition,
        "dataset": dataset,
        "template_hash": builder.fingerprint(tokenizer),
        "answers": answers.describe(),
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": settings["quantization"],
        "debias": settings["debias"],
        "environment": environment(),
    }
    scorer = ex.Scorer(lm, tokenizer.pad_token_id, settings["token_budget"], settings["max_batch_size"])
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"provenance": provenance, "splits": {}}
    for split in settings["splits"]:
        frame = pd.read_parquet(data_dir / f"{split}.parquet")
        if settings["max_items"]:
            frame = frame.head(settings["max_items"])
        texts = [builder.render(tokenizer, row) for _, row in frame.iterrows()]
        _save_prompt_examples(out_dir / f"{split}.prompts.txt", texts, list(frame["id"]))
        t0 = time.perf_counter()

        def score_shard(rows: slice, frame: pd.DataFrame = frame, texts: list[str] = texts) -> pd.DataFrame:
            part = ex.PromptSet(
                list(frame["id"][rows]), texts[rows], ex.encode_prompts(tokenizer, texts[rows], builder.chat)
            )
            logp = ex.score_prompts(scorer, tokenizer, part, answers, builder.chat)
            if settings["debias"] != "swap":
                return ex.predictions_frame(part.ids, logp, [len(t) for t in part.token_ids])
            swapped_texts = [builder.render(tokenizer, swap_options(r, task)) for _, r in frame.iloc[rows].iterrows()]
            swapped = ex.PromptSet(part.ids, swapped_texts, ex.encode_prompts(tokenizer, swapped_texts, builder.chat))
            logp_swapped = ex.score_prompts(scorer, tokenizer, swapped, answers, builder.chat)[:, ::-1]
            # average the two orders' distributions; logp_choice = log of the mean mass per choice
            p = 0.5 * (ex.normalise(logp)[1] + ex.normalise(logp_swapped)[1])
            mean_logp = np.logaddexp(logp, logp_swapped) - np.log(2.0)
            return ex.predictions_frame(part.ids, mean_logp, [len(t) for t in part.token_ids], p=p)

        result = ex.run_sharded(
            len(frame),
            settings["shard_size"],
            out_dir / f"{split}.parquet",
            out_dir.with_name(f".{out_dir.name}.{split}.parts"),
            {**provenance, "split": split},
            score_shard,
        )
        seconds = time.perf_counter() - t0
        summary["splits"][split] = {
            "items": len(result),
            "mean_coverage": float(result["coverage"].mean()),
            "min_coverage": float(result["coverage"].min()),
            "tokens": int(result["n_prompt_tokens"].sum()),
            "seconds": round(seconds, 3),
        }
        log.info("%s %s %s %s: %s", model, dataset, condition, split, summary["splits"][split])
    write_json(out_dir / "summary.json", summary)


# --------------------------------------------------------------------------------------------------- finetune


def finetune(cfg: Config, model: str, dataset: str, recipe: str, data_dir: Path, base_dir: Path, out_dir: Path) -> None:
    """Train one LoRA adapter (recipe x model x dataset); resumes from checkpoints beside ``out_dir``."""
    import torch

    from moralign import extraction as ex
    from moralign import training
    from moralign.modeling import load_model, load_tokenizer, resolve_device

    settings = cfg.finetune(recipe)
    meta_path = out_dir / "metadata.json"
    fingerprint = digest({"settings": settings, "prompt": cfg.prompt(dataset), "model": cfg.model(model)})
    if meta_path.exists() and read_json(meta_path).get("fingerprint") == fingerprint:
        log.info("%s is already trained with these settings; nothing to do", out_dir)
        return
    source, revision = str(base_dir), None
    device = resolve_device(settings["device"])
    quantized = settings["quantization"] == "4bit"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(settings["seed"])
    tokenizer = load_tokenizer(source, revision)
    base = load_model(source, revision, device, dtype, settings["quantization"])
    builder = _prompt_setup(cfg, model, dataset, data_dir, tokenizer)
    answers = ex.answer_variants(tokenizer, builder.answers)
    if not answers.single_token and settings["objective"] == "soft":
        raise ValueError(f"recipe {recipe}: the soft objective needs single-token answers; {builder.answers} are not")

    def split_prompts(split: str, cap: int | None) -> tuple[list[str], list[list[int]], np.ndarray]:
        frame = pd.read_parquet(data_dir / f"{split}.parquet")
        if cap:
            frame = frame.head(cap)
        texts = [builder.render(tokenizer, row) for _, row in frame.iterrows()]
        ids = ex.encode_prompts(tokenizer, texts, builder.chat, settings["max_length"])
        return texts, ids, scruples.counts_matrix(frame)

    train_texts, train_ids, train_counts = split_prompts("train", settings["max_train_items"])
    _, dev_ids, dev_counts = split_prompts("dev", settings["max_dev_items"])
    rows = training.training_rows(
        settings["objective"], tokenizer, train_texts, train_ids, train_counts, answers, settings, builder.chat
    )
    lm = training.wrap_lora(base, settings, quantized)
    checkpoints = out_dir.with_name(out_dir.name + ".checkpoints")
    trainer = training.build_trainer(
        settings["objective"],
        lm,
        tokenizer,
        rows,
        (dev_ids, dev_counts / dev_counts.sum(1, keepdims=True)),
        answers,
        settings,
        checkpoints,
        device,
    )
    result = training.train(trainer, checkpoints)
    meta = {
        "fingerprint": fingerprint,
        "model": model,
        "base": base_identity(base_dir),
        "dataset": dataset,
        "recipe": recipe,
        "hyperparameters": settings,
        "template_hash": builder.fingerprint(tokenizer),
        "train_items": len(train_ids),
        "train_examples": len(rows),
        "dev_items": len(dev_ids),
        **result,
        "environment": environment(),
    }
    with atomic_dir(out_dir) as tmp:
        trainer.model.save_pretrained(tmp)
        write_json(tmp / "metadata.json", meta)
    log.info(
        "%s: best dev xentropy %.4f after %d steps (%.1f s)",
        out_dir,
        result["best_dev_xentropy"] or float("nan"),
        result["steps"],
        result["wall_seconds"],
    )
    shutil.rmtree(checkpoints, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ score


def _load_predictions(pred_dir: Path, split: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """counts, log p and coverage aligned by id; a prediction file that misses items is an error."""
    from moralign.metrics import log_probs

    gold = pd.read_parquet(data_dir / f"{split}.parquet")
    pred = pd.read_parquet(pred_dir / f"{split}.parquet")
    merged = pred.merge(gold[["id", "counts"]], on="id", how="left", validate="one_to_one")
    if merged["counts"].isna().any():
        missing = merged.loc[merged["counts"].isna(), "id"].head(3).tolist()
        raise ValueError(f"{pred_dir / (split + '.parquet')}: ids not in {data_dir / split}.parquet, e.g. {missing}")
    p = np.stack(merged["p"].to_numpy())
    return scruples.counts_matrix(merged), log_probs(p), merged["coverage"].to_numpy()


def score(
    cfg: Config,
    dataset: str,
    condition: str,
    data_dir: Path,
    pred_dir: Path,
    out: Path,
    baseline_dir: Path | None = None,
) -> None:
    """All metrics of one cell with intervals; for a fine-tuned cell also the paired difference to base."""
    from moralign import metrics

    s = cfg["score"]
    split = cfg["experiment"]["eval_split"]
    counts, logp, coverage = _load_predictions(pred_dir, split, data_dir)
    dev = _load_predictions(pred_dir, "dev", data_dir)[:2] if split != "dev" else None
    result = metrics.summarise(counts, logp, coverage, dev, s["bootstrap_resamples"], s["seed"])
    per_item = result.pop("per_item")
    summary = read_json(pred_dir / "summary.json")
    result.update(split=split, condition=condition, provenance=summary["provenance"])
    if baseline_dir is not None and condition != CONDITION_BASE:
        b_counts, b_logp, b_cov = _load_predictions(baseline_dir, split, data_dir)
        if not np.array_equal(b_counts, counts):
            raise ValueError(f"{baseline_dir} and {pred_dir} do not cover the same items in the same order")
        b_dev = _load_predictions(baseline_dir, "dev", data_dir)[:2] if split != "dev" else None
        base_items = metrics.per_item_metrics(b_counts, b_logp, b_cov, *metrics.fit_on_dev(b_dev))
        result["difference_to_base"] = {
            name: metrics.paired_difference(base_items[name], per_item[name], s["bootstrap_resamples"], s["seed"])
            for name in per_item
        }
        result["difference_to_base"]["macro_f1"] = metrics.paired_macro_f1_difference(
            counts, b_logp, logp, s["bootstrap_resamples"], s["seed"]
        )
    write_json(out, result)
    write_parquet(
        out.with_suffix(".items.parquet"),
        pd.DataFrame({"id": pd.read_parquet(pred_dir / f"{split}.parquet")["id"], **per_item}),
    )


def references(cfg: Config, dataset: str, data_dir: Path, out: Path) -> None:
    """Reference rows of one dataset: uniform, train prior and the BEST oracle."""
    from moralign import metrics
    from moralign import references as refs

    s = cfg["score"]
    split = cfg["experiment"]["eval_split"]
    counts = scruples.counts_matrix(pd.read_parquet(data_dir / f"{split}.parquet"))
    dev_counts = scruples.counts_matrix(pd.read_parquet(data_dir / "dev.parquet"))
    train_counts = scruples.counts_matrix(pd.read_parquet(data_dir / "train.parquet"))
    n_choices = counts.shape[1]
    rows: dict[str, Any] = {}
    for name, probs in (
        ("uniform", np.full(n_choices, 1.0 / n_choices)),
        ("train_prior", refs.vote_marginal(train_counts)),
    ):
        logp = metrics.constant_prediction(probs, len(counts))
        dev = (dev_counts, metrics.constant_prediction(probs, len(dev_counts)))
        res = metrics.summarise(counts, logp, np.ones(len(counts)), dev, s["bootstrap_resamples"], s["seed"])
        res.pop("per_item")
        rows[name] = {**res, "prediction": probs.tolist()}
    alpha = refs.fit_dirichlet_prior(counts)
    best = refs.best_oracle(counts, alpha, s["best_samples"], s["seed"], s["bootstrap_resamples"])
    best.pop("per_item")
    rows["best"] = best
    write_json(out, {"dataset": dataset, "split": split, "rows": rows})
    log.info(
        "%s references: BEST xentropy %.4f (alpha %s)",
        dataset,
        best["metrics"]["xentropy"]["value"],
        np.round(alpha, 3).tolist(),
    )
