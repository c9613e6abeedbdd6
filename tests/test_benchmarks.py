"""The GPU benchmarks run on a CPU with a small shape (the figures themselves come from a GPU run), and the docs'
cost table is what benchmarks/cost_table.py computes from benchmarks/results/."""

import copy
import json
import re

import pytest

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


def doc_block() -> str:
    text = (ROOT / "docs/performance.md").read_text()
    return text.split("<!-- grid-cost:start -->")[1].split("<!-- grid-cost:end -->")[0].strip()


def test_cost_table_is_the_docs_table():
    """docs/performance.md's cost table is what benchmarks/cost_table.py computes; 3 seeds fit 13 h (projected)."""
    block = run(["python", "cost_table.py", "--print"], ROOT / "benchmarks").stdout.strip()
    assert block == doc_block()
    assert run(["python", "cost_table.py", "--check"], ROOT / "benchmarks").returncode == 0
    old, new = (float(x) for x in re.search(r"\*\*total\*\* .*\*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\*", block).groups())
    assert new <= 13 < old
    measured = [p for p in (ROOT / "benchmarks/results").glob("*.json") if json.loads(p.read_text()).get("measurement")]
    assert ("No GPU measurement in `benchmarks/results/` yet" in block) == (not measured)
    assert "| read anecdotes, sample (≤ 990 tokens per item; projected rate) |" in block  # 30 draws x (32 + stop)


SUITE_PARTS = ["gemm", "extraction", "finetune", "encoder", "generation"]
PROVENANCE = {"commit", "dirty", "date", "device", "torch", "transformers", "peft", "trl", "bitsandbytes", "cuda"}


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    """benchmarks/gpu_suite.py --tiny: every part's code path on the CPU, tiny shapes."""
    out = tmp_path_factory.mktemp("suite") / "cpu-tiny.json"
    run(["python", "gpu_suite.py", "--tiny", "--out", str(out)], ROOT / "benchmarks")
    return out, json.loads(out.read_text())


