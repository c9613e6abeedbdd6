"""summarise_readings: the readings table, its differences and its three figures, for one dataset.

Every read cell of the run (model x condition x seed) contributes its ``logprob`` reading (extract's predictions
of the eval split) and its ``sample`` and ``verbal`` readings (the read step's frames); moralign.readings.report
scores them against the human votes of the same items.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from moralign.config import Config
from moralign.data import evaluated_items
from moralign.errors import DataError
from moralign.figures import READING_FIGURES
from moralign.io import read_json
from moralign.pipeline.cells import cell_name
from moralign.readings.report import ReadingCell, ReportSettings, write_report

log = logging.getLogger(__name__)


def _frame(path: Path, ids: pd.Series) -> pd.DataFrame:
    """A predictions frame restricted to the items read (first ``readings.max_items`` of the eval split)."""
    if not path.is_file():
        raise DataError(f"{path}: missing (the step that writes it did not finish?)")
    frame = pd.read_parquet(path)
    return frame[frame["id"].isin(ids)].reset_index(drop=True)


def load_cells(
    cfg: Config,
    items: pd.DataFrame,
    pred_dirs: list[Path],
    read_dirs: list[Path],
    summaries: list[dict[str, Any]],
    split: str,
) -> list[ReadingCell]:
    """Every reading of every read cell, in table order; the folders must be the run's cells in that order."""
    cells = []
    for (model, condition, seed), pred_dir, read_dir, summary in zip(
        cfg.reading_cells(), pred_dirs, read_dirs, summaries, strict=True
    ):
        tail = f"{model}/{cell_name(condition, seed)}"
        for folder in (pred_dir, read_dir):
            if not folder.as_posix().endswith(tail):
                raise DataError(f"{folder}: expected the folder of cell {tail}")
        if summary["split"] != split:
            raise DataError(f"{read_dir}/summary.json: read on split {summary['split']!r}, the run evaluates {split!r}")
        seed_text = None if seed is None else str(seed)
        cells.append(
            ReadingCell(model, condition, seed_text, "logprob", _frame(pred_dir / f"{split}.parquet", items["id"]))
        )
        for reading in cfg.readings:
            frame = _frame(read_dir / f"{reading}.parquet", items["id"])
            cells.append(ReadingCell(model, condition, seed_text, reading, frame))
    return cells


def format_rates(cfg: Config, summaries: list[dict[str, Any]]) -> dict[str, float]:
    """Each read cell's format-following rate (from its summary.json), by cell label, where it drew unconstrained."""
    rates = {}
    for (model, condition, seed), summary in zip(cfg.reading_cells(), summaries, strict=True):
        entry = summary["readings"].get("format")
        if entry and entry["format_following_rate"] is not None:
            rates[f"{model} / {cell_name(condition, seed)}"] = entry["format_following_rate"]
    return rates


def run(
    cfg: Config,
    dataset: str,
    data_dir: Path,
    pred_dirs: list[Path],
    read_dirs: list[Path],
    table: Path,
    markdown: Path,
    differences: Path,
    figures_dir: Path,
) -> None:
    """Write the dataset's readings table (CSV, Markdown), its differences (CSV) and figures (PNG, PDF)."""
    split = cfg["experiment"]["eval_split"]
    items = evaluated_items(pd.read_parquet(data_dir / f"{split}.parquet"), cfg["readings"]["max_items"])
    n_cells = len(cfg.reading_cells())
    if not n_cells == len(pred_dirs) == len(read_dirs):
        raise DataError(
            f"{n_cells} read cells in the configuration but {len(pred_dirs)} prediction and {len(read_dirs)} "
            "readings folders were given"
        )
    summaries = [read_json(d / "summary.json") for d in read_dirs]
    cells = load_cells(cfg, items, pred_dirs, read_dirs, summaries, split)
    format_following = format_rates(cfg, summaries)
    settings = ReportSettings(
        n_draws=cfg["readings"]["sample"]["n_draws"],
        smoothing=cfg["readings"]["smoothing"],
        resamples=cfg["score"]["bootstrap_resamples"],
        seed=cfg["score"]["seed"],
    )
    write_report(
        dataset,
        items,
        cells,
        {r: cfg.baseline_of(r) for r in cfg.recipes},
        settings,
        table_csv=table,
        table_md=markdown,
        differences_csv=differences,
        figure_stems={k.removeprefix("readings_"): figures_dir / f"{dataset}_{k}" for k in READING_FIGURES},
        format_following=format_following,
    )
    log.info("%s: readings of %d cells on %d items written to %s", dataset, len(cells), len(items), table)
