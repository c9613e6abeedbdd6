rule download:
    output:
        archive=RAW,
        sha256=f"{RAW}.sha256",
    params:
        config=CONFIG_ARG,
        settings=section("data"),
    log:
        f"logs/download/{RUN}/{{archive}}.log",
    shell:
        "python workflow/scripts/download.py --config {params.config} --archive {wildcards.archive}"
        " --out {output.archive} --log {log}"


rule prepare:
    input:
        archive=archive_of,
        code=lib("data"),
    output:
        splits=expand(f"{PROCESSED}/{{split}}.parquet", split=SPLITS, allow_missing=True),
        stats=f"{PROCESSED}/stats.json",
    params:
        config=CONFIG_ARG,
        raw_dir=lambda wildcards, input: os.path.dirname(input.archive),
        out_dir=lambda wildcards, output: os.path.dirname(output.stats),
    log:
        f"logs/prepare/{RUN}/{{dataset}}.log",
    shell:
        "python workflow/scripts/prepare.py --config {params.config} --dataset {wildcards.dataset}"
        " --raw-dir {params.raw_dir} --out-dir {params.out_dir} --log {log}"
