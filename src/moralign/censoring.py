"""Censored answers of API cells made visible: how many items have one, and how much the metrics depend on them.

An OpenAI-compatible server returns only the top k (at most 20) candidate tokens of a position. An answer missing
from them is *censored*: its probability is not 0 but somewhere in (0, bound], the bound being the smallest
probability returned there. The openai predictor (moralign.predictors.openai) records per item what was observed
(``logp_choice``: the log-mass of each answer, -inf where censored), which answers were censored (``censored``)
and the bound (``logp_bound``); under ``extract.debias: swap`` the same per prompt order
(``*_by_order``, since the columns above mix the two orders). From these, :func:`summarise` re-derives the
distribution ``p`` under each treatment of the censored answers:

* ``bound``: the bound itself, the most probability the data allow (the predictor's default, what the results
  table shows). Under it xentropy and dirichlet are optimistic bounds, not values: on an item whose annotators
  chose a censored answer (at least as often as the bound's share), any lower true probability scores worse on
  both, without limit as it goes to 0;
* ``half_bound``, ``tenth_bound``: half and a tenth of the bound;
* ``uncensored``: no treatment at all, on the items without a censored answer only. Which items those are depends
  on the model's own confidence, so they are a subset, not a random sample.

Each is scored exactly as the score step scores a cell (moralign.metrics.summarise: bootstrap intervals, the
temperature and concentration fitted on the dev split's predictions under the same treatment), so ``bound``
reproduces the cell's scores and the other rows show how far a conclusion leans on the treatment.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moralign import metrics
from moralign.data import counts_matrix
from moralign.errors import DataError
from moralign.io import read_provenance

log = logging.getLogger(__name__)

# Log-probability given to a censored answer, relative to the bound (log(bound) + shift). bound and half_bound
# are also the choices of models.*.openai.censored (moralign.predictors.openai.CENSORED_TREATMENTS, kept equal by
# a test: the predictor does not import this module, so that extraction never depends on scoring code).
TREATMENTS: dict[str, float] = {"bound": 0.0, "half_bound": math.log(0.5), "tenth_bound": math.log(0.1)}
UNCENSORED = "uncensored"
SENSITIVITY = (*TREATMENTS, UNCENSORED)
DESCRIPTIONS = {
    "bound": "a censored answer gets the bound itself, the most the data allow (what the results table shows)",
    "half_bound": "a censored answer gets half the bound",
    "tenth_bound": "a censored answer gets a tenth of the bound",
    UNCENSORED: "only the items with no censored answer, scored as recorded (a subset the model's own confidence "
    "selects, not a random sample)",
}
COLUMNS = ("id", "p", "coverage", "logp_choice", "censored", "logp_bound")  # what every openai prediction file has
BY_ORDER = ("logp_choice_by_order", "censored_by_order", "logp_bound_by_order")  # and with debias: swap
# The columns of the Markdown report: the headline metrics, which a treatment can move (coverage is the observed
# mass, the same under every treatment). summarise() returns every metric.
SHOWN = ("xentropy", "calibrated_xentropy", "dirichlet", "total_variation", "accuracy")


def treated_p(logp_choice: np.ndarray, censored: np.ndarray, logp_bound: np.ndarray, shift: float) -> np.ndarray:
    """The distribution with every censored answer at ``logp_bound + shift``, renormalised over the answers.

    An item with every answer censored (no answer anywhere, a refusal, no log-probabilities) is uniform under any
    treatment: its answers share one bound, or none was returned at all.
    """
    logp_choice, censored = np.asarray(logp_choice, float), np.asarray(censored, bool)
    bound = np.asarray(logp_bound, float)[:, None] + shift
    treated = np.where(censored, bound, logp_choice)
    treated = np.where(censored.all(axis=1, keepdims=True), 0.0, treated)
    # the same arithmetic as moralign.predictors.openai.answer_distribution, so `bound` reproduces p bit for bit
    return np.exp(treated - np.logaddexp.reduce(treated, axis=1, keepdims=True))


def _matrix(column: pd.Series, dtype: type) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=dtype) for v in column])


def _orders(pred: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(observed log-masses, censored, bound) per prompt order, each in the task's choice order."""
    if BY_ORDER[0] not in pred.columns:
        return [(_matrix(pred["logp_choice"], float), _matrix(pred["censored"], bool), pred["logp_bound"].to_numpy())]
    logp = np.stack([_matrix(orders, float) for orders in pred["logp_choice_by_order"]])  # items x orders x answers
    cens = np.stack([_matrix(orders, bool) for orders in pred["censored_by_order"]])
    bound = _matrix(pred["logp_bound_by_order"], float)  # items x orders
    return [(logp[:, o], cens[:, o], bound[:, o]) for o in range(logp.shape[1])]


