"""The results table of a run: CSV (long form), Markdown, LaTeX, the paired differences and DVC metrics."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from moralign.io import atomic_path, read_json, write_json
from moralign.metrics import LOWER_IS_BETTER

PAPER_RESULTS = Path(__file__).with_name("paper_results.csv")
PAPER_CITATION = "Senthilkumar et al. 2024 (arXiv 2410.07826), as published"
# Columns of the headline table, in order; the arrow says which direction is better.
TABLE_METRICS = (
    "xentropy",
    "calibrated_xentropy",
    "dirichlet",
    "dirichlet_fitted",
    "paper_xentropy",
    "total_variation",
    "jensen_shannon",
    "accuracy",
    "macro_f1",
    "coverage",
)


def column_name(metric: str) -> str:
    """Header with the better direction: ``xentropy ↓``."""
    return f"{metric} {'↓' if LOWER_IS_BETTER[metric] else '↑'}"


def results_frame(
    cells: list[dict[str, Any]], references: list[dict[str, Any]], include_paper: bool = True
) -> pd.DataFrame:
    """One row per (dataset, model, condition), the reference rows and the paper's published values (long form)."""
    rows = []
    for cell in cells:
        for metric, e in cell["metrics"].items():
            rows.append(
                {
                    "dataset": cell["dataset"],
                    "model": cell["model"],
                    "condition": cell["condition"],
                    "kind": "model",
                    "metric": metric,
                    **e,
                    "n_items": cell["n_items"],
                }
            )
    for ref in references:
        for name, res in ref["rows"].items():
            for metric, e in res["metrics"].items():
                rows.append(
                    {
                        "dataset": ref["dataset"],
                        "model": name,
                        "condition": "reference",
                        "kind": "reference",
                        "metric": metric,
                        **e,
                        "n_items": res["n_items"],
                    }
                )
    frame = pd.DataFrame(rows)
    if include_paper:
        datasets = set(frame["dataset"])
        paper = pd.read_csv(PAPER_RESULTS, comment="#")
        for _, r in paper[paper["dataset"].isin(datasets)].iterrows():
            for metric, col in (("paper_xentropy", "xentropy_as_published"), ("dirichlet", "dirichlet_as_published")):
                if not pd.isna(r[col]):
                    rows.append(
                        {
                            "dataset": r["dataset"],
                            "model": r["model"],
                            "condition": "finetuned (paper)" if r["condition"] == "finetuned" else "base (paper)",
                            "kind": "published",
                            "metric": metric,
                            "value": float(r[col]),
                            "low": math.nan,
                            "high": math.nan,
                            "n_items": math.nan,
                        }
                    )
        frame = pd.DataFrame(rows)
    return frame


def _fmt(value: float, low: float, high: float) -> str:
    if pd.isna(value):
        return ""
    if pd.isna(low):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def wide_table(long: pd.DataFrame) -> pd.DataFrame:
    """Rows model x condition per dataset, one 'value [low, high]' column per metric; best model value marked *."""
    long = long.copy()
    best = {}
    models = long[long["kind"] == "model"]
    for (dataset, metric), group in models.groupby(["dataset", "metric"]):
        values = group["value"].dropna()
        if len(values):
            best[(dataset, metric)] = values.min() if LOWER_IS_BETTER[metric] else values.max()
    long["text"] = [
        _fmt(v, lo, hi) + ("*" if k == "model" and best.get((d, m)) == v else "")
        for v, lo, hi, k, d, m in zip(
            long["value"], long["low"], long["high"], long["kind"], long["dataset"], long["metric"], strict=True
        )
    ]
    order = {"model": 0, "reference": 1, "published": 2}
    wide = long.pivot_table(
        index=["dataset", "kind", "model", "condition"], columns="metric", values="text", aggfunc="first"
    ).reset_index()
    items = long.groupby(["dataset", "model", "condition"])["n_items"].first().rename("items").reset_index()
    wide = wide.merge(items, on=["dataset", "model", "condition"], how="left")
    wide["_order"] = wide["kind"].map(order)
    wide = wide.sort_values(["dataset", "_order", "model", "condition"]).drop(columns="_order")
    cols = [m for m in TABLE_METRICS if m in wide.columns]
    wide = wide[["dataset", "kind", "model", "condition", *cols, "items"]].fillna("")
    wide["items"] = [str(int(x)) if x != "" and not pd.isna(x) else "" for x in wide["items"]]
    return wide.rename(columns={m: column_name(m) for m in cols})


def to_markdown(wide: pd.DataFrame) -> str:
    """GitHub Markdown table."""
    header = "| " + " | ".join(wide.columns) + " |"
    sep = "|" + "|".join("---" for _ in wide.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in wide.itertuples(index=False)]
    return "\n".join([header, sep, *body]) + "\n"


