rule download:
    input:
        unpack(inputs("download")),
    output:
        **outputs("download"),
    params:
        **params("download"),
    wildcard_constraints:
        **constraints("download"),
    log:
        log_of("download"),
    shell:
        shell_of("download")


rule prepare:
    input:
        unpack(inputs("prepare")),
    output:
        **outputs("prepare"),
    params:
        **params("prepare"),
    wildcard_constraints:
        **constraints("prepare"),
    log:
        log_of("prepare"),
    shell:
        shell_of("prepare")
