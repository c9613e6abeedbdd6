"""The readings scored: each cell's three readings against the human votes, their differences and table rows.

Total variation is the headline because the ``sample`` and ``verbal`` readings give exact zeros, where
cross-entropy is infinite; xentropy is reported after an additive smoothing p' = (p + s) / (1 + k s), applied to
every reading alike (so a ``logprob`` xentropy here is slightly above the main table's unsmoothed one).

Every metric of a (cell, reading) is a mean over the items VALID in that reading (a ``sample`` or ``verbal`` item
with fewer than 2/3 valid draws is not), and ``valid_rate`` says what share that is: an invalid item is reported,
never silently dropped. Accuracy follows :mod:`moralign.metrics`: the predicted share of the human majority
(1/k on a predicted k-way tie, frequent in sampled readings), items with a tied human majority excluded.

Intervals are 95 % percentile intervals of one item bootstrap (``bootstrap_indices`` over the eval split's items,
shared by every cell, so differences are paired). A tuned (model, condition) trained with several seeds gets one
row per seed and a pooled row (seed :data:`POOLED`): the mean over seeds, with the two-level interval of
:mod:`moralign.aggregate` (each replicate draws seeds with replacement, then averages their item replicates), so it
includes training noise. The table shows the pooled row, or the only one.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import entr

from moralign import aggregate, metrics
from moralign.data import counts_matrix
from moralign.readings.floor import sampling_floor
from moralign.tables import format_interval

READINGS = ("logprob", "sample", "verbal")  # table and figure order
METRICS = ("tv", "xentropy", "accuracy", "valid_rate", "entropy")
LABELS = {"tv": "TV", "xentropy": "xentropy", "accuracy": "accuracy", "valid_rate": "valid", "entropy": "entropy"}
POOLED = "mean"  # the seed of a row that pools a tuned condition's seeds
GAP = "gap"  # TV(sample) / TV(verbal) - 1: how much worse the model samples than it states
READING_PAIRS = (("sample", "logprob"), ("verbal", "logprob"), ("sample", "verbal"))  # (b, a): b - a on TV
FINETUNE_METRICS = ("tv", "xentropy", "accuracy", "valid_rate")
FIGURES = ("tv", "items", "finetune")
FLOOR, UNIFORM, HUMAN = "sampling floor", "uniform", "human"
LONG_COLUMNS = [
    "kind", "model", "condition", "seed", "n_seeds", "reading", "metric", "value", "low", "high", "n_items",
]  # fmt: skip
DIFF_COLUMNS = [
    "comparison", "model", "condition", "seed", "n_seeds", "reading", "minus", "contrast", "metric", "value", "low",
    "high", "n_items",
]  # fmt: skip


@dataclass(frozen=True)
class ReadingCell:
    """One reading of one scored cell: its predictions frame on the eval split (``id``, ``p``, ``coverage``...)."""

    model: str
    condition: str  # "base", "base-4bit", or a recipe name such as "votes"
    seed: str | None  # training seed of a tuned cell, None for a base cell
    reading: str  # "logprob" | "sample" | "verbal"
    frame: pd.DataFrame

    @property
    def label(self) -> str:
        """The cell as errors name it."""
        seed = "" if self.seed is None else f" seed {self.seed}"
        return f"{self.model} / {self.condition}{seed} / {self.reading}"


@dataclass(frozen=True)
class ReportSettings:
    """How the readings are scored: N of the sample reading (its floor), smoothing, bootstrap."""

    n_draws: int  # N of the sample reading (for the sampling floor row)
    smoothing: float = 0.01  # additive smoothing before xentropy: p' = (p + s) / (1 + k s)
    resamples: int = 1000  # bootstrap resamples (0: no intervals)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_draws < 1:
            raise ValueError(f"n_draws must be at least 1, not {self.n_draws}")
        if not self.smoothing >= 0:
            raise ValueError(f"smoothing must be >= 0, not {self.smoothing}")
        if self.resamples < 0:
            raise ValueError(f"resamples must be >= 0, not {self.resamples}")


@dataclass(frozen=True)
class _Stat:
    """A mean over items, its bootstrap replicates (None without resamples) and how many items it averages."""

    value: float
    reps: np.ndarray | None
    n_items: int


@dataclass(frozen=True)
class Prepared:
    """The eval split's votes and every cell's per-item metrics (NaN where not scored), keyed by cell."""

    counts: np.ndarray
    h: np.ndarray
    idx: np.ndarray | None
    per_item: dict[tuple[str, str, str | None, str], dict[str, np.ndarray]]
    p: dict[tuple[str, str, str | None, str], np.ndarray]  # the cell's p, NaN rows on invalid items
    groups: dict[tuple[str, str, str], list[str | None]]  # (model, condition, reading) -> seeds, smallest first
    settings: ReportSettings


# ------------------------------------------------------------------------------------------ inputs


def _quiet_nanmean(values: np.ndarray, axis: int | None = None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a cell or resample with no valid item: NaN, as it should be
        return np.nanmean(values, axis=axis)


def _votes(items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Counts, human distribution and ids of the eval split (ids unique, every item voted on)."""
    ids = [str(i) for i in items["id"]]
    if len(set(ids)) != len(ids):
        raise ValueError("the eval split's items have duplicated ids")
    counts = counts_matrix(items).astype(float)
    if not (counts.sum(axis=1) > 0).all() or (counts < 0).any():
        raise ValueError("every eval item needs non-negative vote counts that sum to more than 0")
    return counts, counts / counts.sum(axis=1, keepdims=True), ids


