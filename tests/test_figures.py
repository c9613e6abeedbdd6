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

    monkeypatch.setattr(figures, "_save", keep)
    figures.bar_figure(long, "d", metric, tmp_path / "bars")
    lines = {label.split(" ")[0] for label in seen["labels"] if label not in ("base", "soft")}
    assert lines == drawn
