"""DVC on the demo: the same numbers as Snakemake, sharing through a remote, rebuilding one cell, experiments."""

import json
import re
import time

import pytest

from tests.conftest import run

pytestmark = pytest.mark.slow


def running(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_dvc_repro_gives_the_same_numbers_as_snakemake(dvc_repo, demo_run):
    """Same machine, same config: byte-identical metrics and identical predictions, whichever front end ran."""
    ours, theirs = dvc_repo / "reports/demo/metrics.json", demo_run / "reports/demo/metrics.json"
    assert ours.read_bytes() == theirs.read_bytes()
    predictions = sorted((demo_run / "results/demo/predictions").rglob("*.parquet"))
    # datasets x (LMs x {base + 2 recipes} + encoders x {trained}) x splits
    assert len(predictions) == 2 * (2 * 3 + 2 * 1) * 2
    for path in predictions:
        twin = dvc_repo / path.relative_to(demo_run)
        assert twin.read_bytes() == path.read_bytes(), path.relative_to(demo_run)
    assert "up to date" in run(["dvc", "status"], dvc_repo).stdout
    assert "tiny-llama" in run(["dvc", "metrics", "show"], dvc_repo).stdout


def test_push_clone_pull_and_nothing_to_redo(dvc_repo, tmp_path):
    t0 = time.perf_counter()
    run(["dvc", "push"], dvc_repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(dvc_repo), str(clone)], tmp_path)
    remote = run(["dvc", "remote", "list", "--local"], dvc_repo).stdout.split()[1]
    run(["dvc", "remote", "modify", "--local", "local", "url", remote], clone)
    run(["dvc", "pull"], clone)
    print(f"push + clone + pull: {time.perf_counter() - t0:.1f} s")
    assert "up to date" in run(["dvc", "status"], clone).stdout
    assert not running(run(["dvc", "repro"], clone).stdout)
    adapter = clone / "models/demo/adapters/dilemmas/tiny-mistral/soft/seed-0/adapter_model.safetensors"
    assert adapter.stat().st_size > 1000
    # Snakemake in the pulled clone: checkout times say nothing about what is up to date, so --touch once
    # (in DAG order), after which Snakemake finds nothing to do.
    run(["snakemake", "--cores", "1", "--touch", "--configfile", "config/demo.yaml"], clone)
    plan = run(["snakemake", "-n", "--configfile", "config/demo.yaml"], clone).stdout
    assert "Nothing to be done" in plan, plan[-2000:]


def test_rebuild_one_cell(dvc_repo):
    cell = dvc_repo / "results/demo/scores/anecdotes/tiny-llama"
    before = json.loads((cell / "base.json").read_text())
    # deleted outputs of an unchanged stage come back from the cache, and nothing else runs
    for name in ("base.json", "base.items.parquet"):
        (cell / name).unlink()
    out = run(["dvc", "repro", "score_base@anecdotes-tiny-llama-base"], dvc_repo).stdout
    assert not running(out) and json.loads((cell / "base.json").read_text()) == before
    # recomputing the cell runs that one stage alone and gives the same numbers
    (cell / "base.json").unlink()
    out = run(["dvc", "repro", "--force", "--single-item", "score_base@anecdotes-tiny-llama-base"], dvc_repo).stdout
    assert running(out) == {"score_base@anecdotes-tiny-llama-base"}
    assert json.loads((cell / "base.json").read_text())["metrics"] == before["metrics"]
    assert "up to date" in run(["dvc", "status"], dvc_repo).stdout


def test_experiment_reruns_only_what_depends_on_the_change(dvc_repo):
    out = run(
        ["dvc", "exp", "run", "-S", "config/demo.yaml:finetune.learning_rate=0.002", "-n", "lr-0.002"],
        dvc_repo,
        timeout=2400,
    )
    stages = running(out.stdout)
    kinds = {s.split("@")[0] for s in stages}
    assert kinds == {"finetune", "extract_tuned", "score_tuned", "summarise", "plot"}, stages
    assert sum(s.startswith("finetune@") for s in stages) == 8
    table = run(["dvc", "exp", "show", "--no-pager", "--csv"], dvc_repo).stdout
    assert "lr-0.002" in table and "0.002" in table
    assert "tiny-llama" in run(["dvc", "metrics", "diff"], dvc_repo).stdout
