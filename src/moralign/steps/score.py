"""score: every metric, with bootstrap intervals, of one (model, dataset, condition) cell."""

from __future__ import annotations

from pathlib import Path

from moralign import censoring
from moralign.config import Config
from moralign.errors import DataError
from moralign.inputs import check_baseline, check_predictions
from moralign.io import read_json, write_json, write_parquet
from moralign.scoring import score_cell


def run(
    cfg: Config,
    dataset: str,
    condition: str,
    data_dir: Path,
    pred_dir: Path,
    out: Path,
    items: Path,
    baseline_dir: Path | None = None,
    seed: int | None = None,
) -> None:
    """Write the cell's scores to ``out`` and its per-item metrics to ``items``; ``seed``: a trained cell's."""
    split = cfg["experiment"]["eval_split"]
    splits = [split, "dev"]  # dev: the temperature and concentration are fitted there
    check_predictions(pred_dir, data_dir, dataset, splits, condition=condition)
    if baseline_dir is not None:
        check_predictions(baseline_dir, data_dir, dataset, splits)
        check_baseline(pred_dir, baseline_dir, splits)
    result, per_item = score_cell(pred_dir, data_dir, split, cfg["score"], baseline_dir)
    provenance = read_json(pred_dir / "summary.json")["provenance"]
    trained_with = provenance.get("seed")
    if seed is not None and trained_with is not None and trained_with != seed:
        raise DataError(f"{pred_dir}: predictions of a model trained with seed {trained_with}, not {seed}")
    result.update(split=split, condition=condition, seed=seed, provenance=provenance)
    if provenance.get("api_model"):
        # an API reading: how many answers were censored, and the metrics under other treatments of them
        result["censoring"] = censoring.summarise(pred_dir, data_dir, split, "dev", cfg["score"])
    write_json(out, result)
    write_parquet(items, per_item)
