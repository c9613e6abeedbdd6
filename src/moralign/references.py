"""Reference rows: what a trivial predictor scores, and the best any predictor can expect (Scruples' BEST).

BEST (Lourie et al., 2021): annotators' votes on an item are a sample from its unknown true distribution. Fit a
Dirichlet prior alpha_hat to all items' vote counts by maximum likelihood (Dirichlet-multinomial likelihood,
analytic gradient), then the oracle predicts each item's true distribution, which given the votes y_i follows
the posterior Dirichlet(alpha_hat + y_i). BEST's score is the metric's expectation under that posterior,
estimated by seeded Monte Carlo with its standard error.

BEST is a floor only where predicting the true distribution is optimal, i.e. for a proper scoring rule that is
linear in the observed vote shares: xentropy (E over the votes of -sum_j h_j log q_j = -sum_j p_j log q_j, minimal
at q = p). For the other columns it is the oracle's expected score, not a bound: the Dirichlet-multinomial NLL
with c fixed to 1 rewards predictions flatter than the true distribution (on the real Scruples dev counts a
flattened oracle, p^(1/T) renormalised with T = 1.5, scores below BEST: see benchmarks/validate_reference.py), and
distances such as total variation are minimised by other predictions too. The metrics registered with
``best_bounds`` (``moralign.metrics.best_floors()``) are where the table prints and the figures draw BEST.

The train prior is the best constant predictor under xentropy: the mean of the training items' human
distributions (not the pooled votes, in which a few items with thousands of votes dominate).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import digamma, gammaln

from moralign import metrics


def dm_loglik(counts: np.ndarray, alpha: np.ndarray) -> float:
    """Total Dirichlet-multinomial log-likelihood of ``counts`` under one shared ``alpha``."""
    return float(-metrics.dirichlet_multinomial_nll(counts, np.log(alpha)[None, :].repeat(len(counts), 0)).sum())


def fit_dirichlet_prior(counts: np.ndarray) -> np.ndarray:
    """Maximum-likelihood alpha of a Dirichlet-multinomial over all items (L-BFGS on log alpha)."""
    counts = np.asarray(counts, dtype=float)
    n = counts.sum(axis=1)

    def objective(log_alpha: np.ndarray) -> tuple[float, np.ndarray]:
        alpha = np.exp(log_alpha)
        total = alpha.sum()
        ll = (gammaln(total) - gammaln(total + n)).sum() + (gammaln(alpha + counts) - gammaln(alpha)).sum()
        # d ll / d alpha_j = sum_i psi(A) - psi(A + N_i) + psi(alpha_j + y_ij) - psi(alpha_j)
        grad = (digamma(total) - digamma(total + n)).sum() + (digamma(alpha + counts) - digamma(alpha)).sum(axis=0)
        return -ll, -grad * alpha  # chain rule for the log parametrisation

    start = np.log(counts.sum(axis=0) / counts.sum() + 1e-3)
    res = minimize(objective, start, jac=True, method="L-BFGS-B")
    if not res.success:
        raise RuntimeError(f"Dirichlet prior fit did not converge: {res.message}")
    return np.exp(res.x)


def best_oracle(
    counts: np.ndarray, alpha: np.ndarray, samples: int, seed: int, resamples: int = 1000
) -> dict[str, Any]:
    """Expected metrics of predicting each item's posterior-sampled true distribution.

    Returns the same structure as :func:`moralign.metrics.summarise` (value with a bootstrap interval over
    items of the per-item expectations) plus ``mc_se``: the Monte Carlo standard error of each value.
    """
    counts = np.asarray(counts)
    rng = np.random.default_rng(seed)
    per_draw: dict[str, list[np.ndarray]] = {}
    for _ in range(samples):
        draw = rng.gamma(alpha[None, :] + counts)  # Dirichlet(alpha + y_i) via normalised gammas
        p = draw / draw.sum(axis=1, keepdims=True)
        # a gamma draw can underflow to exactly 0 for tiny alpha: that is a real zero, kept as -inf
        items = metrics.per_item_metrics(counts, metrics.log_probs(p), np.ones(len(counts)), 1.0, 1.0)
        for name, values in items.items():
            per_draw.setdefault(name, []).append(values)
    stacked = {k: np.stack(v) for k, v in per_draw.items()}  # (samples x items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # accuracy is NaN in every draw of a tied item
        expected = {k: np.nanmean(v, axis=0) for k, v in stacked.items()}
    draw_means = {k: np.nanmean(v, axis=1) for k, v in stacked.items()}
    idx = metrics.bootstrap_indices(len(counts), resamples, seed) if resamples else None
    out: dict[str, Any] = {
        "metrics": {},
        "mc_se": {},
        "alpha": alpha.tolist(),
        "samples": samples,
        "n_items": len(counts),
        "n_ties": int((metrics.majority_labels(counts) < 0).sum()),
    }
    for name, values in expected.items():
        if name in ("calibrated_xentropy", "dirichlet_fitted"):
            continue  # the oracle is not recalibrated: these equal their unfitted versions by construction
        reps = None if idx is None else np.nanmean(values[idx], axis=1)
        out["metrics"][name] = metrics.entry(float(np.nanmean(values)), reps)
        out["mc_se"][name] = float(draw_means[name].std(ddof=1) / np.sqrt(samples))
    out["per_item"] = expected
    return out


def mean_distribution(counts: np.ndarray) -> np.ndarray:
    """Mean of the items' human distributions: the constant q minimising mean xentropy (the train prior).

    d/dq of mean_i -sum_j h_ij log q_j under sum_j q_j = 1 vanishes at q = mean_i h_i; every item weighs the same,
    whatever its number of votes.
    """
    counts = np.asarray(counts, dtype=float)
    n = counts.sum(axis=1, keepdims=True)
    if not (n > 0).all():
        raise ValueError(f"{int((n <= 0).sum())} item(s) without votes: no human distribution to average")
    return (counts / n).mean(axis=0)


def reference_rows(
    counts: np.ndarray, dev_counts: np.ndarray, train_counts: np.ndarray, settings: dict[str, Any]
) -> dict[str, Any]:
    """The reference rows of one dataset on the evaluation split's ``counts``: uniform, train prior, BEST.

    The constant rows are scored like a model (T and c fitted on ``dev_counts``); ``train_prior`` is
    :func:`mean_distribution` of ``train_counts``. BEST carries its prior (fitted on ``counts``), the Monte Carlo
    standard error of each value and ``floor_for``, the metrics it bounds (``metrics.best_floors()``).
    """
    resamples, seed = settings["bootstrap_resamples"], settings["seed"]
    n_choices = counts.shape[1]
    rows: dict[str, Any] = {}
    constants = {"uniform": np.full(n_choices, 1.0 / n_choices), "train_prior": mean_distribution(train_counts)}
    for name, probs in constants.items():
        logp = metrics.constant_prediction(probs, len(counts))
        dev = (dev_counts, metrics.constant_prediction(probs, len(dev_counts)))
        res = metrics.summarise(counts, logp, np.ones(len(counts)), dev, resamples, seed)
        res.pop("per_item")
        rows[name] = {**res, "prediction": probs.tolist()}
    best = best_oracle(counts, fit_dirichlet_prior(counts), settings["best_samples"], seed, resamples)
    best.pop("per_item")
    rows["best"] = {**best, "floor_for": sorted(metrics.best_floors())}
    return rows
