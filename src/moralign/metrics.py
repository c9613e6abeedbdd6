"""Metrics of model distributions against human vote distributions (docs/design.md, "Metrics").

Notation: counts y (items x choices), N = y.sum(1), human distribution h = y / N, model distribution p
(given as log p). Everything is computed in log space; p is never clipped. All functions are vectorised over
items and return per-item values where the metric is a mean over items, so intervals come from the same code.
Lower is better except for accuracy, macro_f1 and coverage.

What the metrics accept, and what they refuse (:func:`check_inputs`; an error names the items, never a silent
skip by a NaN-mean):

* every row of log p is a distribution: no NaN, no p > 1, exp(log p) sums to 1 (within 1e-6);
* log p = -inf (p = 0) is legitimate only for a choice nobody voted for: it adds nothing to xentropy
  (0 log 0 = 0) and a factor 1 to the Dirichlet likelihood. p = 0 on a voted choice makes xentropy and dirichlet
  infinite; extraction works in log space, so a real model never gets there by underflow, and such an item is an
  error naming it rather than an infinite mean (which a paired difference would then turn into NaN);
* the only NaN a per-item metric may hold is ``accuracy`` on an item whose HUMAN majority is tied: those items
  are excluded by design and counted (``n_ties``).

A predicted tie (log p exactly equal on the k top choices) is not an argmax to the first of them (which would
depend on the order of the choices): it counts as 1/k of a prediction of each tied choice, the expectation of a
uniformly random tie-break. Accuracy gets 1/k credit when the majority is among them; macro-F1 is computed from
the same fractional confusion counts (F1 of the expected confusion matrix, which, like accuracy, does not depend
on the choice order; the expected F1 itself has no closed form since F1 is not linear in the counts).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import gammaln, log_softmax

from moralign.metric_registry import REGISTRY, ItemContext, Metric, register_metric


def _xlogy_zero(h: np.ndarray, logp: np.ndarray) -> np.ndarray:
    # 0 * log 0 = 0: a choice nobody voted for contributes nothing, even where the model gives it p = 0.
    return np.where(h > 0, h * np.where(h > 0, logp, 0.0), 0.0)


def xentropy(h: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """Per-item soft-label cross-entropy -sum_j h_j log p_j (Scruples' xentropy)."""
    return -_xlogy_zero(h, logp).sum(axis=1)


def dirichlet_multinomial_nll(counts: np.ndarray, log_alpha: np.ndarray) -> np.ndarray:
    """Per-item Dirichlet-multinomial NLL of the votes, Scruples' form (no multinomial coefficient).

    A choice with no votes contributes Γ(alpha + 0) / Γ(alpha) = 1 for every alpha, also alpha = 0 (p = 0), where
    the two log-gammas would be inf - inf.
    """
    alpha = np.exp(log_alpha)
    total = alpha.sum(axis=1)
    n = counts.sum(axis=1)
    with np.errstate(invalid="ignore"):
        terms = np.where(counts > 0, gammaln(alpha + counts) - gammaln(alpha), 0.0)
    loglik = gammaln(total) - gammaln(total + n) + terms.sum(axis=1)
    return -loglik


def dirichlet(counts: np.ndarray, logp: np.ndarray, concentration: float | np.ndarray = 1.0) -> np.ndarray:
    """Per-item Dirichlet-multinomial NLL with alpha = c * p (c = 1 is the paper's setting).

    ``concentration`` is one c for every item, or one per item (a model that predicts its own Σα).
    """
    return dirichlet_multinomial_nll(counts, np.log(np.asarray(concentration, dtype=float))[..., None] + logp)


def paper_xentropy(h: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """The paper's cross-entropy: probabilities passed where logits were expected (compatibility only)."""
    return xentropy(h, log_softmax(np.exp(logp), axis=1))


def total_variation(h: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """Per-item total variation distance ½ sum_j |p_j - h_j|."""
    return 0.5 * np.abs(np.exp(logp) - h).sum(axis=1)


def jensen_shannon(h: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """Per-item Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint)."""
    p = np.exp(logp)
    # m = 0 only on a choice with p = h = 0, whose terms _xlogy_zero sets to 0 (the -inf - -inf is never used)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_m = np.log(0.5 * (p + h))
        kl_h = _xlogy_zero(h, np.log(np.where(h > 0, h, 1.0)) - log_m).sum(axis=1)
        kl_p = _xlogy_zero(p, logp - log_m).sum(axis=1)
    return 0.5 * (kl_h + kl_p) / np.log(2.0)


def majority_labels(counts: np.ndarray) -> np.ndarray:
    """Majority choice per item, -1 where the top count is tied."""
    top = counts.max(axis=1, keepdims=True)
    tied = (counts == top).sum(axis=1) > 1
    return np.where(tied, -1, counts.argmax(axis=1))


def predicted_shares(logp: np.ndarray) -> np.ndarray:
    """Each item's predicted label as shares over the choices: 1 on the argmax, 1/k on each of k exactly tied tops."""
    top = logp == logp.max(axis=1, keepdims=True)
    return top / top.sum(axis=1, keepdims=True)


def macro_f1(shares: np.ndarray, labels: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """Macro-F1 of predicted label shares against the majority labels (-1 = tied majority, excluded).

    ``shares`` (items x choices) from :func:`predicted_shares`: a predicted tie adds 1/k of a true or false
    positive to each tied choice. The mean is over the choices that occur as a label or a prediction. With
    ``idx`` (resamples x items) one value per bootstrap resample; without it, a 0-d array.
    """
    if idx is None:
        idx = np.arange(len(labels))
    true = labels[idx]
    valid = true >= 0
    scores = []
    for c in range(shares.shape[1]):
        share, is_c = shares[:, c][idx], true == c
        tp = (share * is_c).sum(axis=-1)
        fp = (share * (valid & ~is_c)).sum(axis=-1)
        fn = ((1.0 - share) * is_c).sum(axis=-1)
        denom = 2 * tp + fp + fn
        scores.append(np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1.0), np.nan))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no valid item in a resample: NaN, as it should be
        return np.nanmean(np.stack(scores), axis=0)


def _describe(rows: np.ndarray, ids: Sequence[str] | None) -> str:
    shown = [f"{ids[r]!r}" if ids is not None else f"row {r}" for r in rows[:5]]
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return ", ".join(shown) + more


def check_inputs(
    counts: np.ndarray,
    logp: np.ndarray,
    coverage: np.ndarray | None = None,
    ids: Sequence[str] | None = None,
) -> None:
    """Raise ValueError naming the items (by id, else by row) that no metric can score honestly.

    Refused: vote counts that are negative or sum to 0; a log p row with NaN, p > 1 or not summing to 1;
    p = 0 on a choice somebody voted for (infinite xentropy and dirichlet); a coverage outside [0, 1].
    """
    counts, logp = np.asarray(counts), np.asarray(logp)
    if counts.shape != logp.shape or counts.ndim != 2:
        raise ValueError(f"votes {counts.shape} and predictions {logp.shape} must be (items x choices) alike")
    if ids is not None and len(ids) != len(counts):
        raise ValueError(f"{len(ids)} ids for {len(counts)} items")
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.exp(logp).sum(axis=1)
    problems = (
        ((counts < 0).any(axis=1) | ~(counts.sum(axis=1) > 0), "have no (or negative) vote counts"),
        (np.isnan(logp).any(axis=1) | (logp > 1e-9).any(axis=1), "have a NaN or p > 1 prediction"),
        (~(np.abs(total - 1.0) <= 1e-6), "have a prediction that is not a distribution (p does not sum to 1)"),
        (((counts > 0) & np.isneginf(logp)).any(axis=1), "give p = 0 to a choice annotators voted for"),
    )
    if coverage is not None:
        cov = np.asarray(coverage, dtype=float)
        problems += ((~((cov >= 0) & (cov <= 1 + 1e-6)), "have a coverage outside [0, 1]"),)
    for bad, reason in problems:
        rows = np.flatnonzero(bad)
        if len(rows):
            raise ValueError(f"{len(rows)} item(s) {reason}: {_describe(rows, ids)}")


def check_concentration(values: np.ndarray, n_items: int, ids: Sequence[str] | None = None) -> None:
    """Raise ValueError naming the items whose predicted concentration Σα is not a finite positive number."""
    values = np.asarray(values, dtype=float)
    if values.shape != (n_items,):
        raise ValueError(f"{values.shape} concentrations for {n_items} items")
    bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
    if len(bad):
        raise ValueError(f"{len(bad)} item(s) have a concentration that is not finite and > 0: {_describe(bad, ids)}")


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
    """Temperature and concentration fitted on (dev counts, dev log p); (1, 1) without dev predictions.

    They never see the evaluation split: that is why the evaluation split cannot be dev (config cross-checks).
    """
    if dev is None:
        return 1.0, 1.0
    counts, logp = dev
    check_inputs(counts, logp)
    return fit_temperature(counts / counts.sum(1, keepdims=True), logp), fit_concentration(counts, logp)


def bootstrap_indices(n_items: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples x items) indices of the item bootstrap, shared by every metric of a cell (seeded)."""
    return np.random.default_rng(seed).integers(0, n_items, size=(resamples, n_items))


def interval(values: np.ndarray) -> tuple[float, float]:
    """Percentile 95 % interval of bootstrap replicates."""
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def per_item_metrics(
    counts: np.ndarray,
    logp: np.ndarray,
    coverage: np.ndarray,
    temperature: float,
    concentration: float,
    ids: Sequence[str] | None = None,
    own_concentration: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every per-item metric; inputs are checked first (:func:`check_inputs`, errors name ``ids``).

    ``own_concentration``: the Σα a model predicted per item (Dirichlet-multinomial encoders); ``dirichlet`` then
    scores the model's own α = Σα · p, Scruples' score of such a model, instead of c = 1.

    Accuracy is the predicted share of the majority choice (1/k on a predicted k-way tie) and NaN on items whose
    human majority is tied, the only NaN any metric holds: the means skip those items and count them.
    """
    check_inputs(counts, logp, coverage, ids)
    if own_concentration is not None:
        check_concentration(own_concentration, len(counts), ids)
    h = counts / counts.sum(axis=1, keepdims=True)
    labels = majority_labels(counts)
    ctx = ItemContext(
        counts, h, logp, np.asarray(coverage, dtype=float), temperature, concentration, labels, own_concentration
    )
    items = {m.name: m.per_item(ctx) for m in REGISTRY.values() if m.per_item is not None}
    for name, values in items.items():
        bad = np.flatnonzero(~np.isfinite(values) & (labels >= 0 if REGISTRY[name].excludes_ties else True))
        if len(bad):
            raise ValueError(f"{name} is not finite for {len(bad)} item(s): {_describe(bad, ids)}")
    return items


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
    ids: Sequence[str] | None = None,
    own_concentration: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every metric of one cell with its 95 % bootstrap interval, plus the fitted T and c.

    ``dev`` = (dev counts, dev log p) for the fitted temperature and concentration; without it they are 1.
    ``ids`` name the items in errors. ``own_concentration``: see :func:`per_item_metrics`; ``dirichlet_alpha``
    says which α the ``dirichlet`` metric used ("model" or "c=1").
    """
    temperature, concentration = fit_on_dev(dev)
    items = per_item_metrics(counts, logp, coverage, temperature, concentration, ids, own_concentration)
    idx = bootstrap_indices(len(counts), resamples, seed) if resamples else None
    out: dict[str, Any] = {
        "metrics": {},
        "temperature": temperature,
        "concentration": concentration,
        "dirichlet_alpha": "c=1" if own_concentration is None else "model",
        "n_items": len(counts),
        "n_ties": int((majority_labels(counts) < 0).sum()),
    }
    labels, shares = majority_labels(counts), predicted_shares(logp)
    for metric in REGISTRY.values():
        if metric.per_item is not None:
            value, reps = _mean_metric(items[metric.name], idx)
        else:
            value, reps = _set_replicates(metric, shares, labels, idx)
        out["metrics"][metric.name] = entry(value, reps)
    out["per_item"] = items
    return out


def entry(value: float, reps: np.ndarray | None) -> dict[str, float]:
    """A table entry: the value and the 95 % interval of its bootstrap replicates (NaN without replicates)."""
    if reps is None:
        return {"value": value, "low": float("nan"), "high": float("nan")}
    lo, hi = interval(reps)
    return {"value": value, "low": lo, "high": hi}


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean of b - a on the same items with a paired bootstrap 95 % interval.

    NaN marks an excluded item (accuracy on a tied human majority): it must be NaN in both, and is skipped.
    """
    if (np.isnan(a) != np.isnan(b)).any():
        raise ValueError("paired values are NaN on different items: they do not describe the same items")
    diff = b - a
    value = float(np.nanmean(diff))
    if not resamples:
        return {"value": value, "low": float("nan"), "high": float("nan")}
    reps = np.nanmean(diff[bootstrap_indices(len(diff), resamples, seed)], axis=1)
    lo, hi = interval(reps)
    return {"value": value, "low": lo, "high": hi}


def _set_replicates(
    metric: Metric, shares: np.ndarray, labels: np.ndarray, idx: np.ndarray | None
) -> tuple[float, np.ndarray | None]:
    value = float(metric.whole_set(shares, labels, None))
    return value, (None if idx is None else metric.whole_set(shares, labels, idx))


def paired_set_difference(
    name: str, counts: np.ndarray, logp_a: np.ndarray, logp_b: np.ndarray, resamples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """A whole-set metric (macro-F1) of b minus a on the same items, with a paired bootstrap 95 % interval."""
    metric, labels = REGISTRY[name], majority_labels(counts)
    idx = bootstrap_indices(len(counts), resamples, seed) if resamples else None
    a, reps_a = _set_replicates(metric, predicted_shares(logp_a), labels, idx)
    b, reps_b = _set_replicates(metric, predicted_shares(logp_b), labels, idx)
    return entry(b - a, None if idx is None else reps_b - reps_a)


def log_probs(p: np.ndarray) -> np.ndarray:
    """Log of a probability matrix; exact zeros become -inf (never clipped)."""
    with np.errstate(divide="ignore"):
        return np.log(p)


def constant_prediction(probs: np.ndarray, n_items: int) -> np.ndarray:
    """Log p of one distribution predicted for every item."""
    return np.repeat(log_probs(probs)[None, :], n_items, axis=0)


# --------------------------------------------------------------------- the metrics, in table order (design: docs)


@register_metric("xentropy", lower_is_better=True, best_bounds=True)
def _xentropy(c: ItemContext) -> np.ndarray:
    return xentropy(c.h, c.logp)


@register_metric("calibrated_xentropy", lower_is_better=True)
def _calibrated_xentropy(c: ItemContext) -> np.ndarray:
    return xentropy(c.h, log_softmax(c.logp / c.temperature, axis=1))


@register_metric("dirichlet", lower_is_better=True)
def _dirichlet(c: ItemContext) -> np.ndarray:
    # c = 1 (the paper's setting), or the model's own alpha when it predicts one (Scruples' score of such a model)
    return dirichlet(c.counts, c.logp, 1.0 if c.own_concentration is None else c.own_concentration)


@register_metric("dirichlet_fitted", lower_is_better=True)
def _dirichlet_fitted(c: ItemContext) -> np.ndarray:
    return dirichlet(c.counts, c.logp, c.concentration)


@register_metric("paper_xentropy", lower_is_better=True)
def _paper_xentropy(c: ItemContext) -> np.ndarray:
    return paper_xentropy(c.h, c.logp)


@register_metric("total_variation", lower_is_better=True)
def _total_variation(c: ItemContext) -> np.ndarray:
    return total_variation(c.h, c.logp)


@register_metric("jensen_shannon", lower_is_better=True)
def _jensen_shannon(c: ItemContext) -> np.ndarray:
    return jensen_shannon(c.h, c.logp)


@register_metric("accuracy", lower_is_better=False, excludes_ties=True)
def _accuracy(c: ItemContext) -> np.ndarray:
    # the predicted share of the majority choice (1/k on a predicted k-way tie); NaN on a tied human majority
    correct = predicted_shares(c.logp)[np.arange(len(c.labels)), np.maximum(c.labels, 0)]
    return np.where(c.labels >= 0, correct, np.nan)


register_metric("macro_f1", lower_is_better=False, whole_set=True)(macro_f1)


@register_metric("coverage", lower_is_better=False)
def _coverage(c: ItemContext) -> np.ndarray:
    return c.coverage


# ------------------------------------------------------------------------------------------- the registry


def names() -> tuple[str, ...]:
    """Every registered metric, in table order."""
    return tuple(REGISTRY)


def lower_is_better(name: str) -> bool:
    """Whether a lower value of metric ``name`` is better."""
    return REGISTRY[name].lower_is_better


def best_floors() -> frozenset[str]:
    """The metrics BEST bounds (printed and drawn only there)."""
    return frozenset(m.name for m in REGISTRY.values() if m.best_bounds)
