"""docs/extending.md, done as it says: add an open model, a metric, a backend."""

import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from moralign import metrics, tables
from moralign.metric_registry import REGISTRY, ItemContext, register_metric
from tests.conftest import ROOT, copy_repo, run
from tests.test_tables import SETTINGS, _cell, _logp, _votes

DEMO = ["--configfile", "config/demo.yaml", "extra.yaml"]


def _snakemake(repo, *args, timeout=900):
    """Snakemake on the copy, importing the copy's own moralign (the recipe edits src/)."""
    env = f"PYTHONPATH={repo / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    cmd = " ".join([env, "snakemake", *args])
    return run(cmd, repo, timeout=timeout)


def test_add_an_open_model(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    demo = yaml.safe_load((ROOT / "config/demo.yaml").read_text())
    spec = {**demo["models"]["tiny-llama"]["build"], "seed": 7}
    extra = {
        "models": {"tiny-llama-b": {"build": spec, "chat_template": True}},
        "experiment": {"models": ["tiny-llama", "tiny-llama-b"], "datasets": ["dilemmas"]},
    }
    (repo / "extra.yaml").write_text(yaml.safe_dump(extra))
    plan = _snakemake(repo, "-n", "--forceall", *DEMO).stdout
    for rule in ("build_model", "extract_base", "finetune", "extract_tuned", "score_tuned"):
        assert re.search(rf"rule {rule}:\n(?:.*\n)*?.*tiny-llama-b", plan), rule
    # the recipe's command for DVC: its file lists the new model's instances
    (repo / "both.yaml").write_text(
        yaml.safe_dump(
            {
                **demo,
                "models": {**demo["models"], **extra["models"]},
                "experiment": {**demo["experiment"], **extra["experiment"]},
            }
        )
    )
    dvc = run(["python", "-m", "moralign.pipeline", "dvc", "--config", "both.yaml"], repo).stdout
    assert "dilemmas-tiny-llama-b-soft-0" in dvc
    # and its base cell runs end to end, through the same from_pretrained path
    target = "results/demo/scores/dilemmas/tiny-llama-b/base.json"
    _snakemake(repo, "--cores", "2", *DEMO, "--", target)
    score = json.loads((repo / target).read_text())
    assert score["provenance"]["model"] == "tiny-llama-b" and score["n_items"] == 200


@pytest.fixture
def brier():
    """The recipe's metric, registered as docs/extending.md writes it, and removed afterwards."""

    @register_metric("brier", lower_is_better=True)
    def _brier(c: ItemContext) -> np.ndarray:
        """Per-item Brier score: sum_j (p_j - h_j)^2."""
        return ((np.exp(c.logp) - c.h) ** 2).sum(axis=1)

    yield
    del REGISTRY["brier"]


def test_add_a_metric(tmp_path, brier):
    counts = _votes()
    logp = _logp(3)
    h = counts / counts.sum(1, keepdims=True)
    expected = float(((np.exp(logp) - h) ** 2).sum(axis=1).mean())
    result = metrics.summarise(counts, logp, np.ones(len(counts)), None, 200, 0)
    assert result["metrics"]["brier"]["value"] == pytest.approx(expected)
    assert result["metrics"]["brier"]["low"] < expected < result["metrics"]["brier"]["high"]
    # the table, the seeds-then-items row and the paired differences carry it with no other edit
    cells = [_cell(tmp_path, "m", "base", counts=counts, logp=_logp(1))]
    cells += [_cell(tmp_path, "m", "soft", s, counts=counts, logp=_logp(10 + s)) for s in (0, 1)]
    long = tables.tabulate(cells, [], tmp_path / "out", SETTINGS, [("soft", "base")])
    assert set(long.loc[long["metric"] == "brier", "condition"]) == {"base", "soft"}
    assert "brier ↓" in (tmp_path / "out/results.md").read_text().splitlines()[0]
    diffs = pd.read_csv(tmp_path / "out/differences.csv")
    assert (diffs["metric"] == "brier").sum() == 1
    assert "brier" in json.loads((tmp_path / "out/metrics.json").read_text())["dilemmas"]["m"]["soft"]


VOTE_PRIOR = '''"""The train split's mean vote distribution, predicted for every item: a backend without weights."""

import numpy as np
import pandas as pd

from moralign.data import counts_matrix
from moralign.extraction import predictions_frame
from moralign.predictors import Predictor


class VotePrior(Predictor):
    def __init__(self, prior, provenance):
        self.prior, self.provenance = prior, provenance

    def predict(self, items: pd.DataFrame) -> pd.DataFrame:
        logp = np.repeat(np.log(self.prior)[None, :], len(items), axis=0)
        return predictions_frame(list(items["id"]), logp, [0] * len(items))


def build(cfg, model, dataset, condition, inputs):
    counts = counts_matrix(pd.read_parquet(inputs.data_dir / "train.parquet"))
    prior = (counts / counts.sum(1, keepdims=True)).mean(0)
    return VotePrior(prior, {"model": model, "dataset": dataset, "condition": condition})
'''

REGISTRATION = """
register(
    Backend(
        name="vote_prior",
        module="moralign.predictors.vote_prior",
        description="the train split's mean vote distribution for every item (no weights)",
        local_weights=False,
        conditions=lambda recipes, quantized: [CONDITION_BASE],
        extract_stage="extract_vote_prior",
    )
)
"""


def test_add_a_backend(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    (repo / "src/moralign/predictors/vote_prior.py").write_text(VOTE_PRIOR)
    with open(repo / "src/moralign/backends.py", "a") as fh:
        fh.write(REGISTRATION)
    extra = {
        "models": {"prior-bot": {"backend": "vote_prior", "chat_template": False}},
        "experiment": {"models": ["prior-bot"], "datasets": ["dilemmas"], "recipes": []},
    }
    (repo / "extra.yaml").write_text(yaml.safe_dump(extra))
    # the front ends, regenerated as the recipe says: the new backend's extract stage gets its rule
    env = f"PYTHONPATH={repo / 'src'}"
    run(f"{env} python -m moralign.pipeline rules && {env} python -m moralign.pipeline dvc > dvc.yaml", repo)
    assert "rule extract_vote_prior:" in (repo / "workflow/rules/evaluate.smk").read_text()
    out = _snakemake(repo, "--cores", "2", *DEMO)
    assert "rule extract_vote_prior:" in out.stdout + out.stderr
    table = pd.read_csv(repo / "reports/demo/results.csv")
    xent = table[table["metric"] == "xentropy"].set_index("model")["value"]
    # the backend predicts the train prior for every item: its row is the train_prior reference row
    assert xent["prior-bot"] == pytest.approx(xent["train_prior"], abs=1e-12)
    assert (repo / "reports/demo/figures/dilemmas_xentropy_bars.png").is_file()
