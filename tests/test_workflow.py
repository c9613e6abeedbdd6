"""The workflow as users run it: Snakemake and DVC on the demo, plans of the paper configuration."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, copy_repo

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}


def run(cmd, cwd, timeout=900, check=True):
    proc = subprocess.run(
        cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, shell=isinstance(cmd, str)
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def snakemake_jobs(cwd, *args):
    """(rule, outputs) of every job Snakemake plans, from a dry run."""
    out = run(["snakemake", "-n", "--forceall", *args], cwd).stdout
    jobs, rule = [], None
    for line in out.splitlines():
        s = line.strip()
        if s.startswith(("rule ", "localrule ")) and s.endswith(":"):
            rule = s.split()[1][:-1]
        elif s.startswith("output:") and rule:
            jobs.append((rule, [p.strip() for p in s[len("output:") :].split(",")]))
            rule = None
    return jobs


def test_paper_plan_without_network():
    jobs = snakemake_jobs(ROOT)
    counts = pd.Series([r for r, _ in jobs]).value_counts()
    # 3 models x 2 datasets x (base + 2 recipes) extraction cells, 3 x 2 x 2 fine-tuning jobs
    assert counts["extract"] == 18 and counts["finetune"] == 12 and counts["score"] == 18
    assert counts["fetch_model"] == 3 and counts["download"] == 2
    plan = run(["snakemake", "-n", "--forceall"], ROOT).stdout
    gpu_rules, rule = set(), None
    for line in plan.splitlines():
        s = line.strip()
        if s.startswith(("rule ", "localrule ")) and s.endswith(":"):
            rule = s.split()[1][:-1]
        elif s.startswith("resources:") and "gpu=1" in s:
            gpu_rules.add(rule)
    assert gpu_rules == {"extract", "finetune"}


def test_demo_plans_only_demo_models():
    jobs = snakemake_jobs(ROOT, "--configfile", "config/demo.yaml")
    outputs = " ".join(o for _, outs in jobs for o in outs)
    assert "tiny-llama" in outputs and "tiny-mistral" in outputs
    assert "llama-3.1" not in outputs and "zephyr" not in outputs and "/paper/" not in outputs
    assert sum(r == "extract" for r, _ in jobs) == 12 and sum(r == "finetune" for r, _ in jobs) == 8


def test_snakemake_lint_is_clean():
    proc = run(["snakemake", "--lint"], ROOT, check=False)
    text = proc.stdout + proc.stderr
    findings = [line.strip() for line in text.splitlines() if line.strip().startswith("* ")]
    # the conda/container suggestion is expected: this project installs with pip (pyproject.toml, constraints.txt)
    unexpected = [f for f in findings if "conda environment or container" not in f]
    assert findings and not unexpected, text[-3000:]


def dvc_stages(cwd):
    """(stage name without matrix suffix, outputs) of every stage dvc.yaml defines for the params in ``cwd``."""
    script = (
        "import json\nfrom dvc.repo import Repo\n"
        "r = Repo('.')\n"
        "print(json.dumps([[s.addressing.split('@')[0], [str(o.def_path) for o in s.outs]] for s in r.index.stages]))"
    )
    return json.loads(run([sys.executable, "-c", script], cwd).stdout)


def test_snakemake_and_dvc_plan_the_same_dag(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    run("git init -q && dvc init -q --no-scm", repo)
    rename = {"extract_base": "extract", "extract_tuned": "extract", "score_base": "score", "score_tuned": "score"}
    dvc = {(rename.get(stage, stage), out) for stage, outs in dvc_stages(repo) for out in outs}
    smk = {(rule, out) for rule, outs in snakemake_jobs(repo) for out in outs if rule != "all"}

    def covered(item, pool):
        rule, out = item
        return any(r == rule and (out == o or out.startswith(o.rstrip("/") + "/")) for r, o in pool)

    missing_in_dvc = sorted(i for i in smk if not covered(i, dvc))
    missing_in_smk = sorted(i for i in dvc if not any(covered(s, [i]) for s in smk))
    assert not missing_in_dvc and not missing_in_smk, (missing_in_dvc, missing_in_smk)
    assert {r for r, _ in smk} == {r for r, _ in dvc}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("snakemake") / "repo")
    run(["snakemake", "--cores", "2", "--configfile", "config/demo.yaml"], repo, timeout=1200)
    return repo


@pytest.mark.slow
def test_demo_produces_the_table_and_learns_the_signal(demo_run):
    table = pd.read_csv(demo_run / "reports/demo/results.csv")
    models = table[table["kind"] == "model"]
    cells = models.groupby(["dataset", "model", "condition"]).size()
    assert len(cells) == 2 * 2 * 3  # datasets x models x {base, votes, soft}
    refs = table[table["kind"] == "reference"]
    assert set(refs["model"]) == {"uniform", "train_prior", "best"}
    assert not models.loc[models["metric"] != "macro_f1", "value"].isna().any()
    xent = models[models["metric"] == "xentropy"].set_index(["dataset", "model", "condition"])["value"]
    for dataset in ("anecdotes", "dilemmas"):
        for model in ("tiny-llama", "tiny-mistral"):
            for recipe in ("votes", "soft"):
                assert xent[(dataset, model, recipe)] < xent[(dataset, model, "base")], (dataset, model, recipe)
    md = (demo_run / "reports/demo/results.md").read_text()
    assert "xentropy ↓" in md and "best" in md and "published" in md
    for png in (demo_run / "reports/demo/figures").glob("*.png"):
        assert png.stat().st_size > 10_000


@pytest.mark.slow
def test_dvc_repro_gives_the_same_numbers(demo_run, tmp_path):
    repo = copy_repo(tmp_path / "repo")
    shutil.copy(repo / "config/demo.yaml", repo / "params.yaml")
    run("git init -q && git add -A && git -c user.email=t@t -c user.name=t commit -qm init && dvc init -q", repo)
    run(["dvc", "repro"], repo, timeout=1800)
    ours = json.loads((repo / "reports/demo/metrics.json").read_text())
    theirs = json.loads((demo_run / "reports/demo/metrics.json").read_text())
    assert ours == theirs
    status = run(["dvc", "status"], repo).stdout
    assert "up to date" in status.lower() or status.strip() == "", status


def test_step_scripts_do_not_shadow_packages():
    """``python workflow/scripts/x.py`` puts its folder first on sys.path: x must not be an installed module."""
    import importlib.util

    for script in (ROOT / "workflow/scripts").glob("*.py"):
        assert importlib.util.find_spec(script.stem) is None, f"{script.name} shadows the installed '{script.stem}'"