def _some(values: Sequence[Any]) -> str:
    more = f" and {len(values) - 5} more" if len(values) > 5 else ""
    return ", ".join(repr(v) for v in list(values)[:5]) + more


def _ids_problem(frame_ids: pd.Series, ids: list[str]) -> str | None:
    dup = list(frame_ids[frame_ids.duplicated()].unique())
    missing = sorted(set(ids) - set(frame_ids))
    extra = sorted(set(frame_ids) - set(ids))
    for found, what in ((dup, "duplicated"), (missing, "missing"), (extra, "not in the eval split")):
        if found:
            return f"{len(found)} item id(s) {what}: {_some(found)}"
    return None


def aligned(cell: ReadingCell, ids: list[str], n_choices: int) -> tuple[np.ndarray, np.ndarray]:
    """The cell's p (items x choices, in ``ids`` order; NaN rows on invalid items) and its valid flags.

    A logprob frame has no ``valid`` column: every item is valid. Errors name the cell.
    """
    frame_ids = cell.frame["id"].astype(str)
    problem = _ids_problem(frame_ids, ids)
    if problem:
        raise ValueError(f"{cell.label}: {problem}")
    frame = cell.frame.assign(id=frame_ids).set_index("id").loc[ids]
    valid = frame["valid"].to_numpy(dtype=bool) if "valid" in frame else np.ones(len(ids), dtype=bool)
    p = np.full((len(ids), n_choices), np.nan)
    for row, (ok, values) in enumerate(zip(valid, frame["p"], strict=True)):
        values = np.asarray(values, dtype=float).ravel() if ok else p[row]  # an invalid item's p is never read
        if len(values) != n_choices:
            raise ValueError(f"{cell.label}: item {ids[row]!r} has {len(values)} shares in p, not {n_choices}")
        p[row] = values
    bad = valid & ~(np.isfinite(p).all(axis=1) & (p >= 0).all(axis=1) & (np.abs(p.sum(axis=1) - 1) <= 1e-6))
    if bad.any():
        shown = _some([ids[i] for i in np.flatnonzero(bad)])
        raise ValueError(f"{cell.label}: {bad.sum()} valid item(s) whose p is not a distribution: {shown}")
    return p, valid


def per_item_metrics(counts: np.ndarray, p: np.ndarray, valid: np.ndarray, smoothing: float) -> dict[str, np.ndarray]:
    """Per-item tv, xentropy (smoothed), accuracy, entropy (NaN on invalid items) and valid_rate (0/1, every item)."""
    h = counts / counts.sum(axis=1, keepdims=True)
    k = p.shape[1]
    filled = np.where(valid[:, None], p, 1.0 / k)  # placeholder rows, masked below
    logp = metrics.log_probs(filled)
    labels = metrics.majority_labels(counts)
    correct = metrics.predicted_shares(logp)[np.arange(len(p)), np.maximum(labels, 0)]
    out = {
        "tv": metrics.total_variation(h, logp),
        "xentropy": metrics.xentropy(h, metrics.log_probs((filled + smoothing) / (1 + k * smoothing))),
        "accuracy": np.where(labels >= 0, correct, np.nan),
        "entropy": entr(filled).sum(axis=1),
    }
    out = {name: np.where(valid, values, np.nan) for name, values in out.items()}
    return {**out, "valid_rate": valid.astype(float)}


def _natural(seed: str | None) -> tuple[int, str]:
    return (-1, "") if seed is None else (len(seed), seed)  # "2" before "10"


