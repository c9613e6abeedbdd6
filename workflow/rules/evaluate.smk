rule extract:
    input:
        data=rules.prepare.output.splits,
        base=BASE_MODEL,
        adapter=adapter_input,
        code=lib("extraction", "prompts", "modeling"),
    output:
        predictions=expand(f"{PREDICTIONS}/{{split}}.parquet", split=CFG["extract"]["splits"], allow_missing=True),
        summary=f"{PREDICTIONS}/summary.json",
    params:
        config=CONFIG_ARG,
        settings=lambda wildcards: section("extract", f"prompts.{wildcards.dataset}", f"models.{wildcards.model}"),
        data_dir=lambda wildcards, input: os.path.dirname(input.data[0]),
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
        adapter=adapter_arg,
    resources:
        gpu=gpus("extract"),
    threads: 1
    log:
        f"logs/extract/{RUN}/{{dataset}}/{{model}}/{{condition}}.log",
    shell:
        "python workflow/scripts/extract.py --config {params.config} --model {wildcards.model}"
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
        config=CONFIG_ARG,
        settings=section("score", "experiment.eval_split"),
        data_dir=lambda wildcards, input: os.path.dirname(input.data[0]),
        predictions=lambda wildcards, input: os.path.dirname(input.predictions),
        baseline=lambda wildcards, input: f"--baseline {os.path.dirname(input.baseline[0])}" if input.baseline else "",
    log:
        f"logs/score/{RUN}/{{dataset}}/{{model}}/{{condition}}.log",
    shell:
        "python workflow/scripts/score.py --config {params.config} --dataset {wildcards.dataset}"
        " --condition {wildcards.condition} --data-dir {params.data_dir} --predictions {params.predictions}"
        " {params.baseline} --out {output.scores} --log {log}"


rule references:
    input:
        data=rules.prepare.output.splits,
        code=lib("references", "metrics"),
    output:
        REFERENCES,
    params:
        config=CONFIG_ARG,
        settings=section("score", "experiment.eval_split"),
        data_dir=lambda wildcards, input: os.path.dirname(input.data[0]),
    log:
        f"logs/references/{RUN}/{{dataset}}.log",
    shell:
        "python workflow/scripts/references.py --config {params.config} --dataset {wildcards.dataset}"
        " --data-dir {params.data_dir} --out {output} --log {log}"
