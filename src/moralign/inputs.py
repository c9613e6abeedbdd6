"""Checks of the intermediate files a step reads (predictions, scores), run before any expensive work.

Each check raises :class:`moralign.errors.DataError` naming the file or folder and the reason, so a step fails
in its first second with one clear line instead of deep inside scoring or tabulating (model and adapter folders
are checked by :mod:`moralign.modelfiles`, the release archive while it is parsed, by :mod:`moralign.data`):

- :func:`check_predictions` — an extract output fed to ``score``: its dataset, split, model and condition,
  its item ids against the prepared split, and the shape and range of its probabilities;
- :func:`check_baseline` — the base predictions a fine-tuned cell is compared with: same model, base weights,
  prompt and items;
- :func:`check_scores` — the score and reference files fed to ``summarise``: every cell of this run exactly
  once, on this run's split, from this run's models.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moralign import backends
from moralign.config import BASE_CONDITIONS
from moralign.data import TASKS
from moralign.errors import DataError
from moralign.io import read_provenance
from moralign.modelfiles import describe_base

# Probabilities are stored as float64 after a softmax; anything further from a distribution than this is damage.
_TOLERANCE = 1e-4


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: missing ({what})")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object ({what})")
    return value


def _read_table(path: Path, what: str, columns: list[str] | None = None) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: missing ({what})")
    try:
        return pd.read_parquet(path, columns=columns)
    except Exception as err:  # pyarrow raises several types for a damaged or foreign file
        raise DataError(f"{path}: not a readable Parquet table of {what} ({type(err).__name__}: {err})") from err


# --------------------------------------------------------------------------------------------------- adapters


# ------------------------------------------------------------------------------------------------ predictions


def _provenance(path: Path) -> dict[str, Any]:
    try:
        return read_provenance(path)
    except Exception as err:  # a foreign or damaged file
        raise DataError(f"{path}: unreadable metadata ({type(err).__name__}: {err})") from err


def check_predictions(
    pred_dir: str | Path,
    data_dir: str | Path,
    dataset: str,
    splits: Iterable[str],
    model: str | None = None,
    condition: str | None = None,
) -> None:
    """An extract output that ``score`` can use for ``dataset`` (and ``model``/``condition`` when given).

    Checks, per split: the prepared table is of ``dataset``; the prediction file's provenance names this
    dataset, split, model and condition; every predicted id is an item of the prepared split, once (a prefix of
    the split is fine: ``extract.max_items``); ``p`` has one probability per choice, each in [0, 1], summing
    to 1; ``coverage`` lies in [0, 1].
    """
    pred_dir, data_dir = Path(pred_dir), Path(data_dir)
    if dataset not in TASKS:
        raise DataError(f"unknown dataset {dataset!r} (known: {sorted(TASKS)})")
    task = TASKS[dataset]
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder does not exist")
    summary = _read_json(pred_dir / "summary.json", "written last by extract; a folder without it is unfinished")
    expected = {"dataset": dataset, "model": model, "condition": condition}
    _expect(pred_dir / "summary.json", summary.get("provenance") or {}, expected)
    for split in splits:
        gold_path, pred_path = data_dir / f"{split}.parquet", pred_dir / f"{split}.parquet"
        gold = _read_table(gold_path, f"the prepared {split} split", ["id"])
        made_for = _provenance(gold_path).get("task")
        if made_for != dataset:
            raise DataError(f"{gold_path}: a prepared table of {made_for!r}, not of {dataset!r}")
        pred = _read_table(pred_path, f"{split} predictions")
        _expect(pred_path, _provenance(pred_path), {**expected, "split": split})
        missing = {"id", "p", "coverage"} - set(pred.columns)
        if missing:
            raise DataError(f"{pred_path}: no column(s) {sorted(missing)}: not an extract output")
        if pred.empty:
            raise DataError(f"{pred_path}: no items")
        dupes = pred["id"][pred["id"].duplicated()].tolist()
        if dupes:
            raise DataError(f"{pred_path}: id {dupes[0]!r} predicted more than once")
        extra = sorted(set(pred["id"]) - set(gold["id"]))
        if extra:
            raise DataError(
                f"{pred_path}: {len(extra)} of {len(pred)} ids are not items of {gold_path}, e.g. {extra[:3]}: "
                "predictions of another item set (re-prepared data, another sample seed or dataset?)"
            )
        _check_distributions(pred_path, pred, task.choices)


def _expect(path: Path, provenance: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    for key, want in expected.items():
        if want is not None and provenance.get(key) != want:
            raise DataError(f"{path}: made for {key} {provenance.get(key)!r}, but this step expects {want!r}")


def _check_distributions(path: Path, pred: pd.DataFrame, choices: tuple[str, ...]) -> None:
    sizes = pred["p"].map(len)
    if (sizes != len(choices)).any():
        row = int(np.argmax((sizes != len(choices)).to_numpy()))
        raise DataError(
            f"{path}: item {pred['id'].iloc[row]!r} has {sizes.iloc[row]} probabilities; the task has "
            f"{len(choices)} choices {choices}"
        )
    p = np.stack(pred["p"].to_numpy()).astype(np.float64)
    coverage = pred["coverage"].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(p).all(axis=1) | (p < -_TOLERANCE).any(axis=1) | (p > 1 + _TOLERANCE).any(axis=1)
    bad |= np.abs(p.sum(axis=1) - 1.0) > _TOLERANCE
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"{path}: item {pred['id'].iloc[row]!r}: p = {p[row].tolist()} is not a distribution")
    bad = ~np.isfinite(coverage) | (coverage < -_TOLERANCE) | (coverage > 1 + _TOLERANCE)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"{path}: item {pred['id'].iloc[row]!r}: coverage {coverage[row]} is not in [0, 1]")


def check_baseline(pred_dir: str | Path, baseline_dir: str | Path, splits: Iterable[str]) -> None:
    """The base-condition predictions a fine-tuned cell is paired with.

    Same model, base weights (and their precision: a QLoRA adapter is compared with the 4-bit base it was trained
    on), dataset, prompt and items in the same order; the baseline is a base condition (``base``, ``base-4bit``).
    """
    pred_dir, baseline_dir = Path(pred_dir), Path(baseline_dir)
    tuned = _read_json(pred_dir / "summary.json", "written last by extract").get("provenance") or {}
    base = _read_json(baseline_dir / "summary.json", "written last by extract").get("provenance") or {}
    if base.get("condition") not in BASE_CONDITIONS:
        raise DataError(f"{baseline_dir}: predictions of condition {base.get('condition')!r}, not a base condition")
    for key in ("model", "dataset", "template_hash", "quantization", "dtype"):
        if base.get(key) != tuned.get(key):
            raise DataError(
                f"{baseline_dir}: {key} {base.get(key)!r} differs from {pred_dir}'s {tuned.get(key)!r}: "
                "not the baseline of this cell"
            )
    if (base.get("base") or {}).get("weights") != (tuned.get("base") or {}).get("weights"):
        raise DataError(
            f"{baseline_dir}: base model {describe_base(base.get('base') or {})} differs from {pred_dir}'s "
            f"{describe_base(tuned.get('base') or {})}"
        )
    for split in splits:
        a = _read_table(baseline_dir / f"{split}.parquet", f"{split} predictions", ["id"])["id"].tolist()
        b = _read_table(pred_dir / f"{split}.parquet", f"{split} predictions", ["id"])["id"].tolist()
        if a != b:
            raise DataError(
                f"{baseline_dir / (split + '.parquet')} and {pred_dir / (split + '.parquet')} do not cover the same "
                f"items in the same order ({len(a)} vs {len(b)} items)"
            )


# ----------------------------------------------------------------------------------------------------- scores


def check_scores(
    paths: Iterable[str | Path],
    cells: list[tuple[str, str, str, int | None]],
    split: str,
    model_configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """The score and reference files ``summarise`` tabulates are this run's, complete and unambiguous.

    ``paths`` are files or folders (searched for ``*.json``) as the summarise step receives them. Every
    (dataset, model, condition, seed) cell of the run (``cells``) must have exactly one score file and every dataset
    exactly one reference file, all on ``split`` (the run's ``experiment.eval_split``). Files of cells outside the
    run are ignored, as the summary ignores them. With ``model_configs`` (the config's ``models.<name>`` of each model)
    each cell's base model must also be the one the run configures: a same-named model of another run fails.
    """
    paths = [Path(p) for p in paths]
    wanted, datasets = set(cells), list(dict.fromkeys(d for d, _, _, _ in cells))
    files = []
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: no such score file or folder")
        files += sorted(path.rglob("*.json")) if path.is_dir() else [path]
    found: dict[tuple[str, str, str, int | None], Path] = {}
    refs: dict[str, Path] = {}
    for file in files:
        score = _read_json(file, "a score or reference file")
        if "rows" in score:
            key = score.get("dataset")
            if key not in datasets:
                continue
            _same_split(file, score, split)
            if key in refs:
                raise DataError(f"{file}: a second reference file for {key!r} (first: {refs[key]}): two runs mixed?")
            refs[key] = file
            continue
        prov = score.get("provenance")
        if not isinstance(prov, dict) or "condition" not in score:
            raise DataError(f"{file}: neither a score file (provenance, condition) nor a reference file (rows)")
        cell = (prov.get("dataset"), prov.get("model"), score["condition"], score.get("seed"))
        if cell not in wanted:
            continue
        _same_split(file, score, split)
        if cell in found:
            raise DataError(f"{file}: a second score file for {cell} (first: {found[cell]}): two runs mixed?")
        if model_configs is not None:
            _same_model(file, prov, cell[1], model_configs[cell[1]])
        found[cell] = file
    where = ", ".join(str(p) for p in paths)
    missing = [cell for cell in cells if cell not in found]
    if missing:
        raise DataError(
            f"{where}: no score for {len(missing)} cell(s) of this run, e.g. {missing[:3]} (dataset, model, "
            "condition, seed): the scores of another run, or an unfinished one?"
        )
    missing_refs = [d for d in datasets if d not in refs]
    if missing_refs:
        raise DataError(f"{where}: no reference file for dataset(s) {missing_refs}")


def _same_split(file: Path, score: Mapping[str, Any], split: str) -> None:
    if score.get("split") != split:
        raise DataError(f"{file}: scored on split {score.get('split')!r}, but this run's eval_split is {split!r}")


def _same_model(file: Path, prov: Mapping[str, Any], model: str, cfg: Mapping[str, Any]) -> None:
    """The score file is of the model the run configures (its backend says how to tell: moralign.backends)."""
    reason = backends.get(cfg.get("backend", "hf")).same_model(prov, cfg)
    if reason is not None:
        base = describe_base(dict(prov.get("base") or {})) if prov.get("base") else reason
        raise DataError(
            f"{file}: scores of {base} ({reason}), but this run's model {model!r} is configured as {dict(cfg)}: "
            "the scores of another run"
        )
