# GENERATED from the stage table (src/moralign/pipeline/table.py): do not edit by hand; regenerate with
#   python -m moralign.pipeline rules
# {run} is the run's name (data/<run>, results/<run>, ...); the other wildcards are a stage's cells. The helpers
# (code_of, listed, with_values, params_of, ...) are in common.smk.


rule summarise:
    input:
        scores=listed("summarise", "scores"),
        per_item=listed("summarise", "per_item"),
        references=listed("summarise", "references"),
        code=code_of("summarise"),
    output:
        csv=report("reports/{run}/results.csv", caption="../report/results.rst", category="Results table", labels={"table": "long form (CSV)"}),
        md="reports/{run}/results.md",
        tex="reports/{run}/results.tex",
        differences=report("reports/{run}/differences.csv", caption="../report/differences_table.rst", category="Results table", labels={"table": "fine-tuned minus base (CSV)"}),
        metrics="reports/{run}/metrics.json",
        censoring="reports/{run}/censoring.md",
    log:
        "logs/summarise/{run}/summarise.log",
    params:
        **params_of("summarise"),
    wildcard_constraints:
        **constraints_of("summarise"),
    shell:
        "python workflow/scripts/summarise.py --config {params.config} --sections {params.sections}"
        " --scores {input.scores} {input.references} --out-dir {params.reports} --log {log}"


rule plot:
    input:
        results="reports/{run}/results.csv",
        differences="reports/{run}/differences.csv",
        data="data/{run}/processed/{dataset}",
        predictions=listed("plot", "predictions"),
        code=code_of("plot"),
    output:
        png=report(["reports/{run}/figures/{dataset}_xentropy_bars.png", "reports/{run}/figures/{dataset}_dirichlet_bars.png", "reports/{run}/figures/{dataset}_reliability.png", "reports/{run}/figures/{dataset}_scatter.png", "reports/{run}/figures/{dataset}_coverage.png", "reports/{run}/figures/{dataset}_differences.png"], caption="../report/figures.rst", category="Figures", subcategory="{dataset}"),
        pdf=["reports/{run}/figures/{dataset}_xentropy_bars.pdf", "reports/{run}/figures/{dataset}_dirichlet_bars.pdf", "reports/{run}/figures/{dataset}_reliability.pdf", "reports/{run}/figures/{dataset}_scatter.pdf", "reports/{run}/figures/{dataset}_coverage.pdf", "reports/{run}/figures/{dataset}_differences.pdf"],
    log:
        "logs/plot/{run}/{dataset}.log",
    params:
        **params_of("plot"),
    wildcard_constraints:
        **constraints_of("plot"),
    shell:
        "python workflow/scripts/plot.py --config {params.config} --sections {params.sections}"
        " --dataset {wildcards.dataset} --report-dir {params.reports} --data-dir {input.data}"
        " --predictions {input.predictions} --out-dir {params.figures} --log {log}"
