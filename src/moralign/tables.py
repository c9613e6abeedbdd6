"""The results table of a run: CSV (long form), Markdown, LaTeX, the paired differences and DVC metrics."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moralign import aggregate, censoring, metrics
from moralign.io import atomic_path, read_json, write_json

PAPER_RESULTS = Path(__file__).with_name("paper_results.csv")
PAPER_CITATION = "Senthilkumar et al. 2024 (arXiv 2410.07826), as published"


# An API row whose share of items with a censored answer (absent from the top log-probabilities, given its upper
# bound) exceeds this is marked: its xentropy and dirichlet are optimistic bounds rather than values.
CENSORED_MARK_ABOVE = 0.05
CENSORED_MARK = "‡"
BEST_MARK = "†"
OWN_ALPHA_MARK = "§"
ROW_KEYS = ["dataset", "model", "condition"]


def weights_label(provenance: dict[str, Any]) -> str:
    """The base weights a cell was scored on, for the table's ``weights`` column."""
    if provenance.get("api_model"):
        return "API"
    if provenance.get("quantization") == "4bit":
        return "nf4"
    return str(provenance.get("dtype") or "")


def cell_items(cell: dict[str, Any]) -> aggregate.SeedItems:
    """The per-item metrics written next to a cell's score file (``<cell>.items.parquet``)."""
    path = Path(cell["path"])
    items = path.with_name(path.name.removesuffix(".json") + ".items.parquet")
    if not items.is_file():
        raise FileNotFoundError(f"{items}: the per-item metrics of {path} are missing (rerun its score step)")
    return aggregate.SeedItems(cell.get("seed"), pd.read_parquet(items))


def _groups(cells: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Cells by table row (dataset, model, condition), seeds in their order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["dataset"], cell["model"], cell["condition"]), []).append(cell)
    return {k: sorted(v, key=lambda c: -1 if c.get("seed") is None else c["seed"]) for k, v in groups.items()}


def load_items(cells: list[dict[str, Any]]) -> dict[str, aggregate.SeedItems]:
    """Every cell's per-item metrics, read once, by score file path."""
    return {c["path"]: cell_items(c) for c in cells}


def table_rows(
    cells: list[dict[str, Any]], settings: dict[str, Any], items: dict[str, aggregate.SeedItems]
) -> list[dict[str, Any]]:
    """One row per (dataset, model, condition): the mean over its seeds' cells, interval over seeds and items."""
    resamples, seed = settings["bootstrap_resamples"], settings["seed"]
    rows = []
    for (dataset, model, condition), group in _groups(cells).items():
        seeds = [items[c["path"]] for c in group]
        censoring = [c["censoring"]["share_censored"] for c in group if c.get("censoring")]
        rows.append(
            {
                "dataset": dataset,
                "model": model,
                "condition": condition,
                "metrics": aggregate.row(seeds, resamples, seed, f"{dataset} {model} {condition}"),
                "n_items": group[0]["n_items"],
                "seeds": aggregate.describe(seeds)["seeds"],
                "weights": weights_label(group[0]["provenance"]),
                "censored_share": float(np.mean(censoring)) if censoring else math.nan,
                # a Dirichlet-multinomial encoder's dirichlet is scored with its own alpha, not c = 1
                "own_alpha": any(c.get("dirichlet_alpha") == "model" for c in group),
            }
        )
    return rows


