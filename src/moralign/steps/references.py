"""references: the reference rows of one dataset (uniform, train prior, Scruples' BEST oracle)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from moralign.config import Config
from moralign.data import counts_matrix
from moralign.io import write_json
from moralign.references import reference_rows

log = logging.getLogger(__name__)


def run(cfg: Config, dataset: str, data_dir: Path, out: Path) -> None:
    """Write the reference rows of ``dataset`` on the evaluation split to ``out``."""
    split = cfg["experiment"]["eval_split"]
    counts = {s: counts_matrix(pd.read_parquet(data_dir / f"{s}.parquet")) for s in {split, "dev", "train"}}
    rows = reference_rows(counts[split], counts["dev"], counts["train"], cfg["score"])
    write_json(out, {"dataset": dataset, "split": split, "rows": rows})
    best = rows["best"]
    log.info(
        "%s references: BEST xentropy %.4f (alpha %s)",
        dataset,
        best["metrics"]["xentropy"]["value"],
        np.round(best["alpha"], 3).tolist(),
    )