def rederive(pred: pd.DataFrame, shift: float) -> np.ndarray:
    """The p of a prediction frame, censored answers at ``bound + shift`` (prompt orders averaged, as recorded)."""
    orders = _orders(pred)
    return sum(treated_p(*order, shift) for order in orders) / len(orders)


def _load(pred_dir: Path, data_dir: Path, split: str) -> tuple[pd.DataFrame, np.ndarray, Path]:
    """One split's openai predictions in file order with their vote counts; errors name the file and the fault."""
    path, gold_path = Path(pred_dir) / f"{split}.parquet", Path(data_dir) / f"{split}.parquet"
    for file, what in ((path, "predictions"), (gold_path, "prepared split")):
        if not file.is_file():
            raise DataError(f"{file}: no {split} {what} (the censoring summary reads both)")
    pred = pd.read_parquet(path)
    missing = [c for c in COLUMNS if c not in pred.columns]
    if missing:
        backend = read_provenance(path).get("backend", "unknown")
        raise DataError(
            f"{path}: not predictions of the openai backend (backend {backend!r}): no column {', '.join(missing)}; "
            f"censoring exists only where a server returns the top candidates alone"
        )
    swapped = read_provenance(path).get("debias") == "swap"
    if swapped and not all(c in pred.columns for c in BY_ORDER):
        raise DataError(
            f"{path}: made with extract.debias: swap but without the per-order columns {', '.join(BY_ORDER)}; "
            f"rerun extract for this cell (its responses are cached: nothing is sent again)"
        )
    gold = pd.read_parquet(gold_path, columns=["id", "counts"])
    merged = pred.merge(gold, on="id", how="left", validate="one_to_one")
    if merged["counts"].isna().any():
        ids = merged.loc[merged["counts"].isna(), "id"].head(3).tolist()
        raise DataError(f"{path}: ids not in {gold_path}, e.g. {ids}")
    return merged, counts_matrix(merged), path


def _check_recorded(pred: pd.DataFrame, path: Path) -> None:
    """The recorded p must be what its own treatment gives: otherwise the columns do not belong together."""
    treatment = read_provenance(path).get("censored", "bound")
    if treatment not in TREATMENTS:
        raise DataError(f"{path}: provenance names an unknown censoring treatment {treatment!r}")
    recorded = _matrix(pred["p"], float)
    bad = np.flatnonzero(~np.isclose(rederive(pred, TREATMENTS[treatment]), recorded, rtol=0, atol=1e-9).all(axis=1))
    if len(bad):
        ids = pred["id"].iloc[bad[:3]].tolist()
        raise DataError(
            f"{path}: p of {len(bad)} item(s) is not what logp_choice, censored and logp_bound give under the "
            f"file's treatment {treatment!r}, e.g. {ids}; the file was changed after extract wrote it"
        )


