"""Scoring one cell and the reference rows: id pairing, T and c fitted on dev only, the same items everywhere."""

import numpy as np
import pandas as pd
import pytest
import yaml

from moralign import metrics, references
from moralign.config import ConfigError, validate
from moralign.data import counts_matrix
from moralign.scoring import score_cell
from tests.conftest import ROOT

SETTINGS = {"bootstrap_resamples": 20, "seed": 0}


def _write(folder, split, ids, counts=None, p=None):
    folder.mkdir(parents=True, exist_ok=True)
    if counts is not None:
        pd.DataFrame({"id": ids, "counts": list(counts)}).to_parquet(folder / f"{split}.parquet")
    else:
        frame = pd.DataFrame({"id": ids, "p": list(p), "coverage": np.full(len(ids), 0.9)})
        frame.to_parquet(folder / f"{split}.parquet")


@pytest.fixture
def cell(tmp_path):
    """Votes and one model's predictions on dev and test (80 items each)."""
    rng = np.random.default_rng(0)
    data, preds = tmp_path / "data", tmp_path / "base"
    for split in ("dev", "test"):
        ids = [f"{split}-{i}" for i in range(80)]
        true = rng.dirichlet(np.ones(2) * 2, size=80)  # a model that knows each item's vote distribution
        _write(data, split, ids, counts=np.array([rng.multinomial(12, q) for q in true]))
        _write(preds, split, ids, p=true)
    return data, preds


def _sharpen(folder, split, power):
    frame = pd.read_parquet(folder / f"{split}.parquet")
    p = np.stack(frame["p"].to_numpy()) ** power
    frame["p"] = list(p / p.sum(1, keepdims=True))
    frame.to_parquet(folder / f"{split}.parquet")


def test_temperature_and_concentration_are_fitted_on_dev_and_never_see_test(cell):
    data, preds = cell
    first, _ = score_cell(preds, data, "test", SETTINGS)
    dev = pd.read_parquet(data / "dev.parquet").merge(pd.read_parquet(preds / "dev.parquet"), on="id")
    expected = metrics.fit_on_dev((counts_matrix(dev), np.log(np.stack(dev["p"].to_numpy()))))
    assert (first["temperature"], first["concentration"]) == expected
    _sharpen(preds, "test", 3.0)  # change the evaluated predictions only: T and c stay, the scores move
    second, _ = score_cell(preds, data, "test", SETTINGS)
    assert (second["temperature"], second["concentration"]) == (first["temperature"], first["concentration"])
    assert second["metrics"]["xentropy"]["value"] != first["metrics"]["xentropy"]["value"]
    _sharpen(preds, "dev", 3.0)  # change dev only: T and c follow
    third, _ = score_cell(preds, data, "test", SETTINGS)
    assert third["temperature"] != pytest.approx(second["temperature"], rel=1e-3)
    assert third["concentration"] != pytest.approx(second["concentration"], rel=1e-3)
    assert third["metrics"]["xentropy"] == second["metrics"]["xentropy"]


def test_dev_cannot_be_the_evaluation_split(cell):
    data, preds = cell
    with pytest.raises(ValueError, match="fitted on dev"):
        score_cell(preds, data, "dev", SETTINGS)
    raw = yaml.safe_load((ROOT / "config/demo.yaml").read_text())
    raw["experiment"]["eval_split"] = "dev"
    with pytest.raises(ConfigError, match=r"experiment\.eval_split is 'dev'.*fitted on dev.*eval_split: test"):
        validate(raw)
    raw["experiment"]["eval_split"], raw["extract"]["splits"] = "test", ["test"]
    with pytest.raises(ConfigError, match=r"extract\.splits .* lacks 'dev'"):
        validate(raw)


def test_base_and_tuned_are_paired_by_item_id_not_by_vote_counts(tmp_path):
    rng = np.random.default_rng(1)
    data, tuned, base = tmp_path / "data", tmp_path / "tuned", tmp_path / "base"
    # items come in pairs with identical vote counts: test-0/test-1, test-2/test-3, ...
    counts = np.repeat(rng.integers(0, 8, size=(40, 2)) + 1, 2, axis=0)
    ids = [f"test-{i}" for i in range(80)]
    _write(data, "test", ids, counts=counts)
    _write(data, "dev", ids, counts=counts)
    for folder in (tuned, base):
        _write(folder, "dev", ids, p=rng.dirichlet(np.ones(2), size=80))
    _write(tuned, "test", ids[0::2], p=rng.dirichlet(np.ones(2), size=40))
    _write(base, "test", ids[1::2], p=rng.dirichlet(np.ones(2), size=40))  # other items, the same counts
    with pytest.raises(ValueError, match="do not cover the same items"):
        score_cell(tuned, data, "test", SETTINGS, baseline_dir=base)
    _write(base, "test", ids[0::2], p=rng.dirichlet(np.ones(2), size=40))
    result, _ = score_cell(tuned, data, "test", SETTINGS, baseline_dir=base)
    assert set(result["difference_to_base"]) == set(metrics.names())


def test_a_bad_prediction_names_the_file_and_item(cell):
    data, preds = cell
    frame = pd.read_parquet(preds / "test.parquet")
    frame.at[7, "p"] = np.array([np.nan, 1.0])
    frame.to_parquet(preds / "test.parquet")
    with pytest.raises(ValueError, match=r"test\.parquet: 1 item\(s\) have a NaN.*'test-7'"):
        score_cell(preds, data, "test", SETTINGS)


def test_reference_rows_use_the_items_of_the_model_rows(tmp_path, processed):
    from moralign.io import read_json
    from moralign.steps import references as step

    raw = yaml.safe_load((ROOT / "config/demo.yaml").read_text())
    raw["extract"]["max_items"] = 12
    raw["score"].update(bootstrap_resamples=20, best_samples=20)
    step.run(validate(raw), "dilemmas", processed["dilemmas"], tmp_path / "references.json")
    rows = read_json(tmp_path / "references.json")["rows"]
    assert {name: row["n_items"] for name, row in rows.items()} == {"uniform": 12, "train_prior": 12, "best": 12}
    # dev is capped the same way (c is fitted on its first 12 items); train stays whole (the prior is estimated)
    frames = {s: pd.read_parquet(processed["dilemmas"] / f"{s}.parquet") for s in ("train", "dev")}
    prior = references.mean_distribution(counts_matrix(frames["train"]))
    np.testing.assert_allclose(rows["train_prior"]["prediction"], prior)
    dev = counts_matrix(frames["dev"].head(12))
    c = metrics.fit_concentration(dev, metrics.constant_prediction(prior, 12))
    assert rows["train_prior"]["concentration"] == pytest.approx(c)
    assert rows["best"]["floor_for"] == ["xentropy"]
