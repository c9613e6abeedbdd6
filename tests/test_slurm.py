"""The demo's DAG through a real SLURM scheduler (a single-node cluster on localhost), with the SLURM profile.

Every job of the demo's dilemmas block (both causal LMs with both recipes, both encoders: every kind of stage)
goes through the scheduler, on a smaller sample with shorter training (SMALL): what is tested is the scheduling,
failing and resuming, which depend neither on how long a job computes nor on how many cells share a stage.
CI installs Debian's slurmctld, slurmd, slurm-client and munge (.ci/run); elsewhere the test is skipped.
"""

import os
import re
import shutil
import subprocess

import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT, copy_repo, run

pytestmark = pytest.mark.slow
PROFILE = ["--profile", "profiles/slurm", "--workflow-profile", "tests/slurm/profile"]
# An overlay on the demo: the same models, recipes and stages on one dataset, each job seconds shorter.
SMALL = {
    # the dataset whose template broken.yaml breaks; one chat model and one encoder (every kind of job, half the
    # builds); no readings (their jobs schedule as extraction's do)
    "experiment": {"models": ["tiny-llama", "tiny-bert"], "datasets": ["dilemmas"], "readings": []},
    "data": {"sample": {"seed": 0, "train": 160, "dev": 60, "test": 60}},
    "finetune": {"max_steps": 16, "eval_steps": 8},
    "encoder": {"epochs": 1},
    "score": {"bootstrap_resamples": 200, "best_samples": 50},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not (shutil.which("slurmctld") and shutil.which("munged") and os.geteuid() == 0):
        if os.environ.get("CI"):
            pytest.fail("CI must install slurmctld slurmd slurm-client munge and run as root (see .ci/run)")
        pytest.skip("needs root and Debian's slurmctld slurmd slurm-client munge")
    state = tmp_path_factory.mktemp("slurm")
    script = str(ROOT / "tests/slurm/cluster.sh")
    out = subprocess.run([script, "start", str(state)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    conf = re.search(r"SLURM_CONF=(\S+)", out.stdout).group(1)
    os.environ["SLURM_CONF"] = conf
    try:
        yield state
    finally:
        # torn down even when the test fails
        subprocess.run([script, "stop", str(state)], timeout=60)
        os.environ.pop("SLURM_CONF", None)


def submissions(log: str) -> dict[str, tuple[str, str]]:
    """Snakemake job id -> (SLURM job id, job log path) from a run's output."""
    found = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", log)
    return {job: (slurm_id, path) for job, slurm_id, path in found}


def finished(log: str) -> set[str]:
    return set(re.findall(r"Finished jobid: (\d+) ", log))


def job_key(path: str) -> str:
    """rule/wildcards part of a SLURM log path (.snakemake/slurm_logs/rule_<rule>/<wildcards>/<id>.log)."""
    return path.split("slurm_logs/")[1].rsplit("/", 1)[0]


def test_demo_through_slurm_stops_on_failure_and_resumes(cluster, tmp_path):
    repo = copy_repo(tmp_path / "repo")
    broken = yaml.safe_load((repo / "config/demo.yaml").read_text())
    broken["prompts"]["dilemmas"]["template"] = "{no_such_field}"
    (repo / "broken.yaml").write_text(yaml.safe_dump(broken))
    (repo / "small.yaml").write_text(yaml.safe_dump(SMALL))

    # 1. a failing job: the run stops cleanly and names the failed job's log
    first = run(["snakemake", *PROFILE, "--configfile", "broken.yaml", "small.yaml"], repo, timeout=1800, check=False)
    out1 = first.stdout + first.stderr
    assert first.returncode != 0
    assert (
        "Error in rule" in out1
        and "no_such_field"
        in (repo / "logs")
        .joinpath(*re.search(r"log: logs/(\S+\.log)", out1.split("Error in rule")[1]).group(1).split("/"))
        .read_text()
    )
    sub1 = submissions(out1)
    assert sub1, out1[-3000:]

    # 2. the same command with the fixed config picks up where it stopped: nothing finished is redone
    second = run(["snakemake", *PROFILE, "--configfile", "config/demo.yaml", "small.yaml"], repo, timeout=2400)
    out2 = second.stdout + second.stderr
    sub2 = submissions(out2)
    done_before = {job_key(sub1[j][1]) for j in finished(out1) if j in sub1}
    assert done_before and not done_before & {job_key(p) for _, p in sub2.values()}

    # every non-local job went through the scheduler, ran there and left its SLURM log
    slurm_ids = [s for s, _ in [*sub1.values(), *sub2.values()]]
    states = run(["squeue", "--states=all", "--noheader", "--format=%i|%T"], repo).stdout
    state = dict(line.split("|") for line in states.split())
    for _, path in sub2.values():
        assert (repo / path).is_file(), path  # kept by the test profile (slurm-keep-successful-logs)
    assert all(state.get(s) == "COMPLETED" for s, _ in sub2.values()), states
    assert len(set(slurm_ids)) == len(slurm_ids)
    table = pd.read_csv(repo / "reports/demo/results.csv")
    # one dataset x (the LM x {base + 2 recipes} + the encoder x {trained})
    assert len(table[table["kind"] == "model"].groupby(["dataset", "model", "condition"])) == 3 + 1
    assert {job_key(p).split("/")[0] for _, p in [*sub1.values(), *sub2.values()]} >= {
        f"rule_{s}"
        for s in (
            "finetune",
            "extract_base",
            "extract_tuned",
            "train_encoder",
            "extract_trained",
        )
    }
