rule download:
    output:
        archive=RAW,
        sha256=RAW + ".sha256",
    params:
        settings=section("data"),
    log:
        LOGS.format(step="download") + "/{archive}.log",
    shell:
        "python workflow/scripts/download.py --config {CONFIG_ARG} --archive {wildcards.archive}"
        " --out {output.archive} --log {log}"


rule prepare:
    input:
        archive=archive_of,
        code=lib("data"),
    output:
        splits=expand(PROCESSED + "/{split}.parquet", split=SPLITS, allow_missing=True),
        stats=PROCESSED + "/stats.json",
    params:
        raw_dir=lambda wildcards, input: os.path.dirname(input.archive),
        out_dir=lambda wildcards, output: os.path.dirname(output.stats),
    log:
        LOGS.format(step="prepare") + "/{dataset}.log",
    shell:
        "python workflow/scripts/prepare.py --config {CONFIG_ARG} --dataset {wildcards.dataset}"
        " --raw-dir {params.raw_dir} --out-dir {params.out_dir} --log {log}"
