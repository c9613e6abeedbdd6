"""The workflow as users run it: Snakemake and DVC on the demo, plans of the paper configuration."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from moralign import metrics
from moralign.figures import FIGURES, READING_FIGURES
from tests.conftest import ROOT, run


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
    # 3 local models x 2 datasets: the base on bf16 and on the 4-bit weights QLoRA trains on, and per recipe and
    # seed (3) one adapter and one tuned cell; GPT-4o: base only; BERT-large and RoBERTa-large: one trained encoder
    # per dataset and seed, its extraction and score, no base row
    assert counts["extract_base"] == 12 and counts["extract_tuned"] == 36 and counts["finetune"] == 36
    assert counts["extract_api"] == 2 and counts["score_base"] == 14 and counts["score_tuned"] == 36
    assert counts["train_encoder"] == 12 and counts["extract_trained"] == 12 and counts["score_trained"] == 12
    adapters = {o for r, outs in jobs if r == "finetune" for o in outs}
    assert len(adapters) == 36 and "models/paper/adapters/dilemmas/zephyr-7b-beta/soft/seed-2" in adapters
    assert counts["fetch_model"] == 5 and counts["download"] == 2 and "build_model" not in counts
    api = [outs for rule, outs in jobs if rule in ("extract_api", "finetune", "extract_tuned") and "gpt-4o" in outs[0]]
    assert len(api) == 2, api  # no fine-tuning of an API model
    encoders = {(r, o) for r, outs in jobs for o in outs if "bert-large-uncased" in o or "roberta-large" in o}
    assert {r for r, _ in encoders} == {"fetch_model", "train_encoder", "extract_trained", "score_trained"}
    assert all("/base/" not in o for r, o in encoders if r != "fetch_model")  # no base row of an encoder
    # the sample and verbal readings of every chat model's every cell (one job reads both), GPT-4o's through its API
    assert counts["read_base"] == 12 and counts["read_tuned"] == 36 and counts["summarise_readings"] == 2
    reads = {o for r, outs in jobs if r.startswith("read_") for o in outs}
    assert {o for r, outs in jobs if r == "read_api" for o in outs} == {
        f"results/paper/readings/{d}/gpt-4o/base" for d in ("anecdotes", "dilemmas")
    }
    assert not any("bert" in o for o in reads)  # an encoder generates no text
    proc = run(["snakemake", "-n", "-p", "--forceall"], ROOT)
    plan = proc.stdout
    # QLoRA recipes: tuned cells scored on the 4-bit base they trained on, compared with the base on it too
    tuned = [line for line in plan.splitlines() if "extract.py" in line and "--adapter models/paper/adapters/" in line]
    assert len(tuned) == 36 and all("--base-quantization 4bit" in line for line in tuned)
    scored = [line for line in plan.splitlines() if "score.py" in line and "--baseline" in line]
    assert len(scored) == 36 and all(line.split("--baseline ")[1].split()[0].endswith("/base-4bit") for line in scored)
    assert "recipe soft: seeds [0, 1, 2], trained and scored on the 4-bit NF4 base" in proc.stderr
    gpu_rules, rule = set(), None
    for line in plan.splitlines():
        s = line.strip()
        if s.startswith(("rule ", "localrule ")) and s.endswith(":"):
            rule = s.split()[1][:-1]
        elif s.startswith("resources:") and "gpu=1" in s:
            gpu_rules.add(rule)
    assert gpu_rules == {
        "extract_base",
        "extract_tuned",
        "finetune",
        "train_encoder",
        "extract_trained",
        "read_base",
        "read_tuned",
    }


def test_demo_plans_only_demo_models():
    jobs = snakemake_jobs(ROOT, "--configfile", "config/demo.yaml")
    outputs = " ".join(o for _, outs in jobs for o in outs)
    assert all(m in outputs for m in ("tiny-llama", "tiny-mistral", "tiny-bert", "tiny-roberta"))
    assert "llama-3.1" not in outputs and "zephyr" not in outputs and "/paper/" not in outputs
    assert "roberta-large" not in outputs and "bert-large" not in outputs
    assert sum(r.startswith("extract") for r, _ in jobs) == 16 and sum(r == "finetune" for r, _ in jobs) == 8
    assert sum(r == "train_encoder" for r, _ in jobs) == 4 and sum(r == "build_model" for r, _ in jobs) == 4
    # all three readings of tiny-llama, base and fine-tuned, on both datasets
    reads = sorted(o for r, outs in jobs if r.startswith("read_") for o in outs)
    assert reads == sorted(
        f"results/demo/readings/{d}/tiny-llama/{c}"
        for d in ("anecdotes", "dilemmas")
        for c in ("base", "votes/seed-0", "soft/seed-0")
    )


def test_snakemake_lint_is_clean():
    proc = run(["snakemake", "--lint"], ROOT, check=False)
    text = proc.stdout + proc.stderr
    findings = [line.strip() for line in text.splitlines() if line.strip().startswith("* ")]
    # the conda/container suggestion is expected: this project installs with pip (pyproject.toml, constraints.txt)
    unexpected = [f for f in findings if "conda environment or container" not in f]
    assert findings and not unexpected, text[-3000:]


@pytest.mark.slow
def test_demo_produces_the_table(demo_run):
    reports = demo_run / "reports/demo"
    table = pd.read_csv(reports / "results.csv")
    models = table[table["kind"] == "model"]
    cells = models.groupby(["dataset", "model", "condition"]).size()
    assert len(cells) == 2 * (2 * 3 + 2)  # datasets x (LMs x {base, votes, soft} + encoders x {trained})
    assert (cells == len(metrics.names())).all()
    refs = table[table["kind"] == "reference"]
    assert set(refs["model"]) == {"uniform", "train_prior", "best"}
    assert set(table.loc[table["kind"] == "published", "metric"]) == {"paper_xentropy", "dirichlet"}
    # every model value and interval is there (macro-F1 too: the demo has both classes)
    assert not models[["value", "low", "high"]].isna().any().any()
    wide = (reports / "results.md").read_text().splitlines()
    assert wide[0].count("↓") == 7 and wide[0].count("↑") == 3
    assert len([row for row in wide if row.startswith("| ")]) == 1 + len(cells) + 2 * 3 + 13  # + refs + published
    tex = (reports / "results.tex").read_text()
    assert "\\toprule" in tex and "\\textbf{" in tex
    diffs = pd.read_csv(reports / "differences.csv")
    # datasets x LMs x (votes - base, soft - base, soft - votes)
    assert len(diffs) == 2 * 2 * 3 * len(metrics.names()) and not diffs[["value", "low", "high"]].isna().any().any()
    for dataset in ("anecdotes", "dilemmas"):
        for kind in FIGURES:
            png, pdf = reports / f"figures/{dataset}_{kind}.png", reports / f"figures/{dataset}_{kind}.pdf"
            with Image.open(png) as image:
                assert image.size[0] >= 500 and image.size[1] >= 300, png
                assert len(set(image.convert("L").getdata())) > 20, f"{png} looks blank"
            assert pdf.stat().st_size > 5_000


@pytest.mark.slow
def test_demo_fine_tuning_learns_the_planted_signal(demo_run):
    """Both recipes lower xentropy and dirichlet on dev and test, for both architectures and datasets, and say the
    answer: coverage >= 0.9 on test (the soft recipe's objective counts the mass off the answers)."""
    from moralign.data import counts_matrix
    from moralign.metrics import dirichlet, xentropy

    root = demo_run / "results/demo/predictions"
    for dataset in ("anecdotes", "dilemmas"):
        for split in ("dev", "test"):
            gold = pd.read_parquet(demo_run / f"data/demo/processed/{dataset}/{split}.parquet")
            counts = counts_matrix(gold)
            scores = {}
            for model in ("tiny-llama", "tiny-mistral"):
                for condition in ("base", "votes", "soft"):
                    cell = condition if condition == "base" else f"{condition}/seed-0"
                    pred = pd.read_parquet(root / f"{dataset}/{model}/{cell}/{split}.parquet")
                    if condition != "base" and split == "test":
                        assert pred["coverage"].mean() >= 0.9, (dataset, model, condition, pred["coverage"].mean())
                    assert list(pred["id"]) == list(gold["id"])
                    logp = np.log(np.stack(pred["p"].to_numpy()))
                    h = counts / counts.sum(1, keepdims=True)
                    scores[model, condition] = (xentropy(h, logp).mean(), dirichlet(counts, logp).mean())
                for recipe in ("votes", "soft"):
                    for k, metric in enumerate(("xentropy", "dirichlet")):
                        assert scores[model, recipe][k] < scores[model, "base"][k], (
                            dataset,
                            split,
                            model,
                            recipe,
                            metric,
                        )


@pytest.mark.slow
def test_demo_reads_three_ways(demo_run):
    """tiny-llama's three readings, base and fine-tuned, on both datasets: table, floor row and figures."""
    reports = demo_run / "reports/demo"
    for dataset in ("anecdotes", "dilemmas"):
        long = pd.read_csv(reports / f"readings/{dataset}.csv")
        cells = long[long["kind"] == "model"]
        assert set(cells["condition"]) == {"base", "votes", "soft"} and set(cells["model"]) == {"tiny-llama"}
        assert set(cells["reading"]) >= {"logprob", "sample", "verbal"}
        assert {"uniform", "sampling floor"} <= set(long.loc[long["kind"] == "reference", "model"])
        cells = cells[cells["seed"].astype(str) != "mean"]  # one training seed: no pooled row to drop, but be sure
        tv = cells[cells["metric"] == "tv"].set_index(["condition", "reading"])["value"]
        # fine-tuning on the votes moves the log-probabilities, and the sampled answers read them (N = 30)
        assert tv["votes", "logprob"] < tv["base", "logprob"]
        assert abs(tv["votes", "sample"] - tv["votes", "logprob"]) < 0.05
        table = (reports / f"readings/{dataset}.md").read_text()
        assert "sampling floor" in table and "gap" in table and "### Format following" in table
        for kind in READING_FIGURES:
            with Image.open(reports / f"figures/{dataset}_{kind}.png") as image:
                assert len(set(image.convert("L").getdata())) > 20, kind
        summary = json.loads(
            (demo_run / f"results/demo/readings/{dataset}/tiny-llama/votes/seed-0/summary.json").read_text()
        )
        assert summary["provenance"]["adapter"] and summary["parser_versions"]["sample"] >= 1


@pytest.mark.slow
def test_demo_html_report(demo_run):
    report = demo_run / "report.html"
    run(["snakemake", "--configfile", "config/demo.yaml", "--report", str(report)], demo_run, timeout=600)
    html = report.read_text()
    assert report.stat().st_size > 200_000
    for dataset in ("anecdotes", "dilemmas"):
        for kind in FIGURES:
            assert f"{dataset}_{kind}.png" in html
    assert "results.csv" in html and "BEST oracle" in html
    assert "dilemmas_readings_finetune.png" in html and "sampling floor" in html


def test_step_scripts_do_not_shadow_packages():
    """``python workflow/scripts/x.py`` puts its folder first on sys.path: x must not be an installed module."""
    import importlib.util

    for script in (ROOT / "workflow/scripts").glob("*.py"):
        assert importlib.util.find_spec(script.stem) is None, f"{script.name} shadows the installed '{script.stem}'"
