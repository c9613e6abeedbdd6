rule summarise:
    input:
        scores=score_files(),
        references=reference_files(),
        code=lib("reporting"),
    output:
        csv=report(
            f"{REPORTS}/results.csv",
            caption="../report/results.rst",
            category="Results table",
            labels={"table": "long form (CSV)"},
        ),
        md=f"{REPORTS}/results.md",
        differences=report(
            f"{REPORTS}/differences.csv",
            caption="../report/differences_table.rst",
            category="Results table",
            labels={"table": "fine-tuned minus base (CSV)"},
        ),
        tex=f"{REPORTS}/results.tex",
        metrics=f"{REPORTS}/metrics.json",
    params:
        config=CONFIG_ARG,
        out_dir=lambda wildcards, output: os.path.dirname(output.csv),
    log:
        f"logs/summarise/{RUN}/summarise.log",
    shell:
        "python workflow/scripts/summarise.py --config {params.config} --scores {input.scores} {input.references}"
        " --out-dir {params.out_dir} --log {log}"


rule plot:
    input:
        results=rules.summarise.output.csv,
        differences=rules.summarise.output.differences,
        data=rules.prepare.output.splits,
        predictions=lambda wildcards: [
            f"{PREDICTIONS.format(dataset=wildcards.dataset, model=m, condition=c)}/summary.json"
            for m in CFG.models
            for c in CFG.conditions
        ],
        code=lib("reporting"),
    output:
        figures=report(
            expand(f"{REPORTS}/figures/{{dataset}}_{{kind}}.png", kind=FIGURES, allow_missing=True),
            caption="../report/figures.rst",
            category="Figures",
            subcategory="{dataset}",
        ),
        pdf=expand(f"{REPORTS}/figures/{{dataset}}_{{kind}}.pdf", kind=FIGURES, allow_missing=True),
    params:
        config=CONFIG_ARG,
        report_dir=lambda wildcards, input: os.path.dirname(input.results),
        data_dir=lambda wildcards, input: os.path.dirname(input.data[0]),
        predictions=lambda wildcards, input: [os.path.dirname(p) for p in input.predictions],
        out_dir=lambda wildcards, output: os.path.dirname(output.figures[0]),
    log:
        f"logs/plot/{RUN}/{{dataset}}.log",
    shell:
        "python workflow/scripts/plot.py --config {params.config} --dataset {wildcards.dataset}"
        " --report-dir {params.report_dir} --data-dir {params.data_dir} --predictions {params.predictions}"
        " --out-dir {params.out_dir} --log {log}"
