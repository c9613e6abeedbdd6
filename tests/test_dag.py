"""The stage table: both front ends come from it, agree on every instance, and declare everything a step runs."""

import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from moralign.config import load_config
from moralign.pipeline import code as pipeline_code
from moralign.pipeline import table as stages
from moralign.pipeline.plan import Plan, fill
from tests.conftest import DVC_CONFIG, ROOT, copy_repo, copy_tree, dvc_yaml_for, run

CONFIG_ARG = re.compile(r"--config \S+")


def snakemake_plan(repo: Path, *args: str) -> dict[tuple[str, frozenset], dict]:
    """(rule, outputs) -> inputs and command of every job of a dry run."""
    out = run(["snakemake", "-n", "-p", *args], repo).stdout
    jobs, job = {}, None
    for line in out.splitlines():
        s = line.strip()
        if s.startswith(("rule ", "localrule ")) and s.endswith(":"):
            job = {"rule": s.split()[1][:-1], "inputs": set(), "outputs": set(), "cmd": None}
        elif job is None:
            continue
        elif s.startswith("input:"):
            job["inputs"] = {p.strip() for p in s[len("input:") :].split(",")}
        elif s.startswith("output:"):
            job["outputs"] = {p.strip() for p in s[len("output:") :].split(",")}
        elif s.startswith("Shell command:") or (s.startswith("python workflow/") and job["cmd"] is None):
            job["cmd"] = " ".join(s.removeprefix("Shell command:").split())
            if job["rule"] != "all":
                jobs[job["rule"], frozenset(job["outputs"])] = job
            job = None
    return jobs


DVC_PLAN = """
import json
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo
stages = []
for s in Repo('.').index.stages:
    params = [k for d in s.deps if isinstance(d, ParamsDependency) for k in d.params]
    deps = [str(d.def_path) for d in s.deps if not isinstance(d, ParamsDependency)]
    stages.append([s.addressing, deps, [str(o.def_path) for o in s.outs], params, s.cmd])
print(json.dumps(stages))
"""


def dvc_plan(repo: Path) -> dict[tuple[str, frozenset], dict]:
    """(stage group, outputs) -> inputs, params and command of every DVC stage instance."""
    found = json.loads(run([sys.executable, "-c", DVC_PLAN], repo).stdout)
    return {
        (name.split("@")[0], frozenset(outs)): {"name": name, "inputs": set(deps), "params": params, "cmd": cmd}
        for name, deps, outs, params, cmd in found
    }


def test_committed_dvc_yaml_is_generated_from_the_table():
    generated = run([sys.executable, "-m", "moralign.pipeline", "dvc"], ROOT).stdout
    assert (ROOT / "dvc.yaml").read_text() == generated, "regenerate: python -m moralign.pipeline dvc > dvc.yaml"


@pytest.mark.parametrize("config", ["params.yaml", "config/demo.yaml"])
def test_committed_rules_are_generated_from_the_table(config):
    """The rule files are the generator's output, and the same for every configuration (run is a wildcard)."""
    from moralign.config import load_config
    from moralign.pipeline.plan import Plan
    from moralign.pipeline.rules import rule_files

    for rel, text in rule_files(Plan(load_config(ROOT / config))).items():
        assert (ROOT / rel).read_text() == text, f"regenerate: python -m moralign.pipeline rules ({rel})"


def test_no_rule_block_is_a_copy_of_another():
    """Every generated rule shows its own paths and command: no two blocks are the same text with another name."""
    blocks = []
    for path in sorted((ROOT / "workflow/rules").glob("*.smk")):
        for block in path.read_text().split("\n\n\nrule ")[1:]:
            name, body = block.split(":", 1)
            blocks.append((name, body.replace(name, "<stage>")))
    bodies = [body for _, body in blocks]
    assert len(blocks) == len(stages.STAGES) and len(set(bodies)) == len(bodies)


@pytest.mark.parametrize("config", ["params.yaml", "config/demo.yaml"])
def test_snakemake_and_dvc_agree_on_every_instance(tmp_path, config):
    """Same steps, inputs, outputs, config sections and commands (but the config file's path) in both."""
    repo = copy_repo(tmp_path / "repo")
    run("git init -q", repo)
    dvc_yaml_for(repo, config)
    smk = snakemake_plan(repo, "--forceall", *(["--configfile", config] if config != "params.yaml" else []))
    dvc = dvc_plan(repo)
    assert set(smk) == set(dvc), (sorted(set(smk) - set(dvc))[:3], sorted(set(dvc) - set(smk))[:3])
    for key, job in smk.items():
        twin = dvc[key]
        assert job["inputs"] == twin["inputs"], (key, job["inputs"] ^ twin["inputs"])
        assert CONFIG_ARG.sub("--config X", job["cmd"]) == CONFIG_ARG.sub("--config X", twin["cmd"]), key
        sections = re.search(r"--sections ((?:(?!--)\S+ )*)", job["cmd"]).group(1).split()
        assert sections == twin["params"], key  # what Snakemake hashes is what DVC tracks
    rules = {rule for rule, _ in smk}
    # the paper builds no model; the demo fetches none and has no API model
    absent = {"build_model"} if config == "params.yaml" else {"fetch_model", "extract_api", "read_api"}
    expected = {s.name for s in stages.STAGES} - absent
    assert rules == expected


