"""The readings report's three figures: TV per reading, per-item shares, and the fine-tuning effect per reading."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from moralign.data import TASKS
from moralign.figures import COLOURS, grouped_bars, pyplot
from moralign.readings.scores import FLOOR, READINGS, UNIFORM, Prepared, table_selection


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _bars(plt: Any, frame: pd.DataFrame, title: str, ylabel: str, empty: str) -> tuple[Any, Any]:
    """Grouped bars (groups = ``group`` labels, bars = readings, 95 % intervals), or an empty-state figure."""
    if frame.empty:
        fig, ax = plt.subplots(figsize=(5, 3))
        _empty(ax, empty)
    else:
        order = {r: k for k, r in enumerate(READINGS)}
        cells = frame.assign(model=frame["group"], condition=frame["reading"]).sort_values(
            "reading", key=lambda r: r.map(order), kind="stable"
        )
        fig, ax, names = grouped_bars(plt, cells, height=3.6, intervals=True)
        ax.set_xticks(np.arange(len(names)), names, rotation=15 if len(names) > 2 else 0)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig, ax


def tv_figure(long: pd.DataFrame, dataset: str) -> Any:
    """TV per reading, grouped by model x condition, with the uniform and sampling-floor levels drawn."""
    plt = pyplot()
    shown = table_selection(long)
    d = shown[(shown["kind"] == "model") & (shown["metric"] == "tv")]
    d = d.assign(group=d["model"] + " / " + d["condition"])
    fig, ax = _bars(plt, d, f"{dataset}: total variation from the human votes (95 % CI)", "TV (lower is better)",
                    "no reading was scored")  # fmt: skip
    refs = shown[(shown["kind"] == "reference") & (shown["metric"] == "tv")].set_index("model")["value"]
    for name, style in ((UNIFORM, ":"), (FLOOR, "--")):
        if name in refs and not d.empty:
            label = f"{name} ({refs[name]:.3f})" + (" of the sample reading" if name == FLOOR else "")
            ax.axhline(refs[name], color="black", linestyle=style, linewidth=1, label=label)
    if not d.empty:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def finetune_figure(differences: pd.DataFrame, dataset: str) -> Any:
    """ΔTV (tuned − baseline) per reading with 95 % intervals, grouped by model and recipe, zero line drawn."""
    plt = pyplot()
    d = table_selection(differences.assign(kind=differences["comparison"]))
    d = d[(d["comparison"] == "fine-tuning") & (d["metric"] == "tv")]
    d = d.assign(group=d["model"] + " / " + d["contrast"])
    fig, ax = _bars(
        plt,
        d,
        f"{dataset}: does fine-tuning move each reading towards the human votes?",
        "change in TV, fine-tuned − baseline\n(below 0: closer to the humans)",
        "no fine-tuned cells in this run",
    )
    if not d.empty:
        ax.axhline(0, color="black", linewidth=0.8)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def _panel_cells(prep: Prepared) -> list[tuple[str, str, str | None]]:
    """(model, condition, seed) drawn per reading: every base cell, and each model's first tuned one (first seed)."""
    out, tuned = [], {}
    for (model, condition, _), seeds in prep.groups.items():
        if seeds == [None]:
            out.append((model, condition, None))
        else:
            tuned.setdefault(model, (model, condition, seeds[0]))
    return list(dict.fromkeys([*out, *tuned.values()]))


def items_figure(prep: Prepared, dataset: str) -> Any:
    """Per item: the human share of the first answer against the model's, one panel per reading, diagonal drawn."""
    plt = pyplot()
    task = TASKS.get(dataset)
    answer = task.choices[0] if task else "answer 1"
    readings = [r for r in READINGS if any(k[2] == r for k in prep.groups)] or list(READINGS)
    fig, axes = plt.subplots(1, len(readings), figsize=(3.2 * len(readings) + 1.6, 3.4), squeeze=False)
    drawn = _panel_cells(prep)
    conditions = list(dict.fromkeys(c for _, c, _ in drawn))
    models = list(dict.fromkeys(m for m, _, _ in drawn))
    for ax, reading in zip(axes[0], readings, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), title=reading, xlabel=f"human share of {answer}")
        shown = [(m, c, s) for m, c, s in drawn if (m, c, s, reading) in prep.per_item]
        for model, condition, seed in shown:
            p0 = prep.p[(model, condition, seed, reading)][:, 0]
            ok = np.isfinite(p0)
            ax.scatter(
                prep.h[ok, 0],
                p0[ok],
                s=12,
                alpha=0.6,
                color=COLOURS[conditions.index(condition) % len(COLOURS)],
                marker="os^dv<>"[models.index(model) % 7],
                label=f"{model} / {condition}" + ("" if seed is None else f" (seed {seed})"),
            )
        if not shown:
            _empty(ax, f"no {reading} reading")
    axes[0][0].set_ylabel(f"model share of {answer}")
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    if handles:
        fig.legend(handles.values(), handles.keys(), fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"{dataset}: per item, model against human (valid items)", fontsize=10)
    fig.tight_layout()
    return fig
