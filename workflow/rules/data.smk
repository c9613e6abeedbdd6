# GENERATED from the stage table (src/moralign/pipeline/table.py): do not edit by hand; regenerate with
#   python -m moralign.pipeline rules
# {run} is the run's name (data/<run>, results/<run>, ...); the other wildcards are a stage's cells. The helpers
# (code_of, listed, with_values, params_of, ...) are in common.smk.


rule download:
    input:
        code=code_of("download"),
    output:
        archive="data/{run}/raw/{archive}.tar.gz",
        sha256="data/{run}/raw/{archive}.tar.gz.sha256",
    log:
        "logs/download/{run}/{archive}.log",
    params:
        **params_of("download"),
    wildcard_constraints:
        **constraints_of("download"),
    shell:
        "python workflow/scripts/download.py --config {params.config} --sections {params.sections}"
        " --archive {wildcards.archive} --out {output.archive} --log {log}"


rule prepare:
    input:
        archive=with_values("prepare", "data/{run}/raw/{archive}.tar.gz"),
        code=code_of("prepare"),
    output:
        data=directory("data/{run}/processed/{dataset}"),
    log:
        "logs/prepare/{run}/{dataset}.log",
    params:
        **params_of("prepare"),
    wildcard_constraints:
        **constraints_of("prepare"),
    shell:
        "python workflow/scripts/prepare.py --config {params.config} --sections {params.sections}"
        " --dataset {wildcards.dataset} --archive {input.archive} --out-dir {output.data} --log {log}"