def prepare(items: pd.DataFrame, cells: Sequence[ReadingCell], settings: ReportSettings) -> Prepared:
    """Align and score every cell once; error on a cell named twice or an unknown reading."""
    counts, h, ids = _votes(items)
    per_item: dict[tuple[str, str, str | None, str], dict[str, np.ndarray]] = {}
    shares: dict[tuple[str, str, str | None, str], np.ndarray] = {}
    for cell in cells:
        if cell.reading not in READINGS:
            raise ValueError(f"{cell.label}: unknown reading {cell.reading!r} (one of {', '.join(READINGS)})")
        key = (cell.model, cell.condition, cell.seed, cell.reading)
        if key in per_item:
            raise ValueError(f"{cell.label}: this cell is given twice")
        shares[key], valid = aligned(cell, ids, counts.shape[1])
        per_item[key] = per_item_metrics(counts, shares[key], valid, settings.smoothing)
    groups: dict[tuple[str, str, str], list[str | None]] = {}
    for model, condition, seed, reading in per_item:
        groups.setdefault((model, condition, reading), []).append(seed)
    groups = {k: sorted(v, key=_natural) for k, v in groups.items()}
    idx = metrics.bootstrap_indices(len(ids), settings.resamples, settings.seed) if settings.resamples else None
    return Prepared(counts, h, idx, per_item, shares, groups, settings)


# ------------------------------------------------------------------------------------------ statistics


def _stat(values: np.ndarray, idx: np.ndarray | None) -> _Stat:
    reps = None if idx is None else _quiet_nanmean(values[idx], axis=1)
    return _Stat(float(_quiet_nanmean(values)), reps, int(np.isfinite(values).sum()))


def _stats(per_item: dict[str, np.ndarray], idx: np.ndarray | None) -> dict[str, _Stat]:
    return {name: _stat(values, idx) for name, values in per_item.items()}


def _pool(stats: Sequence[_Stat], seed: int) -> _Stat:
    """Mean over seeds, with the main table's two-level replicates (:func:`moralign.aggregate.pooled_replicates`)."""
    value = float(np.mean([s.value for s in stats]))
    reps = None if stats[0].reps is None else aggregate.pooled_replicates(np.stack([s.reps for s in stats]), seed)
    return _Stat(value, reps, min(s.n_items for s in stats))


def _summaries(
    seeds: Sequence[str | None], stats: Sequence[dict[str, _Stat]], seed: int
) -> list[tuple[str | None, int, dict[str, _Stat]]]:
    """(seed, n_seeds, stats) per seed, then the pooled one when there are several: the last is the table's."""
    out = [(s, 1, st) for s, st in zip(seeds, stats, strict=True)]
    if len(seeds) > 1:
        out.append((POOLED, len(seeds), {m: _pool([st[m] for st in stats], seed) for m in stats[0]}))
    return out


def _record(stat: _Stat, **fields: Any) -> dict[str, Any]:
    entry = metrics.entry(stat.value, stat.reps)
    return {**fields, "value": entry["value"], "low": entry["low"], "high": entry["high"], "n_items": stat.n_items}


