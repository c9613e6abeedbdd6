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


rule summarise_readings:
    input:
        data="data/{run}/processed/{dataset}",
        predictions=listed("summarise_readings", "predictions"),
        readings=listed("summarise_readings", "readings"),
        code=code_of("summarise_readings"),
    output:
        csv=report("reports/{run}/readings/{dataset}.csv", caption="../report/readings.rst", category="Readings", subcategory="{dataset}"),
        md="reports/{run}/readings/{dataset}.md",
        differences="reports/{run}/readings/{dataset}.differences.csv",
        png=report(["reports/{run}/figures/{dataset}_readings_tv.png", "reports/{run}/figures/{dataset}_readings_items.png", "reports/{run}/figures/{dataset}_readings_finetune.png"], caption="../report/readings.rst", category="Readings", subcategory="{dataset}"),
        pdf=["reports/{run}/figures/{dataset}_readings_tv.pdf", "reports/{run}/figures/{dataset}_readings_items.pdf", "reports/{run}/figures/{dataset}_readings_finetune.pdf"],
    log:
        "logs/summarise_readings/{run}/{dataset}.log",
    params:
        **params_of("summarise_readings"),
    wildcard_constraints:
        **constraints_of("summarise_readings"),
    shell:
        "python workflow/scripts/summarise_readings.py --config {params.config} --sections {params.sections}"
        " --dataset {wildcards.dataset} --data-dir {input.data} --predictions {input.predictions}"
        " --readings {input.readings} --table {output.csv} --markdown {output.md} --differences {output.differences}"
        " --figures {params.figures} --log {log}"


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