def _scores(
    counts: np.ndarray,
    p: np.ndarray,
    coverage: np.ndarray,
    dev: tuple[np.ndarray, np.ndarray] | None,
    ids: list[str],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Every metric with its interval, as the score step computes it; NaN entries when no item is left."""
    if not len(counts):
        nan = {"value": math.nan, "low": math.nan, "high": math.nan}
        return {**{name: dict(nan) for name in metrics.names()}, "n_items": 0}
    logp = metrics.log_probs(p)
    dev_pair = None if dev is None else (dev[0], metrics.log_probs(dev[1]))
    result = metrics.summarise(counts, logp, coverage, dev_pair, settings["bootstrap_resamples"], settings["seed"], ids)
    return {**result["metrics"], "n_items": len(counts)}


def summarise(pred_dir: Path, data_dir: Path, split: str, dev_split: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The share of ``split``'s items with a censored answer, and every metric under each treatment (module doc).

    ``settings`` is the ``score`` config section (``bootstrap_resamples``, ``seed``); the temperature and
    concentration are fitted on ``dev_split`` under the same treatment (on its uncensored items for
    ``uncensored``). Raises :class:`DataError` for a folder that is not from the openai backend.
    """
    if split == dev_split:
        raise ValueError(f"the evaluation split cannot be the dev split {dev_split!r}: T and c are fitted there")
    pred, counts, path = _load(pred_dir, data_dir, split)
    dev, dev_counts, dev_path = _load(pred_dir, data_dir, dev_split)
    _check_recorded(pred, path)
    _check_recorded(dev, dev_path)
    ids, coverage = pred["id"].astype(str).tolist(), pred["coverage"].to_numpy(float)
    censored = _matrix(pred["censored"], bool).any(axis=1)
    dev_censored = _matrix(dev["censored"], bool).any(axis=1)
    sensitivity = {}
    for name, shift in TREATMENTS.items():
        sensitivity[name] = _scores(
            counts, rederive(pred, shift), coverage, (dev_counts, rederive(dev, shift)), ids, settings
        )
    keep, dev_keep = ~censored, ~dev_censored
    if keep.any() and not dev_keep.any():
        log.warning("%s: no uncensored item in %s: the uncensored row uses T = 1 and c = 1", pred_dir, dev_split)
    sensitivity[UNCENSORED] = _scores(
        counts[keep],
        rederive(pred, 0.0)[keep],
        coverage[keep],
        (dev_counts[dev_keep], rederive(dev, 0.0)[dev_keep]) if dev_keep.any() else None,
        [i for i, k in zip(ids, keep, strict=True) if k],
        settings,
    )
    return {
        "share_censored": float(censored.mean()) if len(censored) else math.nan,
        "n_censored": int(censored.sum()),
        "n_items": len(censored),
        "sensitivity": sensitivity,
    }


def _header(metric: str) -> str:
    return f"{metric} {'↓' if metrics.lower_is_better(metric) else '↑'}"


def _cell(entry: dict[str, float]) -> str:
    value, low, high = entry["value"], entry["low"], entry["high"]
    if not math.isfinite(value):
        return "–"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def sensitivity_markdown(entries: list[dict[str, Any]]) -> str:
    """A Markdown report of several cells' sensitivity tables.

    Each entry is :func:`summarise`'s dict with the cell's ``dataset``, ``model`` and ``condition`` added. Values
    are shown with their 95 % bootstrap interval; "–" marks a treatment with no item left.
    """
    needed = ("dataset", "model", "condition", "share_censored", "n_censored", "n_items", "sensitivity")
    lines = [
        "# Censored answers: how much the API rows depend on their treatment",
        "",
        "An API model reports only its top candidate tokens (20 at most). An answer missing from them is "
        "*censored*: its probability is not 0 but somewhere between 0 and the bound, the smallest probability "
        "the server returned at that position. Each table scores one cell's predictions under four treatments:",
        "",
        *[f"- `{name}`: {DESCRIPTIONS[name]}." for name in SENSITIVITY],
        "",
        "Under `bound`, xentropy and dirichlet are optimistic bounds, not values: the bound is the most "
        "probability a censored answer can have, and on an item whose annotators chose that answer (at least as "
        "often as the bound's share) any lower true probability scores worse on both, without limit as it goes "
        "to 0. A conclusion that holds in every row of a table does not depend on the treatment.",
    ]
    for number, entry in enumerate(entries):
        missing = [k for k in needed if k not in entry]
        if missing:
            raise ValueError(f"sensitivity entry {number} lacks {missing} (summarise()'s dict plus the cell's keys)")
        share = entry["share_censored"]
        lines += [
            "",
            f"## {entry['model']} · {entry['dataset']} · {entry['condition']}",
            "",
            f"{entry['n_censored']} of {entry['n_items']} items ({100 * share:.1f} %) have a censored answer.",
            "",
            "| treatment | items | " + " | ".join(_header(m) for m in SHOWN) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in SHOWN) + " |",
        ]
        for name in SENSITIVITY:
            row = entry["sensitivity"][name]
            lines.append(f"| `{name}` | {row['n_items']} | " + " | ".join(_cell(row[m]) for m in SHOWN) + " |")
    return "\n".join(lines) + "\n"
