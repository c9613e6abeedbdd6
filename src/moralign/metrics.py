"""Metrics of model distributions against human vote distributions (design.md §5).

Notation: counts y (items x choices), N = y.sum(1), human distribution h = y / N, model distribution p
(given as log p). Everything is computed in log space; p is never clipped. All functions are vectorised over
items and return per-item values where the metric is a mean over items, so intervals come from the same code.
Lower is better except for accuracy, macro_f1 and coverage.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import gammaln, log_softmax

LOWER_IS_BETTER = {
    "xentropy": True,
    "calibrated_xentropy": True,
    "dirichlet": True,
    "dirichlet_fitted": True,
    "paper_xentropy": True,
    "total_variation": True,
    "jensen_shannon": True,
    "accuracy": False,
    "macro_f1": False,
    "coverage": False,
}
METRICS = tuple(LOWER_IS_BETTER)


def _xlogy_zero(h: np.ndarray, logp: np.ndarray) -> np.ndarray:
    # 0 * log 0 = 0: a choice nobody voted for contributes nothing, even where the model gives it p = 0.
    return np.where(h > 0, h * np.where(h > 0, logp, 0.0), 0.0)


def xentropy(h: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """Per-item soft-label cross-entropy -sum_j h_j log p_j (Scruples' xentropy)."""
    return -_xlogy_zero(h, logp).sum(axis=1)


def dirichlet_multinomial_nll(counts: np.ndarray, log_alpha: np.ndarray) -> np.ndarray:
    """Per-item Dirichlet-multinomial NLL of the votes, Scruples' form (no multinomial coefficient)."""
    alpha = np.exp(log_alpha)
    total = alpha.sum(axis=1)
    n = counts.sum(axis=1)
    loglik = gammaln(total) - gammaln(total + n) + (gammaln(alpha + counts) - gammaln(alpha)).sum(axis=1)
    return -loglik


def dirichlet(counts: np.ndarray, logp: np.ndarray, concentration: float = 1.0) -> np.ndarray:
    """Per-item Dirichlet-multinomial NLL with alpha = c * p (c = 1 is the paper's setting)."""
    return dirichlet_multinomial_nll(counts, np.log(concentration) + logp)


def paper_xentropy(h: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """The paper's cross-entropy: probabilities passed where logits were expected (compatibility only)."""
    return xentropy(h, log_softmax(np.exp(logp), axis=1))


def total_variation(h: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """Per-item total variation distance ½ sum_j |p_j - h_j|."""
    return 0.5 * np.abs(np.exp(logp) - h).sum(axis=1)


def jensen_shannon(h: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """Per-item Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint)."""
    p = np.exp(logp)
    log_m = np.log(0.5 * (p + h))
    kl_h = _xlogy_zero(h, np.log(np.where(h > 0, h, 1.0)) - log_m).sum(axis=1)
    kl_p = _xlogy_zero(p, logp - log_m).sum(axis=1)
    return 0.5 * (kl_h + kl_p) / np.log(2.0)


def majority_labels(counts: np.ndarray) -> np.ndarray:
    """Majority choice per item, -1 where the top count is tied."""
    top = counts.max(axis=1, keepdims=True)
    tied = (counts == top).sum(axis=1) > 1
    return np.where(tied, -1, counts.argmax(axis=1))


def macro_f1_from_labels(pred: np.ndarray, true: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 over the last axis (vectorised over leading axes, e.g. bootstrap resamples)."""
    scores = []
    for c in range(n_classes):
        tp = ((pred == c) & (true == c)).sum(axis=-1)
        fp = ((pred == c) & (true != c)).sum(axis=-1)
        fn = ((pred != c) & (true == c)).sum(axis=-1)
        denom = 2 * tp + fp + fn
        scores.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan))
    return np.nanmean(np.stack(scores), axis=0)


def fit_temperature(h: np.ndarray, logp: np.ndarray) -> float:
    """Temperature T minimising dev xentropy of softmax(log p / T) (Scruples' calibration)."""

    def loss(log_t: float) -> float:
        return float(xentropy(h, log_softmax(logp / np.exp(log_t), axis=1)).mean())

    return float(np.exp(minimize_scalar(loss, bounds=(-6.0, 6.0), method="bounded").x))


def fit_concentration(counts: np.ndarray, logp: np.ndarray) -> float:
    """Maximum-likelihood concentration c of alpha = c * p on dev."""

    def loss(log_c: float) -> float:
        return float(dirichlet(counts, logp, np.exp(log_c)).mean())

    return float(np.exp(minimize_scalar(loss, bounds=(-8.0, 12.0), method="bounded").x))


def fit_on_dev(dev: tuple[np.ndarray, np.ndarray] | None) -> tuple[float, float]:
    """Temperature and concentration fitted on (dev counts, dev log p); (1, 1) without dev predictions."""
    if dev is None:
        return 1.0, 1.0
    counts, logp = dev
    return fit_temperature(counts / counts.sum(1, keepdims=True), logp), fit_concentration(counts, logp)


def bootstrap_indices(n_items: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples x items) indices of the item bootstrap, shared by every metric of a cell (seeded)."""
    return np.random.default_rng(seed).integers(0, n_items, size=(resamples, n_items))


def interval(values: np.ndarray) -> tuple[float, float]:
    """Percentile 95 % interval of bootstrap replicates."""
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def per_item_metrics(
    counts: np.ndarray, logp: np.ndarray, coverage: np.ndarray, temperature: float, concentration: float
) -> dict[str, np.ndarray]:
    """Every per-item metric (accuracy is NaN on tied items, which the means skip)."""
    n = counts.sum(axis=1, keepdims=True)
    h = counts / n
    labels = majority_labels(counts)
    correct = (logp.argmax(axis=1) == labels).astype(float)
    return {
        "xentropy": xentropy(h, logp),
        "calibrated_xentropy": xentropy(h, log_softmax(logp / temperature, axis=1)),
        "dirichlet": dirichlet(counts, logp, 1.0),
        "dirichlet_fitted": dirichlet(counts, logp, concentration),
        "paper_xentropy": paper_xentropy(h, logp),
        "total_variation": total_variation(h, logp),
        "jensen_shannon": jensen_shannon(h, logp),
        "accuracy": np.where(labels >= 0, correct, np.nan),
        "coverage": coverage,
    }


def _mean_metric(values: np.ndarray, idx: np.ndarray | None) -> tuple[float, np.ndarray | None]:
    value = float(np.nanmean(values))
    return value, (None if idx is None else np.nanmean(values[idx], axis=1))


def summarise(
    counts: np.ndarray,
    logp: np.ndarray,
    coverage: np.ndarray,
    dev: tuple[np.ndarray, np.ndarray] | None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric of one cell with its 95 % bootstrap interval, plus the fitted T and c.

    ``dev`` = (dev counts, dev log p) for the fitted temperature and concentration; without it they are 1.
    """
    temperature, concentration = fit_on_dev(dev)
    items = per_item_metrics(counts, logp, coverage, temperature, concentration)
    idx = bootstrap_indices(len(counts), resamples, seed) if resamples else None
    out: dict[str, Any] = {
        "metrics": {},
        "temperature": temperature,
        "concentration": concentration,
        "n_items": len(counts),
        "n_ties": int((majority_labels(counts) < 0).sum()),
    }
    for name, values in items.items():
        value, reps = _mean_metric(values, idx)
        out["metrics"][name] = entry(value, reps)
    f1, reps = _macro_f1_replicates(counts, logp, idx)
    out["metrics"]["macro_f1"] = entry(f1, reps)
    out["per_item"] = items
    return out


def entry(value: float, reps: np.ndarray | None) -> dict[str, float]:
    """A table entry: the value and the 95 % interval of its bootstrap replicates (NaN without replicates)."""
    if reps is None:
        return {"value": value, "low": float("nan"), "high": float("nan")}
    lo, hi = interval(reps)
    return {"value": value, "low": lo, "high": hi}


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean of b - a on the same items with a paired bootstrap 95 % interval (NaN items skipped)."""
    diff = b - a
    value = float(np.nanmean(diff))
    if not resamples:
        return {"value": value, "low": float("nan"), "high": float("nan")}
    reps = np.nanmean(diff[bootstrap_indices(len(diff), resamples, seed)], axis=1)
    lo, hi = interval(reps)
    return {"value": value, "low": lo, "high": hi}


def _macro_f1_replicates(
    counts: np.ndarray, logp: np.ndarray, idx: np.ndarray | None
) -> tuple[float, np.ndarray | None]:
    labels, pred = majority_labels(counts), logp.argmax(axis=1)
    keep = labels >= 0
    value = float(macro_f1_from_labels(pred[keep], labels[keep], counts.shape[1]))
    if idx is None:
        return value, None
    true_b = labels[idx]
    # tied items are excluded from every resample by giving them a prediction no class matches
    pred_b = np.where(true_b >= 0, pred[idx], -2)
    return value, macro_f1_from_labels(pred_b, true_b, counts.shape[1])


def paired_macro_f1_difference(
    counts: np.ndarray, logp_a: np.ndarray, logp_b: np.ndarray, resamples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """macro-F1 of b minus a on the same items, with a paired bootstrap 95 % interval."""
    idx = bootstrap_indices(len(counts), resamples, seed) if resamples else None
    a, reps_a = _macro_f1_replicates(counts, logp_a, idx)
    b, reps_b = _macro_f1_replicates(counts, logp_b, idx)
    return entry(b - a, None if idx is None else reps_b - reps_a)


def log_probs(p: np.ndarray) -> np.ndarray:
    """Log of a probability matrix; exact zeros become -inf (never clipped)."""
    with np.errstate(divide="ignore"):
        return np.log(p)


def constant_prediction(probs: np.ndarray, n_items: int) -> np.ndarray:
    """Log p of one distribution predicted for every item."""
    return np.repeat(log_probs(probs)[None, :], n_items, axis=0)
