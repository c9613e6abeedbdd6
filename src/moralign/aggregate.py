"""A table row from its training seeds: the mean over seeds, with an interval that resamples seeds and items.

A fine-tuned (or encoder) row is trained once per seed in ``finetune.seeds`` (``encoder.seeds``); every seed is a
cell of its own, scored on the same items. The row's value is the mean over its seeds of each seed's metric. Its
95 % interval comes from a two-level bootstrap, so that it shows training noise as well as item sampling: each
replicate draws S seeds with replacement from the row's S seeds, then the items (one draw of item indices per
replicate, the same for every row and every seed: ``moralign.metrics.bootstrap_indices`` with the score seed), and
averages the drawn seeds' metrics on the drawn items. With one seed (or an untrained row) this is exactly the item
bootstrap of the cell's own score file.

Differences pair what can be paired: a fine-tuned seed with its baseline on the same items (the base condition
on the weights it was trained on), and two recipes seed for seed where their seeds match (the same seed gives both
recipes the same initialisation and data order); the seed draw is then one draw of the matched pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moralign import metrics

# the seed draw's stream, apart from the item draw's (which must stay the cells' own bootstrap)
SEED_STREAM = 1


@dataclass(frozen=True)
class SeedItems:
    """The per-item metrics of one cell (a score step's ``.items.parquet``), tagged with its training seed."""

    seed: int | None
    items: pd.DataFrame

    def values(self, metric: str) -> np.ndarray:
        """Per-item values of a mean-over-items metric."""
        return self.items[metric].to_numpy(dtype=np.float64)

    @property
    def shares(self) -> np.ndarray:
        """(items x choices) predicted label shares (macro-F1's input)."""
        return np.stack(self.items["predicted"].to_numpy()).astype(np.float64)

    @property
    def labels(self) -> np.ndarray:
        """Majority labels, -1 on a tied human majority."""
        return self.items["majority"].to_numpy()


def _check_same_items(cells: Sequence[SeedItems], what: str) -> None:
    ids = list(cells[0].items["id"])
    for cell in cells[1:]:
        if list(cell.items["id"]) != ids:
            raise ValueError(f"{what}: seeds {cells[0].seed} and {cell.seed} were not scored on the same items")


def pooled_replicates(reps_per_seed: np.ndarray, seed: int) -> np.ndarray:
    """Two-level bootstrap replicates of a mean over seeds (``reps_per_seed``: seeds x resamples).

    Each replicate draws the seeds with replacement, then averages their item replicates of the same resample.
    """
    n_seeds, resamples = reps_per_seed.shape
    draws = np.random.default_rng([seed, SEED_STREAM]).integers(0, n_seeds, size=(resamples, n_seeds))
    return reps_per_seed[draws, np.arange(resamples)[:, None]].mean(axis=1)


def _combine(value_per_seed: np.ndarray, reps_per_seed: np.ndarray | None, seed: int) -> dict[str, float]:
    """Mean over seeds, and the two-level interval from per-seed item replicates (seeds x resamples)."""
    value = float(np.mean(value_per_seed))
    return metrics.entry(value, None if reps_per_seed is None else pooled_replicates(reps_per_seed, seed))


def _mean_replicates(values: np.ndarray, idx: np.ndarray | None) -> tuple[float, np.ndarray | None]:
    return float(np.nanmean(values)), (None if idx is None else np.nanmean(values[idx], axis=1))


def _set_replicates(
    metric: str, shares: np.ndarray, labels: np.ndarray, idx: np.ndarray | None
) -> tuple[float, np.ndarray | None]:
    """A whole-set metric (macro-F1): its value, and one per resample of ``idx``."""
    score = metrics.REGISTRY[metric].whole_set
    return float(score(shares, labels, None)), (None if idx is None else score(shares, labels, idx))


def row(cells: Sequence[SeedItems], resamples: int, seed: int, what: str = "row") -> dict[str, dict[str, float]]:
    """Every metric of a table row (its seeds' cells) as {value, low, high}: mean over seeds, two-level interval."""
    _check_same_items(cells, what)
    n = len(cells[0].items)
    idx = metrics.bootstrap_indices(n, resamples, seed) if resamples else None
    out = {}
    for metric in metrics.names():
        if metrics.REGISTRY[metric].whole_set is not None:
            pairs = [_set_replicates(metric, c.shares, c.labels, idx) for c in cells]
        else:
            pairs = [_mean_replicates(c.values(metric), idx) for c in cells]
        values = np.array([v for v, _ in pairs])
        reps = None if idx is None else np.stack([r for _, r in pairs])
        out[metric] = _combine(values, reps, seed)
    return out


def difference(
    cells: Sequence[SeedItems], baselines: Sequence[SeedItems], resamples: int, seed: int, what: str = "difference"
) -> dict[str, dict[str, float]]:
    """Every metric of ``cells`` minus ``baselines``, paired item by item and seed by seed.

    ``baselines`` is either one untrained cell (every seed is compared with it) or one cell per seed, in the same
    order as ``cells`` (two recipes' matched seeds). NaN (accuracy on a tied majority) must fall on the same items.
    """
    if len(baselines) == 1:
        baselines = list(baselines) * len(cells)
    if len(baselines) != len(cells):
        raise ValueError(f"{what}: {len(cells)} seeds against {len(baselines)} baselines")
    _check_same_items([*cells, *baselines], what)
    n = len(cells[0].items)
    idx = metrics.bootstrap_indices(n, resamples, seed) if resamples else None
    out = {}
    for metric in metrics.names():
        values, reps = [], []
        for cell, base in zip(cells, baselines, strict=True):
            if metrics.REGISTRY[metric].whole_set is not None:
                b_value, b_reps = _set_replicates(metric, base.shares, base.labels, idx)
                c_value, c_reps = _set_replicates(metric, cell.shares, cell.labels, idx)
                values.append(c_value - b_value)
                reps.append(None if idx is None else c_reps - b_reps)
                continue
            a, b = base.values(metric), cell.values(metric)
            if (np.isnan(a) != np.isnan(b)).any():
                raise ValueError(f"{what}: {metric} is NaN on different items: not the same items")
            value, rep = _mean_replicates(b - a, idx)
            values.append(value)
            reps.append(rep)
        out[metric] = _combine(np.array(values), None if idx is None else np.stack(reps), seed)
    return out


def matched_seeds(a: Sequence[SeedItems], b: Sequence[SeedItems]) -> tuple[list[SeedItems], list[SeedItems]]:
    """The cells of ``a`` and ``b`` whose seeds match, in ``a``'s seed order."""
    by_seed = {c.seed: c for c in b}
    pairs = [(c, by_seed[c.seed]) for c in a if c.seed in by_seed]
    return [c for c, _ in pairs], [d for _, d in pairs]


def describe(cells: Sequence[SeedItems]) -> dict[str, Any]:
    """Seeds of a row, for the table: how many, and which."""
    seeds = [c.seed for c in cells if c.seed is not None]
    return {"seeds": len(seeds), "seed_values": seeds}
