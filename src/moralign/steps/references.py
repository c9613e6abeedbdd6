"""references: the reference rows of one dataset (uniform, train prior, Scruples' BEST oracle).

Reads the config sections ``score``, ``experiment.eval_split`` and ``extract.max_items``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from moralign.config import Config
from moralign.data import counts_matrix, evaluated_items
from moralign.io import write_json
from moralign.references import reference_rows

log = logging.getLogger(__name__)


def run(cfg: Config, dataset: str, data_dir: Path, out: Path) -> None:
    """Write the reference rows of ``dataset`` on the evaluation split to ``out``.

    ``extract.max_items`` caps the evaluation and dev splits exactly as extraction does (the first n items), so
    the reference rows are computed on the items of every model row. Train stays whole: it only estimates the
    train prior, a fitted constant like a model's weights, and no train item is scored.
    """
    split, max_items = cfg["experiment"]["eval_split"], cfg["extract"]["max_items"]
    counts = {}
    for s in {split, "dev", "train"}:
        frame = pd.read_parquet(data_dir / f"{s}.parquet")
        if s != "train":
            frame = evaluated_items(frame, max_items)  # the same cap as the extract step
        counts[s] = counts_matrix(frame)
    rows = reference_rows(counts[split], counts["dev"], counts["train"], cfg["score"])
    write_json(out, {"dataset": dataset, "split": split, "rows": rows})
    best = rows["best"]
    log.info(
        "%s references on %d %s items: BEST xentropy %.4f (alpha %s)",
        dataset,
        len(counts[split]),
        split,
        best["metrics"]["xentropy"]["value"],
        np.round(best["alpha"], 3).tolist(),
    )
