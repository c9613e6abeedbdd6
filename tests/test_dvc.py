"""DVC on a block of the demo: the same bytes as Snakemake's demo, sharing through a remote, rebuilding one cell,
experiments. The block (tests/conftest.py DVC_BLOCK) holds every kind of stage; DVC runs one stage at a time."""

import json
import re
import time

import pytest

from tests.conftest import DVC_CONFIG, run

pytestmark = pytest.mark.slow


TIMED = {"summary.json", "metadata.json"}


def running(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_dvc_repro_gives_the_same_numbers_as_snakemake(dvc_repo, demo_run):
    """Same machine, same cells: byte-identical predictions, scores and adapters, whichever front end ran."""
    produced = [p for top in ("results", "models") for p in (dvc_repo / top / "demo").rglob("*") if p.is_file()]
    # a step's summary.json and an encoder's metadata.json record how long it took: all else is byte for byte
    produced = [p for p in produced if p.name not in TIMED]
    predictions = [p for p in produced if "predictions" in p.parts and p.suffix == ".parquet"]
    # one dataset x (an LM x {base + 2 recipes} + an encoder x {trained}) x splits
    assert len(predictions) == (3 + 1) * 2
    assert sum(p.name == "adapter_model.safetensors" for p in produced) == 2
    for path in produced:
        twin = demo_run / path.relative_to(dvc_repo)
        assert twin.read_bytes() == path.read_bytes(), path.relative_to(dvc_repo)
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
    adapter = clone / "models/demo/adapters/anecdotes/tiny-llama/soft/seed-0/adapter_model.safetensors"
    assert adapter.stat().st_size > 1000
    # Snakemake in the pulled clone: checkout times say nothing about what is up to date, so --touch once
    # (in DAG order), after which Snakemake finds nothing to do.
    run(["snakemake", "--cores", "1", "--touch", "--configfile", DVC_CONFIG], clone)
    plan = run(["snakemake", "-n", "--configfile", DVC_CONFIG], clone).stdout
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
        ["dvc", "exp", "run", "-S", f"{DVC_CONFIG}:finetune.learning_rate=0.002", "-n", "lr-0.002"],
        dvc_repo,
        timeout=2400,
    )
    stages = running(out.stdout)
    kinds = {s.split("@")[0] for s in stages}
    # the tuned cells' readings too (tiny-llama's), and the readings table they feed
    assert kinds == {
        "finetune",
        "extract_tuned",
        "score_tuned",
        "summarise",
        "plot",
        "read_tuned",
        "summarise_readings",
    }, stages
    assert sum(s.startswith("finetune@") for s in stages) == 2  # the LM's two recipes
    table = run(["dvc", "exp", "show", "--no-pager", "--csv"], dvc_repo).stdout
    assert "lr-0.002" in table and "0.002" in table
    assert "tiny-llama" in run(["dvc", "metrics", "diff"], dvc_repo).stdout
