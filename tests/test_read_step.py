"""The read step (moralign.steps.read): one cell's `sample` and `verbal` readings, local and through an API.

The library is tested in test_readings.py and test_readings_api.py; here, what the DAG relies on: the files a
cell's readings folder holds, its provenance, rereading from the cache without generating, and the same files
from an API model.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import yaml

from moralign.config import validate
from moralign.data import ARCHIVES, counts_matrix
from moralign.io import read_json
from moralign.predictors import CellInputs
from moralign.readings import sample as sample_mod
from moralign.readings.parse import VERSIONS
from moralign.steps import read
from tests.conftest import ROOT
from tests.test_readings_api import ReadingServer

SMALL = {
    "models": ["tiny-llama"],
    "max_items": 4,
    "sample": {"n_draws": 4, "max_new_tokens": 6, "seed": 0},
    "verbal": {"n_draws": 2, "seed": 0, "format_items": 2},
}


def demo_config(**readings) -> dict:
    raw = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    raw["readings"] = {**raw["readings"], **copy.deepcopy(SMALL), **readings}
    return raw


@pytest.fixture(scope="module")
def base(raw_dir, tmp_path_factory):
    """The demo's tiny-llama, built by fetch_model as the DAG builds it."""
    from moralign.steps import fetch_model

    out = tmp_path_factory.mktemp("base") / "tiny-llama"
    fetch_model.run(validate(demo_config()), "tiny-llama", [raw_dir / f"{a}.tar.gz" for a in ARCHIVES], out)
    return out


def frames(folder) -> dict[str, pd.DataFrame]:
    return {r: pd.read_parquet(folder / f"{r}.parquet") for r in ("sample", "verbal", "format")}


def test_a_local_cell_writes_every_reading_and_rereads_from_the_cache(base, processed, tmp_path, monkeypatch):
    cfg = validate(demo_config())
    args = ("tiny-llama", "anecdotes", "base", CellInputs(processed["anecdotes"], base, cache_dir=tmp_path / "cache"))
    summary = read.run(cfg, *args, tmp_path / "first")

    got = frames(tmp_path / "first")
    assert [len(f) for f in got.values()] == [4, 4, 2]
    assert set(got["sample"]["n_draws"]) == {4} and set(got["verbal"]["n_draws"]) == {2}
    test_ids = pd.read_parquet(processed["anecdotes"] / "test.parquet")["id"].head(4).tolist()
    assert got["sample"]["id"].tolist() == test_ids  # the eval split's first max_items items
    on_disk = read_json(tmp_path / "first" / "summary.json")
    assert on_disk["split"] == "test" and on_disk["engine"] == "local"
    assert on_disk["parser_versions"] == {"sample": VERSIONS["sample"], "verbal": VERSIONS["verbal"], "format": 1}
    assert on_disk["provenance"]["base"]["built"] and on_disk["provenance"]["adapter"] is None
    assert set(summary["readings"]) == {"sample", "verbal", "format"}
    assert 0 <= summary["readings"]["verbal"]["valid_rate"] <= 1

    # a rerun (the orchestrator deleted the folder) draws nothing: every completion comes from the cache
    def refuse(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(sample_mod.Sampler, "generate", refuse)
    read.run(cfg, *args, tmp_path / "again")
    for name, frame in frames(tmp_path / "again").items():
        pd.testing.assert_frame_equal(frame, got[name], obj=name)


def test_only_the_configured_readings_are_drawn(base, processed, tmp_path):
    raw = demo_config()
    raw["experiment"]["readings"] = ["sample"]
    read.run(validate(raw), "tiny-llama", "dilemmas", "base", CellInputs(processed["dilemmas"], base), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sample.parquet", "summary.json"]


@pytest.fixture
def server(httpserver):
    return ReadingServer(httpserver)


def test_an_api_cell_writes_the_same_files_through_the_response_cache(server, processed, tmp_path):
    from tests.test_openai import api_config

    raw = api_config(server.base_url, api_key_env=None)
    raw["readings"] = {**raw["readings"], **copy.deepcopy(SMALL), "models": ["fake-4o"]}
    cfg = validate(raw)
    args = ("fake-4o", "dilemmas", "base", CellInputs(processed["dilemmas"], cache_dir=tmp_path / "cache"))
    summary = read.run(cfg, *args, tmp_path / "first")
    got = frames(tmp_path / "first")
    assert [len(f) for f in got.values()] == [4, 4, 2]
    assert summary["engine"] == "api" and summary["provenance"]["model"] == "fake-4o"
    # one request per item and reading, n = the draws; verbal's carries the JSON schema
    bodies = server.calls
    assert sorted(b["n"] for b in bodies) == [1, 1, 2, 2, 2, 2, 4, 4, 4, 4]
    assert sum("response_format" in b for b in bodies) == 4
    calls = len(server.calls)
    read.run(cfg, *args, tmp_path / "again")
    assert len(server.calls) == calls  # every response came from the cache
    for name, frame in frames(tmp_path / "again").items():
        pd.testing.assert_frame_equal(frame, got[name], obj=name)


def test_the_five_way_task_is_read_and_reported(base, processed, tmp_path):
    """anecdotes-5way: five answers in every frame, and the report scores them against the five-way votes."""
    from moralign.readings.report import ReadingCell, ReportSettings, score_readings
    from tests.test_readings import FIVE_WAY

    raw = demo_config()
    raw["experiment"]["datasets"] = ["anecdotes-5way"]
    raw["prompts"]["anecdotes-5way"] = FIVE_WAY
    inputs = CellInputs(processed["anecdotes-5way"], base, cache_dir=tmp_path / "cache")
    read.run(validate(raw), "tiny-llama", "anecdotes-5way", "base", inputs, tmp_path / "out")
    got = frames(tmp_path / "out")
    assert all(len(p) == 5 for p in got["verbal"]["p"])  # every valid JSON names all five answers
    assert all(len(c) == 5 for c in got["sample"]["counts"])
    items = pd.read_parquet(processed["anecdotes-5way"] / "test.parquet").head(4)
    cells = [ReadingCell("tiny-llama", "base", None, r, got[r]) for r in ("sample", "verbal")]
    long = score_readings(items, cells, ReportSettings(n_draws=4, resamples=20))
    verbal_tv = long[(long["reading"] == "verbal") & (long["metric"] == "tv")]["value"].item()
    # directly: half the L1 distance to each item's five-way vote shares, over the valid items
    counts = counts_matrix(items).astype(float)
    verbal = got["verbal"].assign(id=got["verbal"]["id"].astype(str)).set_index("id").loc[items["id"].astype(str)]
    assert verbal["valid"].any()
    rows = zip(verbal["p"], counts, verbal["valid"], strict=True)
    tv = [0.5 * np.abs(np.asarray(p) - c / c.sum()).sum() for p, c, ok in rows if ok]
    assert verbal_tv == pytest.approx(np.mean(tv))