def test_code_dependencies_follow_the_imports():
    by_stage = {s.name: set(s.code()) for s in stages.STAGES}
    # the metric code re-scores without re-extracting or re-training, and the engine re-extracts without re-scoring
    assert "src/moralign/metrics.py" in by_stage["score_tuned"] and "src/moralign/metrics.py" in by_stage["references"]
    for step in ("extract_base", "extract_tuned", "finetune", "prepare"):
        assert "src/moralign/metrics.py" not in by_stage[step], step
    assert (
        "src/moralign/extraction.py" in by_stage["extract_tuned"] and "src/moralign/training.py" in by_stage["finetune"]
    )
    assert "src/moralign/extraction.py" not in by_stage["score_base"]
    # lazy imports inside functions count, and so do the data files a module reads (the config schema)
    assert "src/moralign/predictors/hf.py" in by_stage["extract_base"]  # imported by name at run time
    assert "src/moralign/config.schema.yaml" in by_stage["download"]
    assert all(s.script_path in by_stage[s.name] for s in stages.STAGES)
    # every module of the package is run by some step (or is the table itself)
    runs = set().union(*by_stage.values())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "src/moralign").rglob("*.py")}
    generators = ("__init__", "__main__", "table", "stage", "cells", "code", "plan", "rules", "dvcfile")
    table = {f"src/moralign/pipeline/{m}.py" for m in generators}
    assert modules - runs <= table, modules - runs - table
    # the readings: the read steps run the engines and parsers, the table the report; the extract steps neither
    assert {"src/moralign/readings/sample.py", "src/moralign/readings/verbal.py"} <= by_stage["read_tuned"]
    assert "src/moralign/readings/api.py" in by_stage["read_api"]
    assert "src/moralign/readings/report.py" in by_stage["summarise_readings"]
    assert not any(p.startswith("src/moralign/readings/") for p in by_stage["extract_tuned"])


def test_module_imports_are_found_anywhere(tmp_path, monkeypatch):
    package = tmp_path / "moralign"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from moralign.sub import b\n    return b\n")
    (package / "sub" / "b.py").write_text(
        "import json\nfrom pathlib import Path\nX = Path(__file__).with_name('t.csv')\n"
    )
    (package / "sub" / "t.csv").write_text("x\n")
    monkeypatch.setattr(pipeline_code, "SRC", package)
    monkeypatch.setattr(pipeline_code, "ROOT", tmp_path)
    pipeline_code.module_dependencies.cache_clear()
    try:
        found = pipeline_code.module_dependencies("moralign.a")
    finally:
        pipeline_code.module_dependencies.cache_clear()
    assert found == {
        "moralign/a.py",
        "moralign/__init__.py",
        "moralign/sub/__init__.py",
        "moralign/sub/b.py",
        "moralign/sub/t.csv",
    }


def test_steps_read_only_declared_sections():
    cfg = load_config(ROOT / "config/demo.yaml")
    part = cfg.restrict(["score", "models.tiny-llama", "experiment.eval_split"])
    assert part["score"] == cfg["score"] and part.model("tiny-llama") == cfg.model("tiny-llama")
    assert part["experiment"]["eval_split"] == "test"
    from moralign.config import ConfigError

    for read in (lambda: part["extract"], lambda: part.model("tiny-mistral"), lambda: part["experiment"]["models"]):
        with pytest.raises(ConfigError, match="not among the sections this step declared"):
            read()


def _name(rule: str, key: str) -> str:
    """DVC's name of a stage instance: group@key, or the plain name of a stage without wildcards."""
    return f"{rule}@{key}" if key else rule


def _instances(plan: Plan) -> list[tuple[str, str, set[str], set[str]]]:
    """(rule, instance key, inputs, outputs) of every instance, from the table."""
    out = []
    for stage in plan.stages:
        inputs, outputs = plan.inputs(stage), plan.outputs(stage)
        for inst in plan.instances(stage):
            key = "-".join(inst[w] for w in stage.wildcards)
            ins = {fill(p, inst) for v in inputs.values() for p in (v if isinstance(v, list) else [v])}
            outs = {fill(p, inst) for v in outputs.values() for p in (v if isinstance(v, list) else [v])}
            out.append((stage.name, key, ins, outs))
    return out


