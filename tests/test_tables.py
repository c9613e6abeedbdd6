"""The results table: every row of a dataset on the same items."""

import pytest

from moralign import tables


def _cell(model, condition, n_items):
    return {
        "dataset": "dilemmas",
        "model": model,
        "condition": condition,
        "split": "test",
        "n_items": n_items,
        "metrics": {"xentropy": {"value": 0.6, "low": 0.5, "high": 0.7}},
    }


def _refs(n_items):
    row = {"n_items": n_items, "metrics": {"xentropy": {"value": 0.69, "low": 0.68, "high": 0.7}}}
    return [{"dataset": "dilemmas", "split": "test", "rows": {"uniform": row, "best": row}}]


def test_a_table_refuses_rows_computed_on_different_items(tmp_path):
    cells = [_cell("m", "base", 12), _cell("m", "soft", 12)]
    long = tables.tabulate(cells, _refs(12), tmp_path / "ok")
    assert set(long["n_items"].dropna()) == {12}
    # e.g. references computed on the whole split while extract.max_items capped the predictions
    with pytest.raises(ValueError, match=r"dilemmas: .*different numbers of items.*'reference uniform': 200"):
        tables.tabulate(cells, _refs(200), tmp_path / "stale")
    with pytest.raises(ValueError, match="'m / soft': 11"):
        tables.tabulate([_cell("m", "base", 12), _cell("m", "soft", 11)], _refs(12), tmp_path / "cells")
