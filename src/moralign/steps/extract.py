"""extract: the answer distribution of every item of the configured splits, for one (model, dataset, condition)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from moralign import predictors
from moralign.config import Config
from moralign.extraction import run_sharded
from moralign.io import atomic_path, write_json

log = logging.getLogger(__name__)


def run(
    cfg: Config,
    model: str,
    dataset: str,
    condition: str,
    data_dir: Path,
    out_dir: Path,
    base_dir: Path | None = None,
    adapter_dir: Path | None = None,
) -> None:
    """Write ``<split>.parquet`` (resumable shards), ``<split>.prompts.txt`` and ``summary.json`` to ``out_dir``."""
    settings = cfg["extract"]
    predictor = predictors.build(cfg, model, dataset, condition, predictors.CellInputs(data_dir, base_dir, adapter_dir))
    summary: dict[str, Any] = {"provenance": predictor.provenance, "splits": {}}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in settings["splits"]:
        frame = pd.read_parquet(data_dir / f"{split}.parquet")
        if settings["max_items"]:
            frame = frame.head(settings["max_items"])
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
            # items whose text was cut to fit extract.max_length (moralign.prompts.PromptBuilder.encode)
            "shortened_items": int(result["shortened"].sum()),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if summary["splits"][split]["shortened_items"]:
            log.warning(
                "%s %s %s: %d items shortened to fit extract.max_length=%s",
                model,
                dataset,
                split,
                summary["splits"][split]["shortened_items"],
                settings["max_length"],
            )
        log.info("%s %s %s %s: %s", model, dataset, condition, split, summary["splits"][split])
    write_json(out_dir / "summary.json", summary)