def _downstream(instances, changed: set[str]) -> set[str]:
    """Names of the changed instances and of every instance that consumes their outputs, transitively."""
    names = set(changed)
    grew = True
    while grew:
        grew = False
        produced = {o for rule, key, _, outs in instances if _name(rule, key) in names for o in outs}
        for rule, key, ins, _ in instances:
            name = _name(rule, key)
            if name not in names and ins & produced:
                names.add(name)
                grew = True
    return names


def _with_edit(path: Path, ask, repo: Path):
    """``ask(repo)`` while ``path`` has one more line; then its bytes and times as they were."""
    text, stat = path.read_bytes(), path.stat()
    try:
        path.write_bytes(text + b"\n# edited\n")
        return ask(repo)
    finally:
        path.write_bytes(text)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.slow
def test_editing_any_module_reruns_exactly_the_steps_that_run_it(demo_run, dvc_demo, tmp_path):
    """For every file a step runs: Snakemake plans its dependents (and what follows), DVC flags exactly them.

    Files that are inputs of exactly the same instances in both front ends (the chat templates, the modules every
    step imports, a step's script and its library module, ...) behave alike by construction: both front ends take
    a stage's code list from one function (Stage.code), and test_snakemake_and_dvc_agree_on_every_instance checks
    that every instance's inputs, code included, are the same in both. So one file of each such class is edited
    (the classes partition the files by construction).
    """
    # copies of both finished demos: the edits never reach a repository another test is using
    smk_repo = copy_tree(demo_run, tmp_path / "smk")
    dvc_repo = copy_tree(dvc_demo, tmp_path / "dvc")
    plan = Plan(load_config([ROOT / "params.yaml", ROOT / "config/demo.yaml"]))
    instances = _instances(plan)
    dvc_instances = _instances(Plan(load_config(dvc_repo / DVC_CONFIG)))  # the block of the demo DVC ran
    by_outputs = {frozenset(outs): _name(rule, key) for rule, key, _, outs in instances}
    files = sorted({f for s in plan.stages if plan.instances(s) for f in s.code()})
    assert len(files) > 20
    assert snakemake_plan(smk_repo, "--configfile", "config/demo.yaml") == {}

    def snakemake_plans(repo):
        return {by_outputs[outs] for _, outs in snakemake_plan(repo, "--configfile", "config/demo.yaml")}

    def dvc_flags(repo):
        return set(json.loads(run(["dvc", "status", "--json"], repo).stdout or "{}"))

    classes: dict[tuple[frozenset[str], frozenset[str]], list[str]] = {}
    for rel in files:
        direct = frozenset(_name(r, k) for r, k, ins, _ in instances if rel in ins)
        direct_dvc = frozenset(_name(r, k) for r, k, ins, _ in dvc_instances if rel in ins)
        classes.setdefault((direct, direct_dvc), []).append(rel)
    assert len(classes) > 20

    # the two front ends look at their own copy: both ask at once (each waits on its subprocess)
    with ThreadPoolExecutor(2) as pool:
        for (direct, direct_dvc), members in classes.items():
            rel = members[0]
            smk = pool.submit(_with_edit, smk_repo / rel, snakemake_plans, smk_repo)
            dvc = pool.submit(_with_edit, dvc_repo / rel, dvc_flags, dvc_repo)
            planned = {"snakemake": smk.result(), "dvc": dvc.result()}
            assert planned["dvc"] == direct_dvc, rel
            assert planned["snakemake"] == _downstream(instances, direct), rel
    assert "up to date" in run(["dvc", "status"], dvc_repo).stdout


@pytest.mark.parametrize("config", ["params.yaml", "config/demo.yaml"])
def test_every_declared_section_is_written_in_the_config_file(config):
    """DVC reads each declared key from the file itself (not the schema's defaults): a key left out of the file
    fails `dvc repro` with "Parameters ... are missing", so both files DVC runs spell out every key a stage reads."""
    from moralign.config import key_path

    raw = yaml.safe_load((ROOT / config).read_text())
    plan = Plan(load_config(config))
    missing = set()
    for stage in stages.STAGES:
        for instance in plan.instances(stage):
            for section in plan.sections(stage, instance):
                try:
                    key_path(raw, section)
                except KeyError:
                    missing.add((stage.name, section))
    assert not missing, sorted(missing)


def test_every_gpu_stage_asks_the_slurm_profile_for_a_gpu():
    """A stage that may want a GPU (it has a device setting) gets the GPU partition in the SLURM profile; a new
    GPU stage missing there would be queued on the CPU partition with the default 8 GB."""
    profile = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text())["set-resources"]
    gpu_stages = {s.name for s in stages.STAGES if s.device_section and not s.local}
    assert gpu_stages == {
        "finetune",
        "train_encoder",
        "extract_base",
        "extract_tuned",
        "extract_trained",
        "read_base",
        "read_tuned",
    }
    for name in gpu_stages:
        assert profile.get(name, {}).get("slurm_partition") == "gpu", name
