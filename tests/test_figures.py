"""Figures: reference levels drawn only where they mean what the legend says."""

import pandas as pd
import pytest

from moralign import figures


@pytest.mark.parametrize(("metric", "drawn"), [("xentropy", {"uniform", "BEST"}), ("dirichlet", {"uniform"})])
def test_best_is_drawn_only_where_it_is_a_floor(tmp_path, monkeypatch, metric, drawn):
    rows = [
        ("model", "m", "base", 0.70),
        ("model", "m", "soft", 0.60),
        ("reference", "uniform", "reference", 0.69),
        ("reference", "best", "reference", 0.50),
    ]
    long = pd.DataFrame(
        [
            {"dataset": "d", "kind": k, "model": m, "condition": c, "metric": metric, "value": v, "low": v, "high": v}
            for k, m, c, v in rows
        ]
    )
    seen = {}

    def keep(fig, stem):
        seen["labels"] = fig.axes[0].get_legend_handles_labels()[1]
        return []

    monkeypatch.setattr(figures, "save_figure", keep)
    figures.bar_figure(long, "d", metric, tmp_path / "bars")
    lines = {label.split(" ")[0] for label in seen["labels"] if label not in ("base", "soft")}
    assert lines == drawn


def test_the_differences_figure_shows_each_recipe_against_its_base(tmp_path, monkeypatch):
    """Recipe-against-recipe rows (seed-paired) stay in the table; the figure plots the effects of fine-tuning."""
    rows = [("votes", "base", -0.10), ("soft", "base", -0.20), ("soft", "votes", -0.10)]
    diffs = pd.DataFrame(
        [
            {"dataset": "d", "model": "m", "condition": c, "baseline": b, "seeds": 2, "metric": metric, "value": v,
             "low": v - 0.05, "high": v + 0.05}
            for c, b, v in rows
            for metric in ("xentropy", "dirichlet", "total_variation")
        ]
    )
    seen = {}

    def keep(fig, stem):
        seen["ticks"] = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        return []

    monkeypatch.setattr(figures, "save_figure", keep)
    figures.differences_figure(diffs, "d", tmp_path / "differences")
    assert seen["ticks"] == ["m / votes", "m / soft"]
