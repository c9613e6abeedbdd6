"""DVC on the demo: the same numbers as Snakemake, sharing through a remote, rebuilding one cell, experiments."""

import json
import re
import shutil
import time

import pytest

from tests.conftest import copy_repo, run

pytestmark = pytest.mark.slow


def running(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    """A git + DVC repository whose params.yaml is the demo, reproduced once, with a local remote."""
    root = tmp_path_factory.mktemp("dvc")
    repo = copy_repo(root / "repo")
    shutil.copy(repo / "config/demo.yaml", repo / "params.yaml")
    run("git init -q && git add -A && git commit -qm init", repo)
    run(["dvc", "remote", "modify", "--local", "local", "url", str(root / "remote")], repo)
    t0 = time.perf_counter()
    run(["dvc", "repro"], repo, timeout=2400)
    print(f"dvc repro of the demo: {time.perf_counter() - t0:.0f} s")
    run("git add -A && git commit -qm 'demo run'", repo)
    return repo


def test_dvc_repro_gives_the_same_numbers_as_snakemake(dvc_repo, demo_run):
    ours = json.loads((dvc_repo / "reports/demo/metrics.json").read_text())
    theirs = json.loads((demo_run / "reports/demo/metrics.json").read_text())
    assert ours == theirs
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
    adapter = clone / "models/demo/adapters/dilemmas/tiny-mistral/soft/adapter_model.safetensors"
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
    out = run(["dvc", "repro", "score_base@anecdotes-tiny-llama"], dvc_repo).stdout
    assert not running(out) and json.loads((cell / "base.json").read_text()) == before
    # recomputing the cell runs that one stage alone and gives the same numbers
    (cell / "base.json").unlink()
    out = run(["dvc", "repro", "--force", "--single-item", "score_base@anecdotes-tiny-llama"], dvc_repo).stdout
    assert running(out) == {"score_base@anecdotes-tiny-llama"}
    assert json.loads((cell / "base.json").read_text())["metrics"] == before["metrics"]
    assert "up to date" in run(["dvc", "status"], dvc_repo).stdout


def test_experiment_reruns_only_what_depends_on_the_change(dvc_repo):
    out = run(["dvc", "exp", "run", "-S", "finetune.learning_rate=0.002", "-n", "lr-0.002"], dvc_repo, timeout=2400)
    stages = running(out.stdout)
    kinds = {s.split("@")[0] for s in stages}
    assert kinds == {"finetune", "extract_tuned", "score_tuned", "summarise", "plot"}, stages
    assert sum(s.startswith("finetune@") for s in stages) == 8
    table = run(["dvc", "exp", "show", "--no-pager", "--csv"], dvc_repo).stdout
    assert "lr-0.002" in table and "0.002" in table
    assert "tiny-llama" in run(["dvc", "metrics", "diff"], dvc_repo).stdout
