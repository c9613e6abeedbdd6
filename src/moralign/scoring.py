"""Scoring one cell: predictions aligned with the human votes by item id, every metric, the paired base difference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moralign import metrics
from moralign.data import counts_matrix


@dataclass(frozen=True)
class Aligned:
    """One split's predictions next to its votes, row for row."""

    ids: list[str]
    counts: np.ndarray
    logp: np.ndarray
    coverage: np.ndarray
    concentration: np.ndarray | None = None  # Σα per item, from a model trained with a Dirichlet-multinomial loss

    @property
    def dev_pair(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts, log p), what the temperature and concentration are fitted on."""
        return self.counts, self.logp


def load_aligned(pred_dir: Path, split: str, data_dir: Path) -> Aligned:
    """Counts, log p and coverage aligned by id; a prediction file with items not in the data is an error.

    Every item is checked (:func:`moralign.metrics.check_inputs`): a NaN, non-distribution or p = 0 on a voted
    choice is an error naming the file and the item ids, never an item a mean silently skips.
    """
    gold = pd.read_parquet(data_dir / f"{split}.parquet")
    pred = pd.read_parquet(pred_dir / f"{split}.parquet")
    merged = pred.merge(gold[["id", "counts"]], on="id", how="left", validate="one_to_one")
    if merged["counts"].isna().any():
        missing = merged.loc[merged["counts"].isna(), "id"].head(3).tolist()
        raise ValueError(f"{pred_dir / (split + '.parquet')}: ids not in {data_dir / split}.parquet, e.g. {missing}")
    p = np.stack(merged["p"].to_numpy())
    own = merged["concentration"].to_numpy(dtype=float) if "concentration" in merged.columns else None
    aligned = Aligned(
        list(merged["id"]), counts_matrix(merged), metrics.log_probs(p), merged["coverage"].to_numpy(), own
    )
    try:
        metrics.check_inputs(aligned.counts, aligned.logp, aligned.coverage, aligned.ids)
        if own is not None:
            metrics.check_concentration(own, len(own), aligned.ids)
    except ValueError as err:
        raise ValueError(f"{pred_dir / (split + '.parquet')}: {err}") from None
    return aligned


def score_cell(
    pred_dir: Path,
    data_dir: Path,
    split: str,
    settings: dict[str, Any],
    baseline_dir: Path | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Every metric of one cell with intervals (T and c fitted on dev), and the result's per-item table.

    ``split`` is the evaluation split; the temperature and concentration are fitted on the cell's dev predictions
    only, so ``split`` cannot be dev. With ``baseline_dir`` (a fine-tuned cell) also the paired difference to its
    base predictions on the same items (same ids in the same order; equal vote counts are not enough).
    """
    if split == "dev":
        raise ValueError("the evaluation split cannot be dev: the temperature and concentration are fitted on dev")
    resamples, seed = settings["bootstrap_resamples"], settings["seed"]
    cell = load_aligned(pred_dir, split, data_dir)
    dev = load_aligned(pred_dir, "dev", data_dir).dev_pair
    result = metrics.summarise(
        cell.counts, cell.logp, cell.coverage, dev, resamples, seed, cell.ids, cell.concentration
    )
    per_item = result.pop("per_item")
    if baseline_dir is not None:
        base = load_aligned(baseline_dir, split, data_dir)
        if base.ids != cell.ids:
            raise ValueError(f"{baseline_dir} and {pred_dir} do not cover the same items in the same order")
        base_dev = load_aligned(baseline_dir, "dev", data_dir).dev_pair
        base_fit = metrics.fit_on_dev(base_dev)
        base_items = metrics.per_item_metrics(
            base.counts, base.logp, base.coverage, *base_fit, base.ids, base.concentration
        )
        diff = {name: metrics.paired_difference(base_items[name], per_item[name], resamples, seed) for name in per_item}
        for name in metrics.names():
            if metrics.REGISTRY[name].whole_set is not None:  # macro-F1: recomputed per resample, not a mean
                diff[name] = metrics.paired_set_difference(name, cell.counts, base.logp, cell.logp, resamples, seed)
        result["difference_to_base"] = diff
    # the label and predicted shares behind macro-F1 (not a mean over items): the table recomputes it per resample
    inputs = {"majority": metrics.majority_labels(cell.counts), "predicted": list(metrics.predicted_shares(cell.logp))}
    return result, pd.DataFrame({"id": cell.ids, **per_item, **inputs})
