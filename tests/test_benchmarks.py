"""The GPU benchmarks run on a CPU with a small shape (the figures themselves come from a GPU run)."""

import re

from tests.conftest import ROOT, run


def test_gpu_extract_benchmark_runs_on_cpu():
    out = run(["python", "gpu_extract.py", "--tiny", "--items", "24"], ROOT / "benchmarks").stdout
    assert re.search(r"tokens/s: [\d,]+", out) and "MFU: n/a" in out


def test_gpu_finetune_benchmark_runs_the_training_path_on_cpu():
    """The project's trainer, collator and losses (both recipes) at anecdote- and dilemma-length rows."""
    cmd = ["python", "gpu_finetune.py", "--tiny", "--steps", "2", "--warmup", "1"]
    out = run(cmd, ROOT / "benchmarks").stdout
    assert "qlora: skipped" in out
    for kind in ("anecdotes", "dilemmas"):
        for recipe in ("soft", "votes"):
            line = re.search(rf"lora +{recipe} +{kind}: 2 steps x 4 items .*", out)
            assert line and re.search(r"prompt tokens/s [\d,]+", line[0]) and "MFU n/a" in line[0], out
            assert "checkpointing off" in line[0]


def test_grid_cost_table_is_the_readme_table():
    """docs/performance.md "What the paper grid costs" shows what benchmarks/grid_cost.py computes; 3 seeds fit 13 h."""
    table = run(["python", "grid_cost.py"], ROOT / "benchmarks").stdout.strip()
    readme = (ROOT / "docs/performance.md").read_text()
    block = readme.split("<!-- grid-cost:start -->")[1].split("<!-- grid-cost:end -->")[0].strip()
    assert block == table
    old, new = (float(x) for x in re.search(r"\*\*total\*\* .*\*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\*", table).groups())
    assert new <= 13 < old


def test_demo_floor_overlay_keeps_the_demos_jobs(tmp_path):
    """benchmarks/demo_floor.py times the demo's own DAG: same rules, same jobs, only the run name differs."""
    from tests.conftest import copy_repo
    from tests.test_dag import snakemake_plan

    repo = copy_repo(tmp_path / "repo")
    demo = snakemake_plan(repo, "--forceall", "--configfile", "config/demo.yaml")
    floor = snakemake_plan(repo, "--forceall", "--configfile", "config/demo.yaml", "benchmarks/demo_floor.yaml")
    assert len(demo) == 57  # and the target rule `all`

    def renamed(plan, run):
        return {(rule, frozenset(o.replace(f"/{run}/", "/RUN/") for o in outs)) for rule, outs in plan}

    assert renamed(floor, "floor") == renamed(demo, "demo")


def test_workflow_profile_leaves_the_cluster_profiles_keys_alone():
    """profiles/default is applied to every run and replaces whole top-level keys of --profile: no overlap."""
    import yaml

    default = yaml.safe_load((ROOT / "profiles/default/config.yaml").read_text())
    assert default == {"scheduler": "greedy"}
    for profile in ("slurm", "local-gpu"):
        assert not set(default) & set(yaml.safe_load((ROOT / f"profiles/{profile}/config.yaml").read_text()))
