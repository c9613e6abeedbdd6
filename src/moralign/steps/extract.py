"""extract: the answer distribution of every item of the configured splits, for one (model, dataset, condition)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from moralign import predictors
from moralign.config import Config
from moralign.data import evaluated_items
from moralign.extraction import run_sharded
from moralign.io import atomic_path, write_json

log = logging.getLogger(__name__)


def run(
    cfg: Config,
    model: str,
    dataset: str,
    condition: str,
    inputs: predictors.CellInputs,
    out_dir: Path,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Write ``<split>.parquet`` (resumable shards), ``<split>.prompts.txt`` and ``summary.json`` to ``out_dir``.

    Returns the predictor's plan (requests, tokens, cost for API models), which is logged first; with ``dry_run``
    nothing else happens.
    """
    settings = cfg["extract"]
    predictor = predictors.build(cfg, model, dataset, condition, inputs)
    frames = {
        split: evaluated_items(pd.read_parquet(inputs.data_dir / f"{split}.parquet"), settings["max_items"])
        for split in settings["splits"]
    }
    plan = predictor.plan(frames)
    log.info("%s %s %s plan: %s", model, dataset, condition, json.dumps(plan, sort_keys=True))
    if dry_run:
        return plan
    summary: dict[str, Any] = {"provenance": predictor.provenance, "splits": {}}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, frame in frames.items():
        with atomic_path(out_dir / f"{split}.prompts.txt") as tmp:
            tmp.write_text(predictor.examples(frame.head(3)))
        t0 = time.perf_counter()
        result = run_sharded(
            len(frame),
            settings["shard_size"],
            out_dir / f"{split}.parquet",
            # beside the declared output folder: both orchestrators delete that folder before rerunning a step
            out_dir.with_name(f".{out_dir.name}.{split}.parts"),
            {**predictor.provenance, "split": split},
            lambda rows, frame=frame: predictor.predict(frame.iloc[rows]),
        )
        summary["splits"][split] = {
            "items": len(result),
            "mean_coverage": float(result["coverage"].mean()),
            "min_coverage": float(result["coverage"].min()),
            "tokens": int(result["n_prompt_tokens"].sum()),
            "seconds": round(time.perf_counter() - t0, 3),
            **predictor.summarise(result),
        }
        log.info("%s %s %s %s: %s", model, dataset, condition, split, summary["splits"][split])
    write_json(out_dir / "summary.json", summary)
    return plan
