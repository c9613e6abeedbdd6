rule extract:
    input:
        data=rules.prepare.output.splits,
        base=BASE_MODEL,
        adapter=adapter_input,
        code=lib("extraction", "prompts", "modeling"),
    output:
        predictions=expand(PREDICTIONS + "/{split}.parquet", split=CFG["extract"]["splits"], allow_missing=True),
        summary=PREDICTIONS + "/summary.json",
    params:
        settings=lambda wildcards: section("extract", f"prompts.{wildcards.dataset}", f"models.{wildcards.model}"),
        data_dir=lambda wildcards, input: os.path.dirname(input.data[0]),
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
        adapter=adapter_arg,
    resources:
        gpu=gpus("extract"),
    threads: 1
    log:
        LOGS.format(step="extract") + "/{dataset}/{model}/{condition}.log",
    shell:
        "python workflow/scripts/extract.py --config {CONFIG_ARG} --model {wildcards.model}"
        " --dataset {wildcards.dataset} --condition {wildcards.condition} --data-dir {params.data_dir}"
        " --base {input.base} {params.adapter} --out-dir {params.out_dir} --threads {threads} --log {log}"


rule score:
    input:
        data=rules.prepare.output.splits,
        predictions=rules.extract.output.summary,
        baseline=lambda wildcards: [f"{d}/summary.json" for d in [baseline_input(wildcards)] if d],
        code=lib("metrics"),
    output:
        scores=SCORES,
        per_item=SCORES.replace(".json", ".items.parquet"),
    params:
        settings=section("score", "experiment.eval_split"),
        data_dir=lambda wildcards, input: os.path.dirname(input.data[0]),
        predictions=lambda wildcards, input: os.path.dirname(input.predictions),
        baseline=lambda wildcards, input: f"--baseline {os.path.dirname(input.baseline[0])}" if input.baseline else "",
    log:
        LOGS.format(step="score") + "/{dataset}/{model}/{condition}.log",
    shell:
        "python workflow/scripts/score.py --config {CONFIG_ARG} --dataset {wildcards.dataset}"
        " --condition {wildcards.condition} --data-dir {params.data_dir} --predictions {params.predictions}"
        " {params.baseline} --out {output.scores} --log {log}"


rule references:
    input:
        data=rules.prepare.output.splits,
        code=lib("references", "metrics"),
    output:
        REFERENCES,
    params:
        settings=section("score", "experiment.eval_split"),
        data_dir=lambda wildcards, input: os.path.dirname(input.data[0]),
    log:
        LOGS.format(step="references") + "/{dataset}.log",
    shell:
        "python workflow/scripts/references.py --config {CONFIG_ARG} --dataset {wildcards.dataset}"
        " --data-dir {params.data_dir} --out {output} --log {log}"
