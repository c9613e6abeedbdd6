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
        tex=f"{REPORTS}/results.tex",
        metrics=f"{REPORTS}/metrics.json",
    params:
        out_dir=REPORTS,
    log:
        LOGS.format(step="summarise") + "/summarise.log",
    shell:
        "python workflow/scripts/summarise.py --config {CONFIG_ARG} --scores {input.scores} {input.references}"
        " --out-dir {params.out_dir} --log {log}"


rule plot:
    input:
        results=rules.summarise.output.csv,
        data=rules.prepare.output.splits,
        predictions=lambda wildcards: [
            PREDICTIONS.format(dataset=wildcards.dataset, model=m, condition=c) + "/summary.json"
            for m in CFG.models
            for c in CFG.conditions
        ],
        code=lib("reporting"),
    output:
        bars=report(
            expand(
                f"{REPORTS}/figures/{{dataset}}_{{metric}}_bars.png",
                metric=["xentropy", "dirichlet"],
                allow_missing=True,
            ),
            caption="../report/bars.rst",
            category="Figures",
            subcategory="{dataset}",
        ),
        reliability=report(
            f"{REPORTS}/figures/{{dataset}}_reliability.png",
            caption="../report/reliability.rst",
            category="Figures",
            subcategory="{dataset}",
        ),
        pdf=expand(
            f"{REPORTS}/figures/{{dataset}}_{{kind}}.pdf",
            kind=["xentropy_bars", "dirichlet_bars", "reliability"],
            allow_missing=True,
        ),
    params:
        data_dir=lambda wildcards, input: os.path.dirname(input.data[0]),
        predictions=lambda wildcards, input: [os.path.dirname(p) for p in input.predictions],
        out_dir=f"{REPORTS}/figures",
    log:
        LOGS.format(step="plot") + "/{dataset}.log",
    shell:
        "python workflow/scripts/plot.py --config {CONFIG_ARG} --dataset {wildcards.dataset}"
        " --results {input.results} --data-dir {params.data_dir} --predictions {params.predictions}"
        " --out-dir {params.out_dir} --log {log}"
