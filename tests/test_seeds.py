"""Training seeds through the whole DAG: one adapter and one cell per seed, a table row over seeds whose interval
resamples seeds then items, and a rebuild of one seed that leaves the others alone."""

import numpy as np
import pandas as pd
import pytest
import yaml

from moralign import metrics
from tests.conftest import copy_repo, run

OVERLAY = {
    "run": "seeds",
    # enough test items that item sampling alone gives a narrow interval (300: width ~0.04 in xentropy)
    "data": {"sample": {"seed": 0, "train": 160, "dev": 60, "test": 300}},
    # the table's seeds (the readings table pools seeds the same way: tests/test_readings_report.py)
    "experiment": {"models": ["tiny-llama"], "datasets": ["dilemmas"], "recipes": ["soft"], "readings": []},
    # a very high learning rate for few steps: runs that differ only in their seed end in different places
    # (measured: xentropy 0.751 and 0.699; bit for bit the same on every CPU run, threads being pinned)
    "finetune": {"seeds": [0, 1], "max_steps": 30, "eval_steps": 30, "learning_rate": 0.15, "batch_size": 8},
    "score": {"bootstrap_resamples": 400},
}


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("seeds") / "repo")
    (repo / "config/seeds.yaml").write_text(yaml.safe_dump(OVERLAY))
    run(["snakemake", "--cores", "2", "--configfile", "config/demo.yaml", "config/seeds.yaml"], repo, timeout=1200)
    return repo


@pytest.mark.slow
def test_two_seeds_make_two_cells_and_one_row_that_shows_their_disagreement(two_seeds):
    repo = two_seeds
    adapters = sorted(p.name for p in (repo / "models/seeds/adapters/dilemmas/tiny-llama/soft").iterdir())
    assert adapters == ["seed-0", "seed-1"]
    scores = repo / "results/seeds/scores/dilemmas/tiny-llama/soft"
    cells = [pd.read_parquet(scores / f"seed-{s}.items.parquet") for s in (0, 1)]
    assert list(cells[0]["id"]) == list(cells[1]["id"])
    table = pd.read_csv(repo / "reports/seeds/results.csv")
    row = table[(table["model"] == "tiny-llama") & (table["condition"] == "soft") & (table["metric"] == "xentropy")]
    row = row.iloc[0]
    assert row["seeds"] == 2
    per_seed = [c["xentropy"].mean() for c in cells]
    assert abs(per_seed[0] - per_seed[1]) > 0.02, per_seed  # the seeds disagree
    assert row["value"] == pytest.approx(np.mean(per_seed), abs=1e-9)
    # the same two seeds with item sampling alone (their per-item mean, resampled by items): narrower
    mean_items = (cells[0]["xentropy"].to_numpy() + cells[1]["xentropy"].to_numpy()) / 2
    idx = metrics.bootstrap_indices(len(mean_items), 400, 0)
    low, high = metrics.interval(mean_items[idx].mean(axis=1))
    assert row["high"] - row["low"] > 1.5 * (high - low), (row["low"], row["high"], low, high)
    diffs = pd.read_csv(repo / "reports/seeds/differences.csv")
    assert set(diffs["seeds"]) == {2} and set(diffs["baseline"]) == {"base"}


@pytest.mark.slow
def test_rebuilding_one_seed_leaves_the_other(two_seeds):
    repo = two_seeds
    target = "results/seeds/scores/dilemmas/tiny-llama/soft/seed-1.json"
    plan = run(
        ["snakemake", "-n", "--forcerun", "finetune", "--configfile", "config/demo.yaml", "config/seeds.yaml", "--",
         target],
        repo,
    ).stdout
    assert "adapters/dilemmas/tiny-llama/soft/seed-1" in plan and "soft/seed-0" not in plan
