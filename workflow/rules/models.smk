# Hub models are downloaded once, on the submitting machine (compute nodes often have no network).
localrules:
    fetch_model,


rule fetch_model:
    input:
        unpack(inputs("fetch_model")),
    output:
        **outputs("fetch_model"),
    params:
        **params("fetch_model"),
    wildcard_constraints:
        **constraints("fetch_model"),
    log:
        log_of("fetch_model"),
    shell:
        shell_of("fetch_model")


rule build_model:
    input:
        unpack(inputs("build_model")),
    output:
        **outputs("build_model"),
    params:
        **params("build_model"),
    wildcard_constraints:
        **constraints("build_model"),
    log:
        log_of("build_model"),
    shell:
        shell_of("build_model")


rule finetune:
    input:
        unpack(inputs("finetune")),
    output:
        **outputs("finetune"),
    params:
        **params("finetune"),
    wildcard_constraints:
        **constraints("finetune"),
    threads: threads_of("finetune")
    resources:
        gpu=gpus("finetune"),
    log:
        log_of("finetune"),
    shell:
        shell_of("finetune")


rule train_encoder:
    input:
        unpack(inputs("train_encoder")),
    output:
        **outputs("train_encoder"),
    params:
        **params("train_encoder"),
    wildcard_constraints:
        **constraints("train_encoder"),
    threads: threads_of("train_encoder")
    resources:
        gpu=gpus("train_encoder"),
    log:
        log_of("train_encoder"),
    shell:
        shell_of("train_encoder")