def _tex(text: str) -> str:
    return (
        str(text)
        .replace("\\", r"\textbackslash{}")
        .replace("_", r"\_")
        .replace("&", r"\&")
        .replace("%", r"\%")
        .replace("#", r"\#")
        .replace("↓", r"$\downarrow$")
        .replace("↑", r"$\uparrow$")
    )


def to_latex(wide: pd.DataFrame) -> str:
    """A booktabs table; the best model value per column is bold."""
    cols = list(wide.columns)
    lines = [
        r"\begin{tabular}{" + "l" * 4 + "r" * (len(cols) - 4) + "}",
        r"\toprule",
        " & ".join(_tex(c) for c in cols) + r" \\",
        r"\midrule",
    ]
    last = None
    for row in wide.itertuples(index=False):
        if last is not None and row[0] != last:
            lines.append(r"\midrule")
        last = row[0]
        cells = []
        for v in row:
            v = str(v)
            cells.append(r"\textbf{" + _tex(v[:-1]) + "}" if v.endswith("*") else _tex(v))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def collect_scores(
    paths: list[Path], cells: list[tuple[str, str, str]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Cell scores and reference rows from score files or folders of them, limited to the run's ``cells``.

    ``cells`` are (dataset, model, condition); files of cells no longer in the config are skipped.
    """
    wanted = set(cells)
    datasets = {d for d, _, _ in cells}
    files = [f for p in paths for f in (sorted(p.rglob("*.json")) if p.is_dir() else [p])]
    cells, refs = [], []
    for path in files:
        s = read_json(path)
        if "rows" in s:
            if s["dataset"] in datasets:
                refs.append(s)
            continue
        prov = s["provenance"]
        if (prov["dataset"], prov["model"], s["condition"]) in wanted:
            cells.append({**s, "dataset": prov["dataset"], "model": prov["model"]})
    return cells, refs


def check_same_items(cells: list[dict[str, Any]], refs: list[dict[str, Any]]) -> None:
    """Raise ValueError unless every row of a dataset (model cells and reference rows) has the same item count.

    A table compares rows, so they must be computed on the same items (e.g. ``extract.max_items`` caps the
    predictions, and the references step caps its items the same way).
    """
    sizes: dict[str, dict[str, int]] = {}
    for cell in cells:
        sizes.setdefault(cell["dataset"], {})[f"{cell['model']} / {cell['condition']}"] = cell["n_items"]
    for ref in refs:
        for name, res in ref["rows"].items():
            sizes.setdefault(ref["dataset"], {})[f"reference {name}"] = res["n_items"]
    for dataset, rows in sizes.items():
        if len(set(rows.values())) > 1:
            raise ValueError(
                f"{dataset}: the table's rows are computed on different numbers of items {rows}; "
                "rerun the stale steps so that every row covers the same items"
            )


def tabulate(cells: list[dict[str, Any]], refs: list[dict[str, Any]], out_dir: Path) -> pd.DataFrame:
    """Write results.csv (long form), results.md, results.tex, differences.csv and metrics.json (DVC metrics).

    Every row of a dataset must cover the same items (:func:`check_same_items`). ``differences.csv`` holds every
    fine-tuned − base paired difference with its paired-bootstrap interval.
    """
    check_same_items(cells, refs)
    long = results_frame(cells, refs)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "results.csv") as tmp:
        long.to_csv(tmp, index=False)
    wide = wide_table(long)
    note = (
        f"\nValues: mean [95 % bootstrap interval] on the {cells[0]['split'] if cells else ''} split; "
        "* = best model per dataset and column. Reference rows: `uniform`; `train_prior`, the mean of the training "
        "items' vote distributions (the best constant under xentropy); `best`, Scruples' BEST oracle, a floor for "
        "xentropy only (in the other columns it is the oracle's expected score, which predictions can beat). "
        "`paper_xentropy` is the paper's (mis-specified) "
        f"cross-entropy, kept for comparison with {PAPER_CITATION}; `published` rows are theirs.\n"
    )
    with atomic_path(out_dir / "results.md") as tmp:
        tmp.write_text(to_markdown(wide) + note)
    with atomic_path(out_dir / "results.tex") as tmp:
        tmp.write_text(to_latex(wide))
    diffs = [
        {"dataset": c["dataset"], "model": c["model"], "condition": c["condition"], "metric": m, **e}
        for c in cells
        for m, e in c.get("difference_to_base", {}).items()
    ]
    with atomic_path(out_dir / "differences.csv") as tmp:
        pd.DataFrame(diffs, columns=["dataset", "model", "condition", "metric", "value", "low", "high"]).to_csv(
            tmp, index=False
        )
    nested: dict[str, Any] = {}
    for cell in cells:
        node = nested.setdefault(cell["dataset"], {}).setdefault(cell["model"], {})
        node[cell["condition"]] = {m: round(e["value"], 6) for m, e in cell["metrics"].items()}
    write_json(out_dir / "metrics.json", nested)
    return long
