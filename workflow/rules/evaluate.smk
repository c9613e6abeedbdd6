rule extract_base:
    input:
        unpack(inputs("extract_base")),
    output:
        **outputs("extract_base"),
    params:
        **params("extract_base"),
    wildcard_constraints:
        **constraints("extract_base"),
    threads: threads_of("extract_base")
    resources:
        gpu=gpus("extract_base"),
    log:
        log_of("extract_base"),
    shell:
        shell_of("extract_base")


rule extract_tuned:
    input:
        unpack(inputs("extract_tuned")),
    output:
        **outputs("extract_tuned"),
    params:
        **params("extract_tuned"),
    wildcard_constraints:
        **constraints("extract_tuned"),
    threads: threads_of("extract_tuned")
    resources:
        gpu=gpus("extract_tuned"),
    log:
        log_of("extract_tuned"),
    shell:
        shell_of("extract_tuned")


rule extract_trained:
    input:
        unpack(inputs("extract_trained")),
    output:
        **outputs("extract_trained"),
    params:
        **params("extract_trained"),
    wildcard_constraints:
        **constraints("extract_trained"),
    threads: threads_of("extract_trained")
    resources:
        gpu=gpus("extract_trained"),
    log:
        log_of("extract_trained"),
    shell:
        shell_of("extract_trained")


rule extract_api:
    input:
        unpack(inputs("extract_api")),
    output:
        **outputs("extract_api"),
    params:
        **params("extract_api"),
    wildcard_constraints:
        **constraints("extract_api"),
    resources:
        **resources_of("extract_api"),
    log:
        log_of("extract_api"),
    shell:
        shell_of("extract_api")


rule score_base:
    input:
        unpack(inputs("score_base")),
    output:
        **outputs("score_base"),
    params:
        **params("score_base"),
    wildcard_constraints:
        **constraints("score_base"),
    log:
        log_of("score_base"),
    shell:
        shell_of("score_base")


rule score_tuned:
    input:
        unpack(inputs("score_tuned")),
    output:
        **outputs("score_tuned"),
    params:
        **params("score_tuned"),
    wildcard_constraints:
        **constraints("score_tuned"),
    log:
        log_of("score_tuned"),
    shell:
        shell_of("score_tuned")


rule score_trained:
    input:
        unpack(inputs("score_trained")),
    output:
        **outputs("score_trained"),
    params:
        **params("score_trained"),
    wildcard_constraints:
        **constraints("score_trained"),
    log:
        log_of("score_trained"),
    shell:
        shell_of("score_trained")


rule references:
    input:
        unpack(inputs("references")),
    output:
        **outputs("references"),
    params:
        **params("references"),
    wildcard_constraints:
        **constraints("references"),
    log:
        log_of("references"),
    shell:
        shell_of("references")
