"""read: the `sample` and `verbal` readings of one (model, dataset, condition) cell on the eval split.

The local engine (backend hf: base and LoRA-tuned weights, loaded as extract loads them) draws through
moralign.readings.sample and .verbal with the generation cache; an API model (backend openai) draws through
moralign.readings.api and the response cache. Both write the same frames (docs/readings.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from moralign import backends, predictors
from moralign.config import Config
from moralign.data import evaluated_items
from moralign.io import atomic_path, environment, write_json
from moralign.readings.parse import VERSIONS
from moralign.readings.verbal import format_following_rate

log = logging.getLogger(__name__)

# The unconstrained draws of the verbal prompt: a frame of its own beside the readings' (format.parquet)
FORMAT = "format"


def _local_readers(
    cfg: Config, model: str, dataset: str, condition: str, inputs: predictors.CellInputs
) -> tuple[dict[str, Callable[[pd.DataFrame], pd.DataFrame]], dict[str, Any]]:
    """The local engine's readings of the cell: the model loaded once, each reading a function of the items."""
    from moralign.predictors.hf import load_cell
    from moralign.readings.cache import GenerationCache
    from moralign.readings.sample import Decoding, Reader, Sampler, read_sample, stop_token_ids
    from moralign.readings.verbal import read_format_following, read_verbal

    settings = cfg["readings"]
    cell = load_cell(cfg, model, dataset, condition, inputs)
    sampler = Sampler(
        cell.model,
        cell.tokenizer.pad_token_id,
        stop_token_ids(cell.model, cell.tokenizer),
        token_budget=settings["token_budget"],
        max_rows=settings["max_rows"],
    )
    # the cache key names the weights: the base's identity and the trained adapter's (with its hash)
    identity = {"base": cell.provenance["base"], "adapter": cell.provenance["adapter"]}
    reader = Reader(
        sampler,
        cell.tokenizer,
        cell.builder,
        identity,
        GenerationCache(inputs.cache_dir) if inputs.cache_dir else None,
        cfg["extract"]["max_length"],
    )
    sample, verbal = settings["sample"], settings["verbal"]
    readers = {
        "sample": lambda items: read_sample(
            reader,
            items,
            n_draws=sample["n_draws"],
            seed=sample["seed"],
            decoding=Decoding(max_new_tokens=sample["max_new_tokens"]),
        ),
        "verbal": lambda items: read_verbal(reader, items, n_draws=verbal["n_draws"], seed=verbal["seed"]),
        FORMAT: lambda items: read_format_following(reader, items, n_draws=1, seed=verbal["seed"]),
    }
    return readers, {**cell.provenance, "template_hash": cell.builder.fingerprint(cell.tokenizer)}


def _api_readers(
    cfg: Config, model: str, dataset: str, condition: str, inputs: predictors.CellInputs
) -> tuple[dict[str, Callable[[pd.DataFrame], pd.DataFrame]], dict[str, Any]]:
    """An API model's readings: the same requests through its endpoint and response cache."""
    from moralign.readings.api import ApiReading, read_api

    settings = cfg["readings"]
    predictor = predictors.build(cfg, model, dataset, condition, inputs)
    sample, verbal = settings["sample"], settings["verbal"]
    readers = {
        "sample": lambda items: read_api(
            predictor,
            items,
            ApiReading(
                "sample", n_draws=sample["n_draws"], seed=sample["seed"], max_new_tokens=sample["max_new_tokens"]
            ),
        ),
        "verbal": lambda items: read_api(
            predictor, items, ApiReading("verbal", n_draws=verbal["n_draws"], seed=verbal["seed"])
        ),
        FORMAT: lambda items: read_api(predictor, items, ApiReading("format", n_draws=1, seed=verbal["seed"])),
    }
    return readers, {**predictor.provenance, "model": model, "condition": condition, "dataset": dataset}


def summarise_frame(reading: str, frame: pd.DataFrame) -> dict[str, Any]:
    """What a reading's frame says in a few numbers (logged and kept in summary.json)."""
    if reading == FORMAT:
        rate = format_following_rate(frame)
        return {"items": len(frame), "draws": int(frame["n_draws"].sum()), "format_following_rate": rate}
    out = {
        "items": len(frame),
        "valid_rate": float(frame["valid"].mean()),
        "mean_coverage": float(frame["coverage"].mean()),
        "tokens_generated": int(frame["n_generated"].clip(lower=0).sum()),
    }
    if reading == "verbal":
        out["mean_sum_gap"] = float(frame["sum_gap"].mean())
    return out


def run(
    cfg: Config, model: str, dataset: str, condition: str, inputs: predictors.CellInputs, out_dir: Path
) -> dict[str, Any]:
    """Write the cell's reading frames and ``summary.json`` to ``out_dir``.

    ``<reading>.parquet`` for each of ``experiment.readings``, ``format.parquet`` (unconstrained draws, with
    ``verbal``) and ``summary.json`` (provenance, parser versions, settings, per-reading summary and seconds).

    Each frame is written atomically once its reading is complete; completions are cached as they are drawn, so a
    killed run redraws at most one batch.
    """
    settings = cfg["readings"]
    split = cfg["experiment"]["eval_split"]
    items = evaluated_items(pd.read_parquet(inputs.data_dir / f"{split}.parquet"), settings["max_items"])
    local = backends.get(cfg.backend(model)).local_weights
    readers, provenance = (_local_readers if local else _api_readers)(cfg, model, dataset, condition, inputs)
    jobs = {r: items for r in cfg.readings}
    if "verbal" in jobs and settings["verbal"]["format_items"]:
        jobs[FORMAT] = items.head(settings["verbal"]["format_items"])
    summary: dict[str, Any] = {
        "provenance": {**provenance, "environment": environment()},
        "split": split,
        "engine": "local" if local else "api",
        "parser_versions": {r: VERSIONS["verbal" if r == FORMAT else r] for r in jobs},
        "settings": {k: settings[k] for k in ("max_items", "sample", "verbal", "max_rows", "token_budget")},
        "readings": {},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for reading, frame_items in jobs.items():
        t0 = time.perf_counter()
        frame = readers[reading](frame_items)
        with atomic_path(out_dir / f"{reading}.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
        summary["readings"][reading] = {
            **summarise_frame(reading, frame),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        log.info("%s %s %s %s: %s", model, dataset, condition, reading, summary["readings"][reading])
    write_json(out_dir / "summary.json", summary)
    return summary
