"""The readings report of one dataset: long scores (CSV), the table (Markdown), differences (CSV), three figures.

Scoring is in :mod:`moralign.readings.scores` (what each number means), the figures in
:mod:`moralign.readings.plots`; this module writes them, atomically, after everything is computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from moralign.figures import save_figure
from moralign.io import atomic_path
from moralign.readings.plots import finetune_figure, items_figure, tv_figure
from moralign.readings.scores import (
    FIGURES,
    FINETUNE_METRICS,
    POOLED,
    READINGS,
    ReadingCell,
    ReportSettings,
    differences_of,
    prepare,
    reading_differences,
    readings_table,
    reference_rows,
    score_prepared,
    score_readings,
)
from moralign.tables import to_markdown

# the public API of the readings report, scoring included (the step and the tests read it here)
__all__ = [
    "FIGURES",
    "FINETUNE_METRICS",
    "POOLED",
    "READINGS",
    "ReadingCell",
    "ReportSettings",
    "markdown",
    "reading_differences",
    "readings_table",
    "reference_rows",
    "score_readings",
    "write_report",
]


def format_section(format_following: Mapping[str, float]) -> str:
    """The format-following rates (cell label -> share of unconstrained draws that gave the JSON asked for)."""
    if not format_following:
        return ""
    rows = "\n".join(f"| {cell} | {rate:.3f} |" for cell, rate in format_following.items())
    return (
        "\n### Format following\n\nThe verbal prompt drawn once per item WITHOUT the JSON constraint "
        "(`readings.verbal.format_items` items): the share of draws that are the JSON object asked for.\n\n"
        f"| cell | format-following rate |\n|---|---|\n{rows}\n"
    )


def markdown(
    dataset: str,
    long: pd.DataFrame,
    n_items: int,
    settings: ReportSettings,
    format_following: Mapping[str, float] | None = None,
) -> str:
    """The dataset's readings table in Markdown, with the header line that says how it was scored.

    ``format_following`` (cell label -> rate) adds the format-following rates of the unconstrained draws.
    """
    s = settings.smoothing
    header = (
        f"Eval split: {n_items} items; sample reading N = {settings.n_draws} draws; xentropy after additive "
        f"smoothing s = {s:g}, p' = (p + s) / (1 + k s), on every reading; every metric is over the items valid in "
        "its reading (valid: the share of items with at least 2/3 valid draws; logprob: all)."
    )
    notes = [
        "Values: mean [95 % bootstrap interval over items]. seeds: a tuned row's training seeds; several are "
        "averaged, the interval resampling seeds then items.",
        "TV: total variation from the human vote distribution (the headline: sample and verbal give exact zeros). "
        "accuracy: the predicted share of the human majority (1/k on a predicted k-way tie), tied majorities "
        "excluded. entropy: mean model entropy in nats.",
        f"gap = TV(sample) / TV(verbal) − 1. Reference rows: uniform; sampling floor, the exact expected TV of "
        f"N = {settings.n_draws} draws from the human distribution itself (no sample reading beats it on average); "
        "human, the mean entropy of the human vote distributions.",
    ]
    table = to_markdown(readings_table(long))
    text = f"## {dataset}: three readings\n\n{header}\n\n{table}\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return text + format_section(format_following or {})


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)


def write_report(
    dataset: str,
    items: pd.DataFrame,
    cells: Sequence[ReadingCell],
    baselines: Mapping[str, str],
    settings: ReportSettings,
    *,
    table_csv: Path,
    table_md: Path,
    differences_csv: Path,
    figure_stems: Mapping[str, Path],
    format_following: Mapping[str, float] | None = None,
) -> None:
    """The readings report of one dataset: long scores (CSV), table (Markdown), differences (CSV), three figures.

    ``table_csv`` holds :func:`score_readings` and :func:`reference_rows` (numbers, long); ``table_md`` the
    readable table; ``figure_stems`` maps each of :data:`FIGURES` to a stem written as .png and .pdf. Everything
    is computed and drawn before the first file is written, and every file is written atomically.
    """
    missing = [name for name in FIGURES if name not in figure_stems]
    if missing:
        raise ValueError(f"figure_stems lacks {', '.join(missing)} (needs {', '.join(FIGURES)})")
    prep = prepare(items, cells, settings)
    scores, refs = score_prepared(prep), reference_rows(items, settings)
    long = pd.concat([scores, refs], ignore_index=True) if len(scores) else refs  # (pandas warns on an empty part)
    differences = differences_of(prep, baselines)
    text = markdown(dataset, long, len(items), settings, format_following)
    figures = {
        "tv": tv_figure(long, dataset),
        "items": items_figure(prep, dataset),
        "finetune": finetune_figure(differences, dataset),
    }
    _write_csv(long, Path(table_csv))
    _write_csv(differences, Path(differences_csv))
    with atomic_path(table_md, suffix=".md") as tmp:
        tmp.write_text(text)
    for name in FIGURES:
        save_figure(figures[name], Path(figure_stems[name]))
