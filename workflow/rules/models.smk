# Hub models are downloaded once, on the submitting machine (compute nodes often have no network).
localrules:
    fetch_model,


rule fetch_model:
    input:
        archives=sample_text_input,
        code=lib("tinymodels"),
    output:
        directory(BASE_MODEL),
    params:
        config=CONFIG_ARG,
        settings=lambda wildcards: section(f"models.{wildcards.model}"),
    log:
        f"logs/fetch_model/{RUN}/{{model}}.log",
    shell:
        "python workflow/scripts/fetch_model.py --config {params.config} --model {wildcards.model}"
        " --archives {input.archives} --out {output} --log {log}"


rule finetune:
    input:
        data=rules.prepare.output.splits,
        base=BASE_MODEL,
        code=lib("training", "prompts", "modeling", "extraction"),
    output:
        directory(ADAPTER),
    params:
        config=CONFIG_ARG,
        settings=lambda wildcards: section(
            "finetune", f"recipes.{wildcards.recipe}", f"prompts.{wildcards.dataset}", f"models.{wildcards.model}"
        ),
        data_dir=lambda wildcards, input: os.path.dirname(input.data[0]),
    resources:
        gpu=gpus("finetune"),
    threads: 1
    log:
        f"logs/finetune/{RUN}/{{dataset}}/{{model}}/{{recipe}}.log",
    shell:
        "python workflow/scripts/finetune.py --config {params.config} --model {wildcards.model}"
        " --dataset {wildcards.dataset} --recipe {wildcards.recipe} --data-dir {params.data_dir} --base {input.base}"
        " --out {output} --threads {threads} --log {log}"