def test_gpu_suite_tiny_runs_every_part_with_its_provenance(tiny_suite):
    import torch
    import transformers

    path, result = tiny_suite
    assert result["measurement"] is False and result["tiny"] is True
    assert list(result["parts"]) == SUITE_PARTS
    for name, part in result["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("traceback"))
        assert PROVENANCE <= set(part["provenance"]), name
        assert part["provenance"]["torch"] == torch.__version__
        assert part["provenance"]["transformers"] == transformers.__version__
        assert len(part["provenance"]["commit"]) == 40 and part["settings"] and part["figures"]
    fig = {name: part["figures"] for name, part in result["parts"].items()}
    assert fig["gemm"]["gemm"]["tflops"] > 0
    for engine in ("padded", "packed"):
        f = fig["extraction"][engine]
        assert f["tokens_per_s"] > 0 and f["vs_bare_forward"] > 0 and f["mfu_gemm"] > 0 and f["mfu_spec"] is None
        assert f["real_tokens"] == result["parts"]["extraction"]["settings"]["tokens"]
    # one padded batch of mixed lengths, against packed rows of at most 1,024 tokens
    assert fig["extraction"]["packed"]["padding_efficiency"] > 0.85 > fig["extraction"]["padded"]["padding_efficiency"]
    for checkpointing in ("off", "on"):
        assert "CUDA" in fig["finetune"][f"qlora, checkpointing {checkpointing}"]["skipped"]
        lora = fig["finetune"][f"lora, checkpointing {checkpointing}"]
        assert lora["steps"] == 3 and lora["prompt_tokens_per_s"] > 0 and lora["padded_tokens_per_s"] > 0
    assert "CUDA only" in fig["finetune"]["lora, checkpointing on"]["note"]  # asked for, not run on a CPU
    assert fig["encoder"]["train"]["steps"] == 2 and fig["encoder"]["predict dilemmas"]["items_per_s"] > 0
    sample = fig["generation"]["sample"]
    settings = result["parts"]["generation"]["settings"]
    assert sample["draws"] == settings["n_draws"] * sample["prompts"]
    assert 0 < sample["generated_tokens"] <= (settings["max_new_tokens"] + 1) * sample["draws"]
    summary = path.with_suffix(".md").read_text()
    assert "NOT a measurement" in summary and all(f"| {name} |" in summary for name in SUITE_PARTS)


def test_cost_table_reads_the_latest_gpu_json_and_never_a_tiny_one(tiny_suite, tmp_path):
    """A --tiny JSON is no measurement; the newest GPU JSON is read, the rates it lacks stay projected."""
    _, result = tiny_suite
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu-tiny.json").write_text(json.dumps(result))
    cmd = ["python", "cost_table.py", "--print", "--results", str(results)]
    assert "No GPU measurement in" in run(cmd, ROOT / "benchmarks").stdout
    gpu = copy.deepcopy(result)
    gpu["measurement"] = True
    gpu["provenance"].update(device="NVIDIA H100 80GB HBM3", date="2031-01-02T00:00:00+00:00")
    (results / "nvidia-h100-80gb-hbm3-2031-01-02.json").write_text(json.dumps(gpu))
    older = copy.deepcopy(gpu)
    older["provenance"]["date"] = "2031-01-01T00:00:00+00:00"
    older["parts"]["extraction"]["figures"]["padded"]["tokens_per_s"] = 1.0
    (results / "nvidia-h200-2031-01-01.json").write_text(json.dumps(older))  # a later name, an earlier date
    block = run(cmd, ROOT / "benchmarks").stdout
    assert "Rates measured by" in block and "nvidia-h100-80gb-hbm3-2031-01-02.json" in block
    extract = gpu["parts"]["extraction"]["figures"]["padded"]["tokens_per_s"]
    assert f"| extraction, padded engine, 8B shape, bf16 | {extract:,.0f} tokens/s |" in block
    lora = gpu["parts"]["finetune"]["figures"]["lora, checkpointing off"]
    row = next(r for r in block.splitlines() if r.startswith("| fine-tuning step, this loop, bf16 LoRA"))
    assert f"{lora['padded_tokens_per_s']:,.0f} tokens/s" in row and "measured: " in row and "NVIDIA H100" in row
    qlora = next(r for r in block.splitlines() if r.startswith("| fine-tuning step, this loop, QLoRA"))
    assert "projected: " in qlora  # skipped on the CPU: the projection stays
    sampling = next(r for r in block.splitlines() if r.startswith("| batched sampling"))
    assert f"{gpu['parts']['generation']['figures']['sample']['tokens_per_s']:,.0f}" in sampling
    assert "| read anecdotes, sample (≤ 990 tokens per item; measured rate) |" in block


def test_demo_floor_overlay_keeps_the_demos_jobs(tmp_path):
    """benchmarks/demo_floor.py times the demo's own DAG: same rules, same jobs, only the run name differs."""
    from tests.conftest import copy_repo
    from tests.test_dag import snakemake_plan

    repo = copy_repo(tmp_path / "repo")
    demo = snakemake_plan(repo, "--forceall", "--configfile", "config/demo.yaml")
    floor = snakemake_plan(repo, "--forceall", "--configfile", "config/demo.yaml", "benchmarks/demo_floor.yaml")
    assert len(demo) == 65  # and the target rule `all`

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


def test_readings_cost_one_prompt_pass_whatever_extract_debias_says(monkeypatch):
    """extract.debias: swap doubles extraction's prompt passes, never a reading's (it draws from the prompt as is)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import grid_cost
    import yaml

    from moralign.config import validate

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    plain = validate(copy.deepcopy(raw))
    raw["extract"]["debias"] = "swap"
    swapped = validate(raw)
    rates = grid_cost.PROJECTED
    assert grid_cost.extract_hours("dilemmas", swapped["extract"], rates) == pytest.approx(
        2 * grid_cost.extract_hours("dilemmas", plain["extract"], rates)
    )
    tokens = grid_cost.reading_tokens(plain, "dilemmas")
    assert set(tokens) == {"sample", "verbal"}
    assert grid_cost.reading_hours("dilemmas", swapped, tokens, rates) == grid_cost.reading_hours(
        "dilemmas", plain, tokens, rates
    )
