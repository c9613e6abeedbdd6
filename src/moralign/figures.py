"""The figures of a run: metric bars with reference levels, reliability, per-item scatter, coverage, differences."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moralign import metrics
from moralign.io import atomic_path, read_json

# Okabe-Ito colours (colour-blind safe) plus hatching, so bars also survive greyscale printing.
COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00")
HATCHES = ("", "//", "..", "xx", "\\\\", "++")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display), imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "figure.dpi": 120, "savefig.bbox": "tight"})
    return plt


def grouped_bars(plt: Any, cells: pd.DataFrame, height: float, intervals: bool) -> tuple[Any, Any, list[str]]:
    """One group of bars per model, one bar per condition (colour and hatch), optionally with 95 % intervals.

    A model's bars are centred on its name whatever conditions it has (an encoder baseline has only ``trained``).
    """
    names = sorted(cells["model"].unique())
    conditions = list(dict.fromkeys(cells["condition"]))
    width = 0.8 / max(1, len(conditions))
    has = {m: [c for c in conditions if ((cells["model"] == m) & (cells["condition"] == c)).any()] for m in names}
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(names) + 2), height))
    for k, cond in enumerate(conditions):
        sub = cells[cells["condition"] == cond].set_index("model").reindex(names)
        slot = [has[m].index(cond) - (len(has[m]) - 1) / 2 if cond in has[m] else 0.0 for m in names]
        x = np.arange(len(names)) + np.array(slot) * width
        err = np.nan_to_num(np.vstack([sub["value"] - sub["low"], sub["high"] - sub["value"]])) if intervals else None
        ax.bar(
            x,
            sub["value"],
            width,
            yerr=err,
            capsize=3 if intervals else 0,
            label=cond,
            color=COLOURS[k % len(COLOURS)],
            hatch=HATCHES[k % len(HATCHES)],
            edgecolor="black",
            linewidth=0.5,
        )
    return fig, ax, names


def reference_levels(metric: str) -> dict[str, tuple[str, str]]:
    """Reference rows drawn as lines on a metric's bars: name -> (legend label, line style).

    Uniform always; BEST only where it is a floor (``moralign.metrics.best_floors()``, xentropy): elsewhere
    it is the oracle's expected score, which predictions can beat, and a line would read as a bound.
    """
    levels = {"uniform": ("uniform", ":")}
    if metric in metrics.best_floors():
        levels["best"] = ("BEST oracle (floor)", "--")
    return levels


def bar_figure(long: pd.DataFrame, dataset: str, metric: str, out_stem: Path) -> list[Path]:
    """Before/after bars per model for one metric with intervals, and :func:`reference_levels` as lines."""
    plt = pyplot()
    d = long[(long["dataset"] == dataset) & (long["metric"] == metric)]
    models = d[d["kind"] == "model"]
    fig, ax, names = grouped_bars(plt, models, height=3.6, intervals=True)
    refs = d[d["kind"] == "reference"].set_index("model")["value"]
    for name, (label, style) in reference_levels(metric).items():
        if name in refs:
            ax.axhline(refs[name], color="black", linestyle=style, linewidth=1, label=f"{label} ({refs[name]:.3f})")
    ax.set_xticks(np.arange(len(names)), names, rotation=15 if len(names) > 2 else 0)
    ax.set_ylabel(f"{metric} ({'lower' if metrics.lower_is_better(metric) else 'higher'} is better)")
    ax.set_title(f"{dataset}: {metric} before and after fine-tuning (95 % CI)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return save_figure(fig, out_stem)


def save_figure(fig: Any, stem: Path) -> list[Path]:
    """Write ``fig`` as ``stem``.png and .pdf (atomically) and close it; the paths written."""
    plt = pyplot()
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in (".png", ".pdf"):
        with atomic_path(stem.with_suffix(ext), suffix=ext) as tmp:
            fig.savefig(tmp, format=ext[1:])
        paths.append(stem.with_suffix(ext))
    plt.close(fig)
    return paths


def _load_cells(pred_files: dict[str, Path], data_file: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per cell label: (model p, human p, coverage) aligned by item id."""
    gold = pd.read_parquet(data_file)[["id", "human_probs"]]
    out = {}
    for label, path in pred_files.items():
        m = pd.read_parquet(path).merge(gold, on="id", validate="one_to_one")
        out[label] = (np.stack(m["p"].to_numpy()), np.stack(m["human_probs"].to_numpy()), m["coverage"].to_numpy())
    return out