def difference_rows(
    cells: list[dict[str, Any]],
    comparisons: list[tuple[str, str]],
    settings: dict[str, Any],
    items: dict[str, aggregate.SeedItems],
) -> list[dict[str, Any]]:
    """Paired differences ``condition - baseline`` per (dataset, model), for each (condition, baseline) compared.

    A trained condition against its base (every seed against the one base cell), or two recipes seed for seed
    (their matched seeds: :func:`moralign.aggregate.matched_seeds`).
    """
    resamples, seed = settings["bootstrap_resamples"], settings["seed"]
    groups = _groups(cells)
    out = []
    for dataset, model in dict.fromkeys((d, m) for d, m, _ in groups):
        for condition, baseline in comparisons:
            if (dataset, model, condition) not in groups or (dataset, model, baseline) not in groups:
                continue
            a = [items[c["path"]] for c in groups[dataset, model, condition]]
            b = [items[c["path"]] for c in groups[dataset, model, baseline]]
            if len(b) > 1:
                a, b = aggregate.matched_seeds(a, b)
                if not a:
                    continue
            what = f"{dataset} {model}: {condition} - {baseline}"
            for metric, e in aggregate.difference(a, b, resamples, seed, what).items():
                out.append(
                    {
                        "dataset": dataset,
                        "model": model,
                        "condition": condition,
                        "baseline": baseline,
                        "seeds": len(a),
                        "metric": metric,
                        **e,
                    }
                )
    return out


def column_name(metric: str) -> str:
    """Header with the better direction: ``xentropy ↓``."""
    return f"{metric} {'↓' if metrics.lower_is_better(metric) else '↑'}"


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
                    "seeds": cell.get("seeds", 0),
                    "weights": cell.get("weights", ""),
                    "censored_share": cell.get("censored_share", math.nan),
                    "own_alpha": cell.get("own_alpha", False),
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


def format_interval(value: float, low: float, high: float, decimals: int = 3) -> str:
    """``value [low, high]`` at ``decimals`` places; empty for a missing value."""
    if pd.isna(value):
        return ""
    if pd.isna(low):
        return f"{value:.{decimals}f}"
    return f"{value:.{decimals}f} [{low:.{decimals}f}, {high:.{decimals}f}]"


def _censored_text(share: float) -> str:
    if pd.isna(share):
        return ""
    return f"{share:.3f}" + (f" {CENSORED_MARK}" if share > CENSORED_MARK_ABOVE else "")


def wide_table(long: pd.DataFrame) -> pd.DataFrame:
    """Rows model x condition per dataset, one 'value [low, high]' column per metric; best model value marked *.

    Also: the base ``weights`` each row was scored on, its number of training ``seeds`` (the values are their
    mean), and for API rows the ``censored`` share (marked above 5 %). BEST is printed only where it bounds what
    a predictor can reach (the metrics registered with ``best_bounds``), blank and marked elsewhere.
    """
    long = long.copy()
    for column, default in (("seeds", 0), ("weights", ""), ("censored_share", math.nan), ("own_alpha", False)):
        if column not in long:
            long[column] = default
    best = {}
    models = long[long["kind"] == "model"]
    for (dataset, metric), group in models.groupby(["dataset", "metric"]):
        values = group["value"].dropna()
        if len(values):
            best[(dataset, metric)] = values.min() if metrics.lower_is_better(metric) else values.max()
    not_a_bound = (
        (long["kind"] == "reference") & (long["model"] == "best") & ~long["metric"].isin(metrics.best_floors())
    )
    own_alpha = (long["metric"] == "dirichlet") & (long["own_alpha"] == True)  # noqa: E712 (NaN on reference rows)
    long["text"] = [
        BEST_MARK
        if blank
        else format_interval(v, lo, hi, metrics.REGISTRY[m].decimals if m in metrics.REGISTRY else 3)
        + (f" {OWN_ALPHA_MARK}" if own else "")
        + ("*" if k == "model" and best.get((d, m)) == v else "")
        for v, lo, hi, k, d, m, blank, own in zip(
            long["value"],
            long["low"],
            long["high"],
            long["kind"],
            long["dataset"],
            long["metric"],
            not_a_bound,
            own_alpha,
            strict=True,
        )
    ]
    order = {"model": 0, "reference": 1, "published": 2}
    wide = long.pivot_table(
        index=["dataset", "kind", "model", "condition"], columns="metric", values="text", aggfunc="first"
    ).reset_index()
    extra = long.groupby(ROW_KEYS)[["n_items", "seeds", "weights", "censored_share"]].first().reset_index()
    wide = wide.merge(extra, on=ROW_KEYS, how="left")
    wide["_order"] = wide["kind"].map(order)
    wide = wide.sort_values(["dataset", "_order", "model", "condition"]).drop(columns="_order")
    cols = [m for m in metrics.names() if m in wide.columns]  # every registered metric, in registry order
    wide["items"] = [str(int(x)) if not pd.isna(x) else "" for x in wide["n_items"]]
    wide["seeds"] = [
        str(int(x)) if k == "model" and not pd.isna(x) and x > 0 else ""
        for x, k in zip(wide["seeds"], wide["kind"], strict=True)
    ]
    wide["weights"] = wide["weights"].fillna("")
    front = ["dataset", "kind", "model", "condition", "weights", "seeds"]
    if wide["censored_share"].notna().any():
        wide["censored"] = [_censored_text(x) for x in wide["censored_share"]]
        cols = [*cols, "censored"]
    wide = wide[[*front, *cols, "items"]].fillna("")
    return wide.rename(columns={m: column_name(m) for m in cols if m in metrics.REGISTRY})


