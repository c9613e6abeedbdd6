"""The readings report: scores against direct numpy computations, reference rows, the gap, differences, files.

Synthetic items with known vote counts and synthetic predictions frames of the three readings; no model runs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moralign import metrics
from moralign.readings import report as rr
from moralign.readings.floor import sampling_floor

N_DRAWS = 30
SETTINGS = rr.ReportSettings(n_draws=N_DRAWS, smoothing=0.01, resamples=200, seed=3)


def make_items(n: int = 24, k: int = 2, seed: int = 0) -> pd.DataFrame:
    counts = np.random.default_rng(seed).integers(0, 7, size=(n, k))
    counts[:, 0] += 1  # every item voted on
    counts[0] = [3, 3, *([0] * (k - 2))]  # a tied human majority: excluded from accuracy
    return pd.DataFrame({"id": [f"item-{i}" for i in range(n)], "counts": list(counts)})


def human(items: pd.DataFrame) -> np.ndarray:
    counts = np.stack(items["counts"]).astype(float)
    return counts / counts.sum(axis=1, keepdims=True)


def logprob_frame(items: pd.DataFrame, seed: int) -> pd.DataFrame:
    k = len(items["counts"].iloc[0])
    p = np.random.default_rng(seed).dirichlet(np.ones(k), size=len(items))
    return pd.DataFrame({"id": items["id"], "p": list(p), "coverage": 1.0})


def sampled_frame(items: pd.DataFrame, seed: int, invalid: tuple[int, ...] = (2, 5)) -> pd.DataFrame:
    """A sample-reading frame: shares of N draws (exact zeros, predicted ties) and a few invalid items."""
    rng = np.random.default_rng(seed)
    k = len(items["counts"].iloc[0])
    counts = rng.multinomial(N_DRAWS, rng.dirichlet(np.ones(k), size=len(items)))
    p = counts / N_DRAWS
    p[1] = np.eye(k)[0]  # an exact zero on a voted choice: only the smoothing keeps xentropy finite
    p[3] = [0.5, 0.5, *([0.0] * (k - 2))]  # a predicted tie: 1/2 credit if the majority is among them
    valid = np.ones(len(items), dtype=bool)
    valid[list(invalid)] = False
    rows = [np.full(k, np.nan) if not ok else row for ok, row in zip(valid, p, strict=True)]
    n_valid = np.where(valid, N_DRAWS, 3)
    return pd.DataFrame(
        {"id": items["id"], "p": rows, "coverage": n_valid / N_DRAWS, "valid": valid, "n_valid": n_valid,
         "n_draws": N_DRAWS}
    )  # fmt: skip


def direct(h: np.ndarray, counts: np.ndarray, p: np.ndarray, valid: np.ndarray, s: float) -> dict[str, float]:
    """The metrics written out once more with plain numpy loops, over the valid items."""
    k = h.shape[1]
    tv, xent, acc, ent = [], [], [], []
    for i in np.flatnonzero(valid):
        tv.append(0.5 * sum(abs(p[i, j] - h[i, j]) for j in range(k)))
        smoothed = (p[i] + s) / (1 + k * s)
        xent.append(-sum(h[i, j] * np.log(smoothed[j]) for j in range(k) if h[i, j] > 0))
        ent.append(-sum(x * np.log(x) for x in p[i] if x > 0))
        top = np.flatnonzero(counts[i] == counts[i].max())
        if len(top) == 1:
            predicted = np.flatnonzero(p[i] == p[i].max())
            acc.append(1.0 / len(predicted) if top[0] in predicted else 0.0)
    return {
        "tv": np.mean(tv),
        "xentropy": np.mean(xent),
        "accuracy": np.mean(acc),
        "entropy": np.mean(ent),
        "valid_rate": valid.mean(),
    }


def value(long: pd.DataFrame, **where: object) -> pd.Series:
    mask = np.ones(len(long), dtype=bool)
    for column, wanted in where.items():
        mask &= (long[column].isna()) if wanted is None else (long[column] == wanted)
    rows = long[mask]
    assert len(rows) == 1, f"{len(rows)} rows for {where}"
    return rows.iloc[0]


@pytest.mark.parametrize("reading", ["logprob", "sample"])
def test_scores_match_a_direct_computation(reading):
    items = make_items()
    frame = logprob_frame(items, 1) if reading == "logprob" else sampled_frame(items, 1)
    long = rr.score_readings(items, [rr.ReadingCell("m", "base", None, reading, frame)], SETTINGS)
    p = np.stack([np.asarray(x, dtype=float) for x in frame["p"]])
    valid = frame["valid"].to_numpy() if "valid" in frame else np.ones(len(frame), dtype=bool)
    expected = direct(human(items), np.stack(items["counts"]), p, valid, SETTINGS.smoothing)
    for metric, want in expected.items():
        row = value(long, model="m", reading=reading, metric=metric)
        assert row["value"] == pytest.approx(want, rel=1e-12), metric
        assert row["low"] <= row["value"] <= row["high"]
    assert value(long, reading=reading, metric="tv")["n_items"] == valid.sum()
    assert value(long, reading=reading, metric="valid_rate")["n_items"] == len(items)


def test_the_interval_is_the_seeded_item_bootstrap_over_valid_items():
    items = make_items()
    frame = sampled_frame(items, 2)
    long = rr.score_readings(items, [rr.ReadingCell("m", "base", None, "sample", frame)], SETTINGS)
    h, valid = human(items), frame["valid"].to_numpy()
    tv = np.full(len(items), np.nan)
    for i in np.flatnonzero(valid):
        tv[i] = 0.5 * np.abs(frame["p"].iloc[i] - h[i]).sum()
    idx = np.random.default_rng(SETTINGS.seed).integers(0, len(items), size=(SETTINGS.resamples, len(items)))
    reps = [np.nanmean(tv[row]) for row in idx]
    row = value(long, metric="tv")
    assert (row["low"], row["high"]) == pytest.approx(tuple(np.percentile(reps, [2.5, 97.5])), rel=1e-12)


def test_invalid_items_are_excluded_whatever_their_p_and_counted_in_the_valid_rate():
    items = make_items()
    frame = sampled_frame(items, 3, invalid=(2, 5, 7))
    garbage = frame.copy()
    garbage["p"] = [np.array([7.0, -3.0]) if not ok else p for ok, p in zip(frame["valid"], frame["p"], strict=True)]
    cells = [rr.ReadingCell("m", "base", None, "sample", f) for f in (frame, garbage)]
    first, second = (rr.score_readings(items, [c], SETTINGS) for c in cells)
    pd.testing.assert_frame_equal(first, second)
    assert value(first, metric="valid_rate")["value"] == pytest.approx(1 - 3 / len(items))
    assert value(first, metric="tv")["n_items"] == len(items) - 3


def test_a_valid_item_whose_p_is_not_a_distribution_is_an_error_naming_it():
    items = make_items()
    frame = logprob_frame(items, 1)
    frame.at[4, "p"] = np.array([0.7, 0.7])
    with pytest.raises(ValueError, match=r"m / base / logprob: 1 valid item.*'item-4'"):
        rr.score_readings(items, [rr.ReadingCell("m", "base", None, "logprob", frame)], SETTINGS)


def test_reference_rows_uniform_floor_and_human_entropy():
    items = make_items()
    h = human(items)
    refs = rr.reference_rows(items, SETTINGS)
    assert value(refs, model="sampling floor", metric="tv")["value"] == pytest.approx(
        sampling_floor(h, N_DRAWS).mean(), rel=1e-12
    )
    assert value(refs, model="uniform", metric="tv")["value"] == pytest.approx(np.abs(h - 0.5).sum(1).mean() / 2)
    assert value(refs, model="uniform", metric="xentropy")["value"] == pytest.approx(np.log(2))
    entropy = np.mean([-sum(x * np.log(x) for x in row if x > 0) for row in h])
    assert value(refs, model="human", metric="entropy")["value"] == pytest.approx(entropy)


def test_the_gap_is_tv_sample_over_tv_verbal_minus_one():
    items = make_items()
    cells = [
        rr.ReadingCell("m", "base", None, "sample", sampled_frame(items, 4)),
        rr.ReadingCell("m", "base", None, "verbal", sampled_frame(items, 5, invalid=(9,))),
        rr.ReadingCell("m", "base", None, "logprob", logprob_frame(items, 6)),
    ]
    long = rr.score_readings(items, cells, SETTINGS)
    tv_sample = value(long, reading="sample", metric="tv")["value"]
    tv_verbal = value(long, reading="verbal", metric="tv")["value"]
    gap = value(long, metric="gap")
    assert gap["value"] == pytest.approx(tv_sample / tv_verbal - 1, rel=1e-12)
    assert gap["low"] <= gap["value"] <= gap["high"]
    wide = rr.readings_table(pd.concat([long, rr.reference_rows(items, SETTINGS)]))
    assert wide.loc[wide["condition"] == "base", "gap"].item().startswith(f"{gap['value']:.3f} [")
    only_sample = rr.score_readings(items, cells[:1], SETTINGS)
    assert "gap" not in set(only_sample["metric"])
    assert "gap" not in rr.readings_table(only_sample).columns


def test_several_seeds_are_averaged_and_the_table_shows_the_pooled_row():
    items = make_items()
    cells = [rr.ReadingCell("m", "votes", s, "logprob", logprob_frame(items, 10 + int(s))) for s in ("0", "1", "2")]
    long = rr.score_readings(items, cells, SETTINGS)
    per_seed = [value(long, seed=s, metric="tv")["value"] for s in ("0", "1", "2")]
    pooled = value(long, seed=rr.POOLED, metric="tv")
    assert pooled["value"] == pytest.approx(np.mean(per_seed))
    assert pooled["n_seeds"] == 3
    wide = rr.readings_table(long)
    assert list(wide["seeds"]) == ["3"]
    assert wide["logprob TV"].item().startswith(f"{pooled['value']:.3f} [")


def test_finetuning_and_reading_differences_have_the_right_sign_and_pairing():
    items = make_items()
    h = human(items)
    base = logprob_frame(items, 7)
    closer = base.assign(p=[0.5 * (p + q) for p, q in zip(base["p"], h, strict=True)])  # halfway to the humans
    cells = [
        rr.ReadingCell("m", "base", None, "logprob", base),
        rr.ReadingCell("m", "votes", "0", "logprob", closer),
        rr.ReadingCell("m", "votes", "0", "sample", sampled_frame(items, 8)),
    ]
    diffs = rr.reading_differences(items, cells, {"votes": "base"}, SETTINGS)
    tuned = value(diffs, comparison="fine-tuning", metric="tv")
    assert tuned["value"] < 0 and tuned["high"] < 0  # fine-tuned minus baseline: closer = negative
    tv_base = 0.5 * np.abs(np.stack(base["p"]) - h).sum(1)
    tv_tuned = 0.5 * np.abs(np.stack(closer["p"]) - h).sum(1)
    want = metrics.paired_difference(tv_base, tv_tuned, SETTINGS.resamples, SETTINGS.seed)
    assert (tuned["value"], tuned["low"], tuned["high"]) == pytest.approx((want["value"], want["low"], want["high"]))
    between = value(diffs, comparison="readings", reading="sample", minus="logprob")
    sample = sampled_frame(items, 8)
    valid = sample["valid"].to_numpy()
    tv_sample = np.array([0.5 * np.abs(p - q).sum() for p, q in zip(sample["p"], h, strict=True)])
    assert between["value"] == pytest.approx(np.mean(tv_sample[valid] - tv_tuned[valid]))
    assert between["n_items"] == valid.sum()  # items valid in both readings only


def test_a_tuned_cell_equal_to_its_baseline_differs_by_zero():
    items = make_items()
    frame = sampled_frame(items, 9)
    cells = [
        rr.ReadingCell("m", "base", None, "sample", frame),
        rr.ReadingCell("m", "votes", "0", "sample", frame),
        rr.ReadingCell("m", "votes", "1", "sample", frame),
    ]
    diffs = rr.reading_differences(items, cells, {"votes": "base"}, SETTINGS)
    rows = diffs[diffs["comparison"] == "fine-tuning"]
    assert len(rows) == 3 * len(rr.FINETUNE_METRICS)  # two seeds and their pooled row
    assert (rows["value"] == 0).all()
    assert ((rows["low"] <= 0) & (rows["high"] >= 0)).all()


def test_a_recipe_without_a_baseline_is_an_error_naming_it():
    items = make_items()
    cells = [rr.ReadingCell("m", "qlora-votes", "0", "logprob", logprob_frame(items, 1))]
    with pytest.raises(ValueError, match=r"m / qlora-votes: no baseline condition for 'qlora-votes'"):
        rr.reading_differences(items, cells, {"votes": "base"}, SETTINGS)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda f: f.iloc[1:], "1 item id\\(s\\) missing: 'item-0'"),
        (lambda f: pd.concat([f, f.iloc[[3]]]), "1 item id\\(s\\) duplicated: 'item-3'"),
        (lambda f: pd.concat([f, f.iloc[[3]].assign(id="stray")]), "1 item id\\(s\\) not in the eval split: 'stray'"),
    ],
)
def test_an_id_mismatch_is_an_error_naming_the_cell(edit, problem):
    items = make_items()
    cell = rr.ReadingCell("tiny-llama", "votes", "1", "sample", edit(sampled_frame(items, 1)))
    with pytest.raises(ValueError, match=f"tiny-llama / votes seed 1 / sample: {problem}"):
        rr.score_readings(items, [cell], SETTINGS)


def write(tmp_path, items, cells, dataset="anecdotes", format_following=None):
    paths = {
        "table_csv": tmp_path / "readings.csv",
        "table_md": tmp_path / "readings.md",
        "differences_csv": tmp_path / "differences.csv",
        "figure_stems": {name: tmp_path / "figures" / f"{dataset}_{name}" for name in rr.FIGURES},
    }
    rr.write_report(dataset, items, cells, {"votes": "base"}, SETTINGS, **paths, format_following=format_following)
    return paths


def full_cells(items):
    cells = []
    for k, reading in enumerate(rr.READINGS):
        make = logprob_frame if reading == "logprob" else sampled_frame
        cells.append(rr.ReadingCell("m", "base", None, reading, make(items, k)))
        cells.append(rr.ReadingCell("m", "votes", "0", reading, make(items, 10 + k)))
    return cells


def test_write_report_writes_every_file(tmp_path):
    items = make_items()
    paths = write(tmp_path, items, full_cells(items))
    for name in rr.FIGURES:
        for ext in (".png", ".pdf"):
            assert paths["figure_stems"][name].with_suffix(ext).stat().st_size > 0
    text = paths["table_md"].read_text()
    assert f"Eval split: {len(items)} items; sample reading N = {N_DRAWS}" in text
    assert "s = 0.01" in text
    for row in ("| uniform | reference |", "| sampling floor | reference |", "| human | reference |"):
        assert row in text
    long = pd.read_csv(paths["table_csv"])
    assert {"model", "reference"} == set(long["kind"])
    assert set(pd.read_csv(paths["differences_csv"])["comparison"]) == {"readings", "fine-tuning"}
    assert not list(tmp_path.rglob("*.tmp"))
    assert "Format following" not in text  # no unconstrained draws given: no section


def test_the_format_following_rates_are_in_the_markdown(tmp_path):
    items = make_items()
    rates = {"m / base": 0.25, "m / votes/seed-0": 0.0}
    text = write(tmp_path, items, full_cells(items), format_following=rates)["table_md"].read_text()
    section = text.split("### Format following")[1]
    assert "| m / base | 0.250 |" in section and "| m / votes/seed-0 | 0.000 |" in section


@pytest.mark.parametrize("which", ["logprob only", "no tuned cells", "nothing"])
def test_missing_readings_and_cells_still_give_every_figure(tmp_path, which):
    items = make_items()
    cells = {
        "logprob only": [rr.ReadingCell("m", "base", None, "logprob", logprob_frame(items, 1))],
        "no tuned cells": [c for c in full_cells(items) if c.seed is None],
        "nothing": [],
    }[which]
    paths = write(tmp_path, items, cells)
    assert all(stem.with_suffix(f).is_file() for stem in paths["figure_stems"].values() for f in (".png", ".pdf"))
    text = paths["table_md"].read_text()
    assert "| uniform | reference |" in text
    # the sampling floor is the sample reading's reference: shown wherever that reading's columns are
    assert ("| sampling floor | reference |" in text) == (which != "logprob only")


def test_five_way_items(tmp_path):
    items = make_items(n=30, k=5, seed=11)
    cells = full_cells(items)
    long = rr.score_readings(items, cells, SETTINGS)
    h, counts = human(items), np.stack(items["counts"])
    for cell in cells:
        p = np.stack([np.asarray(x, dtype=float) for x in cell.frame["p"]])
        valid = cell.frame["valid"].to_numpy() if "valid" in cell.frame else np.ones(len(p), dtype=bool)
        expected = direct(h, counts, p, valid, SETTINGS.smoothing)
        for metric, want in expected.items():
            got = value(long, condition=cell.condition, seed=cell.seed, reading=cell.reading, metric=metric)
            assert got["value"] == pytest.approx(want, rel=1e-12), (cell.label, metric)
    assert value(rr.reference_rows(items, SETTINGS), model="uniform", metric="entropy")["value"] == pytest.approx(
        np.log(5)
    )
    write(tmp_path, items, cells, dataset="anecdotes-5way")
