"""moralign.censoring: the censored share of an API cell and its metrics under each treatment of censored answers.

Two kinds of prediction folder: ones the openai predictor writes from the fake server of tests/test_openai.py
(the `bound` row must reproduce the score step exactly), and small hand-made ones whose numbers are computed here
independently, in plain Python.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from moralign import censoring
from moralign.config import validate
from moralign.errors import DataError
from moralign.io import write_parquet
from moralign.scoring import score_cell
from tests.test_openai import KEY, KEY_ENV, FakeOpenAI, api_config, run_extract

NO_BOOTSTRAP = {"bootstrap_resamples": 0, "seed": 0}


@pytest.fixture
def fake(httpserver, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return FakeOpenAI(httpserver, ["A", "B"])


# -- cells extracted through the openai predictor ---------------------------------------------------------------------


@pytest.mark.parametrize(("debias", "treatment"), [("none", "bound"), ("swap", "bound"), ("none", "half_bound")])
def test_the_cells_own_treatment_reproduces_its_scores(fake, processed, tmp_path, debias, treatment):
    raw = api_config(fake.base_url, censored=treatment)
    raw["extract"].update(max_items=40, shard_size=40, debias=debias)
    out = run_extract(raw, processed, tmp_path)
    settings = validate(raw)["score"]
    data = processed["dilemmas"]

    got = censoring.summarise(out, data, "test", "dev", settings)
    want, _ = score_cell(out, data, "test", settings)
    assert got["sensitivity"][treatment] == {**want["metrics"], "n_items": want["n_items"]}

    share = json.loads((out / "summary.json").read_text())["splits"]["test"]["share_censored"]
    assert got["n_items"] == 40 and 0 < got["n_censored"] < 40 and got["share_censored"] == pytest.approx(share)
    assert got["sensitivity"]["uncensored"]["n_items"] == 40 - got["n_censored"]
    worse = [got["sensitivity"][name]["xentropy"]["value"] for name in ("bound", "half_bound", "tenth_bound")]
    assert len(set(worse)) == 3  # the treatment moves the numbers where answers are censored
    json.dumps(got)  # JSON-able as it is


def test_the_predictors_treatments_are_these():
    from moralign.predictors.openai import CENSORED_TREATMENTS

    assert CENSORED_TREATMENTS == {name: censoring.TREATMENTS[name] for name in CENSORED_TREATMENTS}


# -- hand-made cells, numbers computed independently -------------------------------------------------------------------

# (logp_choice, censored, logp_bound, counts): answer A observed, B censored at bound 0.01; both observed; nothing
# returned at all (uniform whatever the treatment); A censored, and nobody chose it.
LN = math.log
ITEMS = [
    ([LN(0.6), -math.inf], [False, True], LN(0.01), [3, 1]),
    ([LN(0.2), LN(0.7)], [False, False], LN(0.05), [1, 4]),
    ([-math.inf, -math.inf], [True, True], math.nan, [2, 2]),
    ([-math.inf, LN(0.9)], [True, False], LN(0.002), [0, 5]),
]
FRACTION = {"bound": 1.0, "half_bound": 0.5, "tenth_bound": 0.1}


def by_hand(logp, cens, bound, fraction):
    """p of one item in plain Python: censored answers at fraction * bound, renormalised; all censored: uniform."""
    if all(cens):
        return [1 / len(cens)] * len(cens)
    mass = [fraction * math.exp(bound) if c else math.exp(lp) for lp, c in zip(logp, cens, strict=True)]
    return [m / sum(mass) for m in mass]


def write_cell(tmp_path, items, treatment="bound", name="cell", **provenance):
    """A prediction folder and a data folder of ``items``, dev and test alike (ids differ by split)."""
    pred_dir, data_dir = tmp_path / name / "pred", tmp_path / name / "data"
    for split in ("dev", "test"):
        ids = [f"{split}-{i}" for i in range(len(items))]
        frame = pd.DataFrame(
            {
                "id": ids,
                "logp_choice": [np.array(lp) for lp, *_ in items],
                "coverage": [sum(math.exp(v) for v in lp) for lp, *_ in items],
                "p": [np.array(by_hand(lp, c, b, FRACTION[treatment])) for lp, c, b, _ in items],
                "censored": [np.array(c) for _, c, _, _ in items],
                "logp_bound": [b for _, _, b, _ in items],
            }
        )
        prov = {"backend": "openai", "censored": treatment, "debias": "none", "split": split, **provenance}
        write_parquet(pred_dir / f"{split}.parquet", frame, prov)
        gold = pd.DataFrame({"id": ids, "counts": [np.array(counts) for *_, counts in items]})
        write_parquet(data_dir / f"{split}.parquet", gold)
    return pred_dir, data_dir


def expected(items, fraction):
    """xentropy, dirichlet (c = 1), total variation and accuracy, means over the items, in plain Python."""
    xent, diri, tv, acc = [], [], [], []
    for lp, cens, bound, counts in items:
        p, n = by_hand(lp, cens, bound, fraction), sum(counts)
        h = [c / n for c in counts]
        xent.append(-sum(hj * math.log(pj) for hj, pj in zip(h, p, strict=True) if hj > 0))
        diri.append(
            -(
                math.lgamma(1)
                - math.lgamma(1 + n)
                + sum(math.lgamma(pj + y) - math.lgamma(pj) for pj, y in zip(p, counts, strict=True))
            )
        )
        tv.append(0.5 * sum(abs(pj - hj) for pj, hj in zip(p, h, strict=True)))
        top = max(counts)
        if counts.count(top) == 1:  # a tied human majority is excluded from accuracy
            best = max(p)
            winners = [j for j, pj in enumerate(p) if pj == best]
            acc.append(winners.count(counts.index(top)) / len(winners))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"xentropy": mean(xent), "dirichlet": mean(diri), "total_variation": mean(tv), "accuracy": mean(acc)}


def test_each_treatment_matches_an_independent_computation(tmp_path):
    pred_dir, data_dir = write_cell(tmp_path, ITEMS)
    got = censoring.summarise(pred_dir, data_dir, "test", "dev", NO_BOOTSTRAP)
    assert (got["share_censored"], got["n_censored"], got["n_items"]) == (0.75, 3, 4)
    for name, fraction in FRACTION.items():
        row = got["sensitivity"][name]
        assert row["n_items"] == 4
        for metric, value in expected(ITEMS, fraction).items():
            assert row[metric]["value"] == pytest.approx(value, rel=1e-12), (name, metric)
    row = got["sensitivity"]["uncensored"]
    assert row["n_items"] == 1
    for metric, value in expected([ITEMS[1]], 1.0).items():
        assert row[metric]["value"] == pytest.approx(value, rel=1e-12), metric


def test_a_lower_probability_for_a_chosen_censored_answer_only_scores_worse(tmp_path):
    """The report's claim: under `bound`, xentropy and dirichlet are optimistic where annotators chose the answer."""
    items = ITEMS[:3]  # the censored answer of item 0 was chosen by a quarter of its annotators
    got = censoring.summarise(*write_cell(tmp_path, items), "test", "dev", NO_BOOTSTRAP)["sensitivity"]
    for metric in ("xentropy", "dirichlet"):
        values = [got[name][metric]["value"] for name in ("bound", "half_bound", "tenth_bound")]
        assert values[0] < values[1] < values[2], metric