def notes(wide: pd.DataFrame, split: str) -> list[str]:
    """The footnotes of the table (plain text; Markdown and LaTeX render them their way)."""
    out = [
        f"Values: mean [95 % bootstrap interval] on the {split} split; * = best model per dataset and column. "
        "A row trained with several seeds (column seeds) shows the mean over its seeds, its interval resampling "
        "seeds then items, so it includes training noise. weights: the base weights the row was scored on (nf4 = "
        "the 4-bit base QLoRA recipes train on; their fine-tuning differences are taken against base-4bit).",
        "Reference rows: uniform; train_prior, the mean of the training items' vote distributions (the best "
        "constant under xentropy); best, Scruples' BEST oracle.",
        f"{BEST_MARK} BEST is printed only where it is a floor ({', '.join(sorted(metrics.best_floors()))}); in the "
        "other columns it is the oracle's expected score, which a model can beat (a flatter prediction scores better "
        "under dirichlet with c = 1; distances have other minimisers), so it is left blank.",
        f"paper_xentropy is the paper's (mis-specified) cross-entropy, kept for comparison with {PAPER_CITATION}; "
        "published rows are theirs.",
    ]
    if any(OWN_ALPHA_MARK in str(v) for v in wide.to_numpy().ravel()):
        out.append(
            f"{OWN_ALPHA_MARK} dirichlet with the model's own concentration (an encoder trained with the "
            "Dirichlet-multinomial loss predicts alpha, not only p: Scruples' score); every other row uses c = 1."
        )
    if "censored" in wide.columns:
        out.append(
            f"censored: share of items with an answer absent from the API's top log-probabilities, given its upper "
            f"bound. {CENSORED_MARK} above {CENSORED_MARK_ABOVE:.0%}: that row's xentropy and dirichlet are "
            "optimistic bounds, not values (see censoring.md for the metrics under other treatments)."
        )
    return out


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
        .replace(BEST_MARK, r"$\dagger$")
        .replace(CENSORED_MARK, r"$\ddagger$")
        .replace(OWN_ALPHA_MARK, r"\S")
    )


