rule build_model:
    input:
        archives=expand(RAW, archive=["anecdotes", "dilemmas"]),
        code=lib("tinymodels"),
    output:
        directory(BASE_MODEL),
    params:
        settings=lambda wildcards: section(f"models.{wildcards.model}"),
    log:
        LOGS.format(step="build_model") + "/{model}.log",
    shell:
        "python workflow/scripts/build_model.py --config {CONFIG_ARG} --model {wildcards.model}"
        " --archives {input.archives} --out {output} --log {log}"


rule finetune:
    input:
        data=rules.prepare.output.splits,
        base=base_model_input,
        code=lib("training", "prompts", "modeling", "extraction"),
    output:
        directory(ADAPTER),
    params:
        settings=lambda wildcards: section(
            "finetune", f"recipes.{wildcards.recipe}", f"prompts.{wildcards.dataset}", f"models.{wildcards.model}"
        ),
        data_dir=lambda wildcards, input: os.path.dirname(input.data[0]),
        base=base_arg,
    resources:
        gpu=gpus("finetune"),
    threads: 1
    log:
        LOGS.format(step="finetune") + "/{dataset}/{model}/{recipe}.log",
    shell:
        "python workflow/scripts/finetune.py --config {CONFIG_ARG} --model {wildcards.model}"
        " --dataset {wildcards.dataset} --recipe {wildcards.recipe} --data-dir {params.data_dir} {params.base}"
        " --out {output} --threads {threads} --log {log}"