def _gap(sample: _Stat, verbal: _Stat, paired: bool) -> _Stat:
    """TV(sample) / TV(verbal) - 1; replicates only where both rows resampled the same seeds (paired)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        value = sample.value / verbal.value - 1
        reps = sample.reps / verbal.reps - 1 if paired and sample.reps is not None else None
    return _Stat(float(value), reps, min(sample.n_items, verbal.n_items))


# ------------------------------------------------------------------------------------------ scores


def score_prepared(prep: Prepared) -> pd.DataFrame:
    """The long scores of prepared cells (:func:`score_readings` after :func:`prepare`)."""
    rows, table_tv = [], {}
    for (model, condition, reading), seeds in prep.groups.items():
        stats = [_stats(prep.per_item[(model, condition, s, reading)], prep.idx) for s in seeds]
        entries = _summaries(seeds, stats, prep.settings.seed)
        for seed, n_seeds, by_metric in entries:
            for metric in METRICS:
                fields = {"kind": "model", "model": model, "condition": condition, "seed": seed, "n_seeds": n_seeds}
                rows.append(_record(by_metric[metric], **fields, reading=reading, metric=metric))
        table_tv[(model, condition, reading)] = (seeds, entries[-1][0], entries[-1][2]["tv"])
    for (model, condition, reading), (seeds, seed, sample) in table_tv.items():
        other = table_tv.get((model, condition, "verbal"))
        if reading == "sample" and other:
            gap = _gap(sample, other[2], paired=seeds == other[0])
            fields = {"kind": "model", "model": model, "condition": condition, "seed": seed, "n_seeds": len(seeds)}
            rows.append(_record(gap, **fields, reading="sample/verbal", metric=GAP))
    return pd.DataFrame(rows, columns=LONG_COLUMNS)


def score_readings(items: pd.DataFrame, cells: Sequence[ReadingCell], settings: ReportSettings) -> pd.DataFrame:
    """Every metric of every (cell, reading), long: one row per (model, condition, seed, reading, metric).

    Columns :data:`LONG_COLUMNS`: ``value`` with its 95 % bootstrap interval ``low``/``high``, ``n_items`` the
    items it averages over (valid ones; the fewest over seeds on a pooled row). A tuned condition with several
    seeds adds a pooled row (seed :data:`POOLED`); each (model, condition) with both ``sample`` and ``verbal``
    adds its :data:`GAP` (reading ``sample/verbal``), from the table's TV values.
    """
    return score_prepared(prepare(items, cells, settings))


def reference_rows(items: pd.DataFrame, settings: ReportSettings) -> pd.DataFrame:
    """Reference rows, long: uniform (every reading), the sampling floor (sample TV), mean human entropy."""
    counts, h, _ = _votes(items)
    n, k = h.shape
    idx = metrics.bootstrap_indices(n, settings.resamples, settings.seed) if settings.resamples else None
    uniform = per_item_metrics(counts, np.full((n, k), 1.0 / k), np.ones(n, dtype=bool), settings.smoothing)
    refs = [(UNIFORM, "", m, uniform[m]) for m in ("tv", "xentropy", "accuracy", "entropy")]
    refs.append((FLOOR, "sample", "tv", sampling_floor(h, settings.n_draws)))
    refs.append((HUMAN, "", "entropy", entr(h).sum(axis=1)))
    fields = {"kind": "reference", "condition": "reference", "seed": None, "n_seeds": 0}
    rows = [_record(_stat(v, idx), **fields, model=m, reading=r, metric=name) for m, r, name, v in refs]
    return pd.DataFrame(rows, columns=LONG_COLUMNS)


# ------------------------------------------------------------------------------------------ differences


def _paired(b: np.ndarray, a: np.ndarray, idx: np.ndarray | None) -> _Stat:
    """Mean of b - a over the items scored in both (NaN in either propagates), as ``metrics.paired_difference``."""
    return _stat(b - a, idx)


def _difference_rows(
    prep: Prepared, pairs: Sequence[tuple[str | None, dict[str, np.ndarray], dict[str, np.ndarray]]], **fields: Any
) -> list[dict[str, Any]]:
    """Rows for one contrast: per seed (b - a), then pooled over seeds when there are several."""
    metric_names = FINETUNE_METRICS if fields["comparison"] == "fine-tuning" else ("tv",)
    seeds = [s for s, _, _ in pairs]
    stats = [{m: _paired(b[m], a[m], prep.idx) for m in metric_names} for _, b, a in pairs]
    return [
        _record(by_metric[m], **fields, seed=seed, n_seeds=n_seeds, metric=m)
        for seed, n_seeds, by_metric in _summaries(seeds, stats, prep.settings.seed)
        for m in metric_names
    ]


def _between_readings(prep: Prepared) -> list[dict[str, Any]]:
    rows = []
    models = dict.fromkeys((m, c) for m, c, _ in prep.groups)
    for model, condition in models:
        for b, a in READING_PAIRS:
            seeds_b, seeds_a = prep.groups.get((model, condition, b), []), prep.groups.get((model, condition, a), [])
            seeds = [s for s in seeds_b if s in seeds_a]
            if not seeds:
                continue
            cells = prep.per_item
            pairs = [(s, cells[(model, condition, s, b)], cells[(model, condition, s, a)]) for s in seeds]
            fields = {"comparison": "readings", "model": model, "condition": condition, "reading": b, "minus": a}
            rows += _difference_rows(prep, pairs, **fields, contrast=f"TV({b}) − TV({a})")
    return rows


def _finetuning(prep: Prepared, baselines: Mapping[str, str]) -> list[dict[str, Any]]:
    """Tuned minus its baseline condition per reading: every seed against an untrained baseline, else seed by seed."""
    rows = []
    for (model, condition, reading), seeds in prep.groups.items():
        if seeds == [None]:
            continue
        if condition not in baselines:
            known = ", ".join(sorted(baselines)) or "none"
            raise ValueError(f"{model} / {condition}: no baseline condition for {condition!r} (baselines: {known})")
        base = baselines[condition]
        base_seeds = prep.groups.get((model, base, reading))
        if base_seeds is None:
            continue  # this reading was not run on the baseline: nothing to pair
        matched = [(s, None if base_seeds == [None] else s) for s in seeds if base_seeds == [None] or s in base_seeds]
        cells = prep.per_item
        pairs = [(s, cells[(model, condition, s, reading)], cells[(model, base, t, reading)]) for s, t in matched]
        fields = {"comparison": "fine-tuning", "model": model, "condition": condition, "reading": reading}
        rows += _difference_rows(prep, pairs, **fields, minus=base, contrast=f"{condition} − {base}")
    return rows


def differences_of(prep: Prepared, baselines: Mapping[str, str]) -> pd.DataFrame:
    """The paired differences of prepared cells (:func:`reading_differences` after :func:`prepare`)."""
    return pd.DataFrame(_between_readings(prep) + _finetuning(prep, baselines), columns=DIFF_COLUMNS)


def reading_differences(
    items: pd.DataFrame, cells: Sequence[ReadingCell], baselines: Mapping[str, str], settings: ReportSettings
) -> pd.DataFrame:
    """Paired bootstrap differences b - a, on the items valid in both (columns :data:`DIFF_COLUMNS`).

    ``comparison == "readings"``: between the readings of the same cell, on TV (:data:`READING_PAIRS`; ``reading``
    is b, ``minus`` is a). ``comparison == "fine-tuning"``: a tuned condition minus its baseline condition
    (``baselines``, e.g. ``{"votes": "base", "qlora-votes": "base-4bit"}``) per reading, on
    :data:`FINETUNE_METRICS` (valid_rate over every item); below 0 is better except for accuracy and valid_rate.
    Seeds are per-seed rows plus a pooled row, as in :func:`score_readings`.
    """
    return differences_of(prepare(items, cells, settings), baselines)


# ------------------------------------------------------------------------------------------ table


def table_selection(long: pd.DataFrame) -> pd.DataFrame:
    """The rows the table shows: the pooled row of a several-seed condition, else the only row."""
    keys = [k for k in ("kind", "model", "condition", "reading", "minus", "metric") if k in long]
    size = long.groupby(keys, dropna=False)["value"].transform("size")
    return long[(long["seed"] == POOLED) | (size == 1)]


def _present_readings(long: pd.DataFrame) -> list[str]:
    present = set(long.loc[long["kind"] == "model", "reading"])
    return [r for r in READINGS if r in present] or list(READINGS)


def _seeds_text(kind: str, group: pd.DataFrame) -> str:
    seeds = group["n_seeds"].max()
    return "" if kind == "reference" or group["seed"].isna().all() else str(int(seeds))


def readings_table(long: pd.DataFrame) -> pd.DataFrame:
    """Wide table: rows model x condition, then reference rows; per reading TV, xentropy, accuracy, valid, entropy.

    Cells read "value [low, high]". ``gap`` = TV(sample) / TV(verbal) - 1. Uniform fills every reading's columns,
    the sampling floor the sample TV column, human the entropy columns; a reference row with nothing to show in
    the readings present is left out.
    """
    shown = table_selection(long)
    readings = _present_readings(long)
    columns = [f"{r} {LABELS[m]}" for r in readings for m in METRICS]
    rows = []
    for (kind, model, condition), group in shown.groupby(["kind", "model", "condition"], sort=False):
        row = {"model": model, "condition": condition, "seeds": _seeds_text(kind, group)}
        for rec in group.itertuples():
            text = format_interval(rec.value, rec.low, rec.high)
            targets = readings if kind == "reference" and rec.reading == "" else [rec.reading]
            for reading in targets:
                name = GAP if rec.metric == GAP else f"{reading} {LABELS[rec.metric]}"
                if name in columns or name == GAP:
                    row[name] = text
        if kind == "model" or len(row) > 3:
            rows.append({"kind": kind, **row})
    wide = pd.DataFrame(rows, columns=["kind", "model", "condition", "seeds", *columns, GAP])
    wide["_order"] = wide["kind"].map({"model": 0, "reference": 1})
    wide = wide.sort_values("_order", kind="stable").drop(columns=["_order", "kind"])
    if wide[GAP].isna().all():
        wide = wide.drop(columns=GAP)
    return wide.fillna("").reset_index(drop=True)