def test_a_cell_whose_every_item_is_censored_has_an_empty_uncensored_row(tmp_path):
    got = censoring.summarise(*write_cell(tmp_path, [ITEMS[0], ITEMS[2]]), "test", "dev", NO_BOOTSTRAP)
    assert got["share_censored"] == 1.0 and got["sensitivity"]["uncensored"]["n_items"] == 0
    assert math.isnan(got["sensitivity"]["uncensored"]["xentropy"]["value"])


# -- refusals ---------------------------------------------------------------------------------------------------------


def test_a_folder_of_another_backend_is_refused(tmp_path):
    pred_dir, data_dir = write_cell(tmp_path, ITEMS, backend="hf")
    for split in ("dev", "test"):
        frame = pd.read_parquet(pred_dir / f"{split}.parquet").drop(columns=["censored", "logp_bound"])
        write_parquet(pred_dir / f"{split}.parquet", frame, {"backend": "hf"})
    with pytest.raises(DataError, match=r"test\.parquet: not predictions of the openai backend \(backend 'hf'\)"):
        censoring.summarise(pred_dir, data_dir, "test", "dev", NO_BOOTSTRAP)
    with pytest.raises(DataError, match=r"no test predictions"):
        censoring.summarise(tmp_path / "elsewhere", data_dir, "test", "dev", NO_BOOTSTRAP)


def test_a_changed_p_and_a_swap_file_without_its_orders_are_refused(tmp_path):
    pred_dir, data_dir = write_cell(tmp_path, ITEMS)
    frame = pd.read_parquet(pred_dir / "test.parquet")
    frame.at[1, "p"] = np.array([0.5, 0.5])
    write_parquet(pred_dir / "test.parquet", frame, {"backend": "openai", "censored": "bound"})
    with pytest.raises(DataError, match=r"p of 1 item\(s\) is not what .* e\.g\. \['test-1'\]"):
        censoring.summarise(pred_dir, data_dir, "test", "dev", NO_BOOTSTRAP)

    pred_dir, data_dir = write_cell(tmp_path, ITEMS, name="swap", debias="swap")
    with pytest.raises(DataError, match="debias: swap but without the per-order columns"):
        censoring.summarise(pred_dir, data_dir, "test", "dev", NO_BOOTSTRAP)


# -- the Markdown report ----------------------------------------------------------------------------------------------


def test_sensitivity_markdown_shows_every_cell_and_treatment(tmp_path):
    settings = {"bootstrap_resamples": 20, "seed": 0}
    entries = [
        {
            "dataset": "dilemmas",
            "model": "gpt-4o",
            "condition": "base",
            **censoring.summarise(*write_cell(tmp_path, ITEMS, name="a"), "test", "dev", settings),
        },
        {
            "dataset": "anecdotes",
            "model": "gpt-4o",
            "condition": "base",
            **censoring.summarise(*write_cell(tmp_path, [ITEMS[0], ITEMS[3]], name="b"), "test", "dev", settings),
        },
    ]
    text = censoring.sensitivity_markdown(entries)
    assert "## gpt-4o · dilemmas · base" in text and "## gpt-4o · anecdotes · base" in text
    assert "3 of 4 items (75.0 %) have a censored answer." in text
    assert "xentropy and dirichlet are optimistic bounds" in text
    for name in censoring.SENSITIVITY:
        assert f"- `{name}`: {censoring.DESCRIPTIONS[name]}." in text
        assert text.count(f"| `{name}` |") == 2
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    xent = entries[0]["sensitivity"]["tenth_bound"]["xentropy"]
    assert f"{xent['value']:.3f} [{xent['low']:.3f}, {xent['high']:.3f}]" in rows[2]
    assert rows[-1].startswith("| `uncensored` | 0 | –")  # no item left there
    header = next(line for line in text.splitlines() if line.startswith("| treatment"))
    assert "xentropy ↓" in header and "accuracy ↑" in header
    with pytest.raises(ValueError, match=r"entry 0 lacks \['dataset'\]"):
        censoring.sensitivity_markdown([{k: v for k, v in entries[0].items() if k != "dataset"}])