def to_latex(wide: pd.DataFrame, footnotes: list[str] = ()) -> str:
    """A booktabs table (the best model value per column bold), its footnotes below it."""
    cols = list(wide.columns)
    lines = [
        r"\begin{tabular}{" + "l" * 5 + "r" * (len(cols) - 5) + "}",
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
    lines += [r"\par\footnotesize " + _tex(note) for note in footnotes]
    return "\n".join(lines) + "\n"


def collect_scores(
    paths: list[Path], cells: list[tuple[str, str, str, int | None]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Cell scores and reference rows from score files or folders of them, limited to the run's ``cells``.

    ``cells`` are (dataset, model, condition, seed); files of cells no longer in the config are skipped. Each
    cell keeps the ``path`` of its score file (its per-item metrics lie beside it).
    """
    wanted = set(cells)
    datasets = {d for d, _, _, _ in cells}
    files = [f for p in paths for f in (sorted(p.rglob("*.json")) if p.is_dir() else [p])]
    cells, refs = [], []
    for path in files:
        s = read_json(path)
        if "rows" in s:
            if s["dataset"] in datasets:
                refs.append(s)
            continue
        prov = s["provenance"]
        if (prov["dataset"], prov["model"], s["condition"], s.get("seed")) in wanted:
            cells.append({**s, "dataset": prov["dataset"], "model": prov["model"], "path": str(path)})
    return cells, refs


def check_same_items(cells: list[dict[str, Any]], refs: list[dict[str, Any]]) -> None:
    """Raise ValueError unless every row of a dataset (model cells and reference rows) has the same item count.

    A table compares rows, so they must be computed on the same items (e.g. ``extract.max_items`` caps the
    predictions, and the references step caps its items the same way).
    """
    sizes: dict[str, dict[str, int]] = {}
    for cell in cells:
        seed = "" if cell.get("seed") is None else f" / seed {cell['seed']}"
        sizes.setdefault(cell["dataset"], {})[f"{cell['model']} / {cell['condition']}{seed}"] = cell["n_items"]
    for ref in refs:
        for name, res in ref["rows"].items():
            sizes.setdefault(ref["dataset"], {})[f"reference {name}"] = res["n_items"]
    for dataset, rows in sizes.items():
        if len(set(rows.values())) > 1:
            raise ValueError(
                f"{dataset}: the table's rows are computed on different numbers of items {rows}; "
                "rerun the stale steps so that every row covers the same items"
            )


def tabulate(
    cells: list[dict[str, Any]],
    refs: list[dict[str, Any]],
    out_dir: Path,
    settings: dict[str, Any],
    comparisons: list[tuple[str, str]] = (),
) -> pd.DataFrame:
    """Write results.csv (long form), results.md, results.tex, differences.csv, metrics.json and censoring.md.

    metrics.json feeds DVC; censoring.md holds the API cells' metrics under each treatment of censored answers (a
    line saying there are none otherwise).

    Every row of a dataset must cover the same items (:func:`check_same_items`). A row is the mean over its seeds'
    cells (:func:`table_rows`); ``differences.csv`` holds each (condition, baseline) of ``comparisons`` per model,
    paired by item and seed, with its two-level bootstrap interval (``settings``: the ``score`` section).
    """
    check_same_items(cells, refs)
    items = load_items(cells)
    rows = table_rows(cells, settings, items)
    long = results_frame(rows, refs)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "results.csv") as tmp:
        long.to_csv(tmp, index=False)
    wide = wide_table(long)
    footnotes = notes(wide, cells[0]["split"] if cells else "")
    with atomic_path(out_dir / "results.md") as tmp:
        tmp.write_text(to_markdown(wide) + "\n" + "\n\n".join(footnotes) + "\n")
    with atomic_path(out_dir / "results.tex") as tmp:
        tmp.write_text(to_latex(wide, footnotes))
    censored = [
        {**c["censoring"], "dataset": c["dataset"], "model": c["model"], "condition": c["condition"]}
        for c in cells
        if c.get("censoring")
    ]
    with atomic_path(out_dir / "censoring.md") as tmp:
        tmp.write_text(
            censoring.sensitivity_markdown(censored)
            if censored
            else "# Censored answers\n\nNo API rows in this run: every answer's probability is read in full.\n"
        )
    diffs = difference_rows(cells, list(comparisons), settings, items)
    columns = ["dataset", "model", "condition", "baseline", "seeds", "metric", "value", "low", "high"]
    with atomic_path(out_dir / "differences.csv") as tmp:
        pd.DataFrame(diffs, columns=columns).to_csv(tmp, index=False)
    nested: dict[str, Any] = {}
    for row in rows:
        node = nested.setdefault(row["dataset"], {}).setdefault(row["model"], {})
        node[row["condition"]] = {m: round(e["value"], 6) for m, e in row["metrics"].items()}
    write_json(out_dir / "metrics.json", nested)
    return long
