# GENERATED from the stage table (src/moralign/pipeline/table.py): do not edit by hand; regenerate with
#   python -m moralign.pipeline rules
# {run} is the run's name (data/<run>, results/<run>, ...); the other wildcards are a stage's cells. The helpers
# (code_of, listed, with_values, params_of, ...) are in common.smk.


# run on the submitting machine (they need the network), never on a cluster node


localrules:
    fetch_model,


rule build_model:
    input:
        archives=listed("build_model", "archives"),
        code=code_of("build_model"),
    output:
        model=directory("models/{run}/base/{model}"),
    log:
        "logs/build_model/{run}/{model}.log",
    params:
        **params_of("build_model"),
    wildcard_constraints:
        **constraints_of("build_model"),
    shell:
        "python workflow/scripts/fetch_model.py --config {params.config} --sections {params.sections}"
        " --model {wildcards.model} --archives {input.archives} --out {output.model} --log {log}"


rule fetch_model:
    input:
        code=code_of("fetch_model"),
    output:
        model=directory("models/{run}/base/{model}"),
    log:
        "logs/fetch_model/{run}/{model}.log",
    params:
        **params_of("fetch_model"),
    wildcard_constraints:
        **constraints_of("fetch_model"),
    shell:
        "python workflow/scripts/fetch_model.py --config {params.config} --sections {params.sections}"
        " --model {wildcards.model} --out {output.model} --log {log}"


rule finetune:
    input:
        data="data/{run}/processed/{dataset}",
        base="models/{run}/base/{model}",
        code=code_of("finetune"),
    output:
        adapter=directory("models/{run}/adapters/{dataset}/{model}/{recipe}/seed-{seed}"),
    log:
        "logs/finetune/{run}/{dataset}/{model}/{recipe}/{seed}.log",
    params:
        **params_of("finetune"),
    wildcard_constraints:
        **constraints_of("finetune"),
    threads: threads_of("finetune")
    resources:
        gpu=gpus_of("finetune"),
    shell:
        "python workflow/scripts/finetune.py --config {params.config} --sections {params.sections}"
        " --model {wildcards.model} --dataset {wildcards.dataset} --recipe {wildcards.recipe} --seed {wildcards.seed}"
        " --data-dir {input.data} --base {input.base} --out {output.adapter} --log {log}"


rule train_encoder:
    input:
        data="data/{run}/processed/{dataset}",
        base="models/{run}/base/{model}",
        code=code_of("train_encoder"),
    output:
        encoder=directory("models/{run}/encoders/{dataset}/{model}/seed-{seed}"),
    log:
        "logs/train_encoder/{run}/{dataset}/{model}/{seed}.log",
    params:
        **params_of("train_encoder"),
    wildcard_constraints:
        **constraints_of("train_encoder"),
    threads: threads_of("train_encoder")
    resources:
        gpu=gpus_of("train_encoder"),
    shell:
        "python workflow/scripts/train_encoder.py --config {params.config} --sections {params.sections}"
        " --model {wildcards.model} --dataset {wildcards.dataset} --seed {wildcards.seed} --data-dir {input.data}"
        " --base {input.base} --out {output.encoder} --log {log}"