def reliability_figure(
    cells: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    choice: str,
    dataset: str,
    out_stem: Path,
    bins: int = 10,
) -> list[Path]:
    """Model probability of one choice (binned) against the mean human probability, with bin counts."""
    plt = pyplot()
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(6.4, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect agreement")
    edges = np.linspace(0, 1, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    width = 0.8 / bins / max(1, len(cells))
    for k, (label, (p, h, _)) in enumerate(cells.items()):
        which = np.clip(np.digitize(p[:, 0], edges) - 1, 0, bins - 1)
        counts = np.bincount(which, minlength=bins)
        mean_h = np.bincount(which, weights=h[:, 0], minlength=bins) / np.maximum(counts, 1)
        ok = counts > 0
        colour = COLOURS[k % len(COLOURS)]
        ax.plot(
            centres[ok],
            mean_h[ok],
            marker="os^dv<>"[k % 7],
            color=colour,
            label=label,
            linestyle=("-", "--", "-.", ":")[k % 4],
        )
        axn.bar(centres + (k - (len(cells) - 1) / 2) * width, counts, width=width, color=colour)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"mean human P({choice})")
    ax.set_title(f"{dataset}: reliability of P({choice})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axn.set_xlabel(f"model P({choice}), in {bins} bins")
    axn.set_ylabel("items")
    return save_figure(fig, out_stem)


def scatter_figure(
    cells: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    choice: str,
    dataset: str,
    out_stem: Path,
    conditions: list[str] | None = None,
) -> list[Path]:
    """Per-item model vs human probability of one choice, one panel per (model, condition).

    Columns follow ``conditions`` (default: as the labels first name them); conditions without cells are left out.
    """
    plt = pyplot()
    labels = list(cells)
    models = list(dict.fromkeys(label.split(" / ")[0] for label in labels))
    present = list(dict.fromkeys(label.split(" / ")[1] for label in labels))
    conditions = [c for c in conditions if c in present] if conditions else present
    fig, axes = plt.subplots(
        len(models),
        len(conditions),
        figsize=(2.6 * len(conditions) + 0.6, 2.5 * len(models)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for i, model in enumerate(models):
        for j, cond in enumerate(conditions):
            ax = axes[i][j]
            p, h, _ = cells.get(f"{model} / {cond}", (np.zeros((0, 2)), np.zeros((0, 2)), None))
            ax.hexbin(p[:, 0], h[:, 0], gridsize=15, extent=(0, 1, 0, 1), cmap="Greys", mincnt=1)
            ax.plot([0, 1], [0, 1], color="#D55E00", linestyle=":", linewidth=1)
            if len(p):
                r = np.corrcoef(p[:, 0], h[:, 0])[0, 1] if p[:, 0].std() > 0 else float("nan")
                ax.text(0.04, 0.9, f"r = {r:.2f}", transform=ax.transAxes, fontsize=8)
            if i == 0:
                ax.set_title(cond, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{model}\nhuman P({choice})", fontsize=8)
            if i == len(models) - 1:
                ax.set_xlabel(f"model P({choice})", fontsize=8)
    fig.suptitle(f"{dataset}: per-item model vs human probability (darker = more items)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_stem)


def coverage_figure(long: pd.DataFrame, dataset: str, out_stem: Path) -> list[Path]:
    """Mean probability mass on valid answers per model and condition (log scale: small models put little there)."""
    plt = pyplot()
    d = long[(long["dataset"] == dataset) & (long["metric"] == "coverage") & (long["kind"] == "model")]
    fig, ax, names = grouped_bars(plt, d, height=3.4, intervals=False)
    ax.set_yscale("log")
    ax.set_ylim(top=1.5)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("coverage: P(any valid answer), log scale")
    ax.set_title(f"{dataset}: probability mass on the valid answers")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return save_figure(fig, out_stem)


def differences_figure(
    diffs: pd.DataFrame,
    dataset: str,
    out_stem: Path,
    metric_names: tuple[str, ...] = ("xentropy", "dirichlet", "total_variation"),
) -> list[Path]:
    """Fine-tuned − its base on the same items (seed-paired), with 95 % intervals (left of 0 = better for ↓).

    Only the effects of fine-tuning (a recipe against its base); recipe-against-recipe rows stay in the table.
    """
    plt = pyplot()
    d = diffs[(diffs["dataset"] == dataset) & diffs["metric"].isin(metric_names)]
    if "baseline" in d:
        d = d[d["baseline"].str.startswith("base")]
    fig, axes = plt.subplots(
        1,
        len(metric_names),
        figsize=(3.3 * len(metric_names), 0.5 * max(2, len(d) / 3) + 1.4),
        sharey=True,
        squeeze=False,
    )
    rows = list(dict.fromkeys(zip(d["model"], d["condition"], strict=True)))
    for ax, metric in zip(axes[0], metric_names, strict=True):
        sub = d[d["metric"] == metric].set_index(["model", "condition"]).sort_index()
        for y, key in enumerate(rows):
            if key not in sub.index:
                continue
            e = sub.loc[key]
            ax.errorbar(
                e["value"],
                y,
                xerr=[[e["value"] - e["low"]], [e["high"] - e["value"]]],
                fmt="o",
                color=COLOURS[y % len(COLOURS)],
                capsize=3,
            )
        ax.axvline(0, color="black", linewidth=0.8, linestyle=":")
        ax.set_title(f"Δ {metric} ({'lower' if metrics.lower_is_better(metric) else 'higher'} is better)", fontsize=9)
    axes[0][0].set_yticks(range(len(rows)), [f"{m} / {c}" for m, c in rows], fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{dataset}: effect of fine-tuning (fine-tuned − base, paired 95 % CI)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_stem)


FIGURES = ("xentropy_bars", "dirichlet_bars", "reliability", "scatter", "coverage", "differences")
# the readings report's figures (moralign.readings.report), written where experiment.readings is set
READING_FIGURES = ("readings_tv", "readings_items", "readings_finetune")


def plot_dataset(
    report_dir: Path,
    dataset: str,
    pred_dirs: list[Path],
    data_dir: Path,
    split: str,
    out_dir: Path,
    cells: list[tuple[str, str, str, int | None]],
) -> list[Path]:
    """Every figure of one dataset (:data:`FIGURES`), as PNG and PDF.

    ``report_dir`` holds results.csv and differences.csv; ``pred_dirs`` are prediction folders or folders above
    them; cells outside the run's experiment are skipped. The per-item figures (reliability, scatter) show one
    seed per row, the first of the run's seeds; the bars show the table's means over seeds.
    """
    from moralign.data import TASKS

    long = pd.read_csv(report_dir / "results.csv")
    diffs = pd.read_csv(report_dir / "differences.csv")
    paths = []
    for metric in ("xentropy", "dirichlet"):
        paths += bar_figure(long, dataset, metric, out_dir / f"{dataset}_{metric}_bars")
    first_seed = {}
    for d, m, c, seed in cells:
        first_seed.setdefault((d, m, c), seed)
    preds = {}
    for summary in sorted(s for d in pred_dirs for s in Path(d).rglob("summary.json")):
        prov = read_json(summary)["provenance"]
        row = (prov["dataset"], prov["model"], prov["condition"])
        seed = first_seed.get(row, "not in the run")
        if seed is None or summary.parent.name == f"seed-{seed}":
            preds[f"{prov['model']} / {prov['condition']}"] = summary.parent / f"{split}.parquet"
    order = {c: k for k, c in enumerate(dict.fromkeys(c for _, _, c, _ in cells))}
    preds = dict(sorted(preds.items(), key=lambda kv: (kv[0].split(" / ")[0], order[kv[0].split(" / ")[1]])))
    cells = _load_cells(preds, data_dir / f"{split}.parquet")
    choice = TASKS[dataset].choices[0]
    paths += reliability_figure(cells, choice, dataset, out_dir / f"{dataset}_reliability")
    paths += scatter_figure(cells, choice, dataset, out_dir / f"{dataset}_scatter", list(order))
    paths += coverage_figure(long, dataset, out_dir / f"{dataset}_coverage")
    paths += differences_figure(diffs, dataset, out_dir / f"{dataset}_differences")
    return paths
