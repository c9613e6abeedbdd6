# GENERATED from the stage table (src/moralign/pipeline/table.py): do not edit by hand; regenerate with
#   python -m moralign.pipeline rules
# {run} is the run's name (data/<run>, results/<run>, ...); the other wildcards are a stage's cells. The helpers
# (code_of, listed, with_values, params_of, ...) are in common.smk.


rule extract_base:
    input:
        data="data/{run}/processed/{dataset}",
        base="models/{run}/base/{model}",
        code=code_of("extract_base"),
    output:
        predictions=directory("results/{run}/predictions/{dataset}/{model}/{condition}"),
    log:
        "logs/extract_base/{run}/{dataset}/{model}/{condition}.log",
    params:
        **params_of("extract_base"),
    wildcard_constraints:
        **constraints_of("extract_base"),
    threads: threads_of("extract_base")
    resources:
        gpu=gpus_of("extract_base"),
    shell:
        "python workflow/scripts/extract.py --config {params.config} --sections {params.sections}"
        " --model {wildcards.model} --dataset {wildcards.dataset} --condition {wildcards.condition}"
        " --data-dir {input.data} --base {input.base} --out-dir {output.predictions} --log {log}"


rule extract_api:
    input:
        data="data/{run}/processed/{dataset}",
        code=code_of("extract_api"),
    output:
        predictions=directory("results/{run}/predictions/{dataset}/{model}/{condition}"),
    log:
        "logs/extract_api/{run}/{dataset}/{model}/{condition}.log",
    params:
        **params_of("extract_api"),
    wildcard_constraints:
        **constraints_of("extract_api"),
    resources:
        openai_api=1,
    shell:
        "python workflow/scripts/extract.py --config {params.config} --sections {params.sections}"
        " --model {wildcards.model} --dataset {wildcards.dataset} --condition {wildcards.condition}"
        " --data-dir {input.data} --cache-dir {params.cache} --out-dir {output.predictions} --log {log}"


rule extract_tuned:
    input:
        data="data/{run}/processed/{dataset}",
        base="models/{run}/base/{model}",
        adapter="models/{run}/adapters/{dataset}/{model}/{recipe}/seed-{seed}",
        code=code_of("extract_tuned"),
    output:
        predictions=directory("results/{run}/predictions/{dataset}/{model}/{recipe}/seed-{seed}"),
    log:
        "logs/extract_tuned/{run}/{dataset}/{model}/{recipe}/{seed}.log",
    params:
        **params_of("extract_tuned"),
    wildcard_constraints:
        **constraints_of("extract_tuned"),
    threads: threads_of("extract_tuned")
    resources:
        gpu=gpus_of("extract_tuned"),
    shell:
        "python workflow/scripts/extract.py --config {params.config} --sections {params.sections}"
        " --model {wildcards.model} --dataset {wildcards.dataset} --condition {wildcards.recipe}"
        " --data-dir {input.data} --base {input.base} --adapter {input.adapter} --base-quantization {params.quantization}"
        " --out-dir {output.predictions} --log {log}"


rule extract_trained:
    input:
        data="data/{run}/processed/{dataset}",
        base="models/{run}/base/{model}",
        encoder="models/{run}/encoders/{dataset}/{model}/seed-{seed}",
        code=code_of("extract_trained"),
    output:
        predictions=directory("results/{run}/predictions/{dataset}/{model}/trained/seed-{seed}"),
    log:
        "logs/extract_trained/{run}/{dataset}/{model}/{seed}.log",
    params:
        **params_of("extract_trained"),
    wildcard_constraints:
        **constraints_of("extract_trained"),
    threads: threads_of("extract_trained")
    resources:
        gpu=gpus_of("extract_trained"),
    shell:
        "python workflow/scripts/extract.py --config {params.config} --sections {params.sections}"
        " --model {wildcards.model} --dataset {wildcards.dataset} --condition trained --data-dir {input.data}"
        " --base {input.base} --adapter {input.encoder} --out-dir {output.predictions} --log {log}"


rule read_base:
    input:
        data="data/{run}/processed/{dataset}",
        base="models/{run}/base/{model}",
        code=code_of("read_base"),
    output:
        readings=directory("results/{run}/readings/{dataset}/{model}/{condition}"),
    log:
        "logs/read_base/{run}/{dataset}/{model}/{condition}.log",
    params:
        **params_of("read_base"),
    wildcard_constraints:
        **constraints_of("read_base"),
    threads: threads_of("read_base")
    resources:
        gpu=gpus_of("read_base"),
    shell:
        "python workflow/scripts/read.py --config {params.config} --sections {params.sections}"
        " --model {wildcards.model} --dataset {wildcards.dataset} --condition {wildcards.condition}"
        " --data-dir {input.data} --base {input.base} --cache-dir {params.cache} --out-dir {output.readings}"
        " --log {log}"


rule read_api:
    input:
        data="data/{run}/processed/{dataset}",
        code=code_of("read_api"),
    output:
        readings=directory("results/{run}/readings/{dataset}/{model}/{condition}"),
    log:
        "logs/read_api/{run}/{dataset}/{model}/{condition}.log",
    params:
        **params_of("read_api"),
    wildcard_constraints:
        **constraints_of("read_api"),
    resources:
        openai_api=1,
    shell:
        "python workflow/scripts/read.py --config {params.config} --sections {params.sections}"
        " --model {wildcards.model} --dataset {wildcards.dataset} --condition {wildcards.condition}"
        " --data-dir {input.data} --cache-dir {params.cache} --out-dir {output.readings} --log {log}"


rule read_tuned:
    input:
        data="data/{run}/processed/{dataset}",
        base="models/{run}/base/{model}",
        adapter="models/{run}/adapters/{dataset}/{model}/{recipe}/seed-{seed}",
        code=code_of("read_tuned"),
    output:
        readings=directory("results/{run}/readings/{dataset}/{model}/{recipe}/seed-{seed}"),
    log:
        "logs/read_tuned/{run}/{dataset}/{model}/{recipe}/{seed}.log",
    params:
        **params_of("read_tuned"),
    wildcard_constraints:
        **constraints_of("read_tuned"),
    threads: threads_of("read_tuned")
    resources:
        gpu=gpus_of("read_tuned"),
    shell:
        "python workflow/scripts/read.py --config {params.config} --sections {params.sections}"
        " --model {wildcards.model} --dataset {wildcards.dataset} --condition {wildcards.recipe}"
        " --data-dir {input.data} --base {input.base} --adapter {input.adapter} --base-quantization {params.quantization}"
        " --cache-dir {params.cache} --out-dir {output.readings} --log {log}"


rule score_base:
    input:
        data="data/{run}/processed/{dataset}",
        predictions="results/{run}/predictions/{dataset}/{model}/{condition}",
        code=code_of("score_base"),
    output:
        scores="results/{run}/scores/{dataset}/{model}/{condition}.json",
        per_item="results/{run}/scores/{dataset}/{model}/{condition}.items.parquet",
    log:
        "logs/score_base/{run}/{dataset}/{model}/{condition}.log",
    params:
        **params_of("score_base"),
    wildcard_constraints:
        **constraints_of("score_base"),
    shell:
        "python workflow/scripts/score.py --config {params.config} --sections {params.sections}"
        " --dataset {wildcards.dataset} --condition {wildcards.condition} --data-dir {input.data}"
        " --predictions {input.predictions} --out {output.scores} --items {output.per_item} --log {log}"


rule score_tuned:
    input:
        data="data/{run}/processed/{dataset}",
        predictions="results/{run}/predictions/{dataset}/{model}/{recipe}/seed-{seed}",
        baseline=with_values("score_tuned", "results/{run}/predictions/{dataset}/{model}/{baseline}"),
        code=code_of("score_tuned"),
    output:
        scores="results/{run}/scores/{dataset}/{model}/{recipe}/seed-{seed}.json",
        per_item="results/{run}/scores/{dataset}/{model}/{recipe}/seed-{seed}.items.parquet",
    log:
        "logs/score_tuned/{run}/{dataset}/{model}/{recipe}/{seed}.log",
    params:
        **params_of("score_tuned"),
    wildcard_constraints:
        **constraints_of("score_tuned"),
    shell:
        "python workflow/scripts/score.py --config {params.config} --sections {params.sections}"
        " --dataset {wildcards.dataset} --condition {wildcards.recipe} --seed {wildcards.seed}"
        " --data-dir {input.data} --predictions {input.predictions} --baseline {input.baseline}"
        " --out {output.scores} --items {output.per_item} --log {log}"


rule score_trained:
    input:
        data="data/{run}/processed/{dataset}",
        predictions="results/{run}/predictions/{dataset}/{model}/trained/seed-{seed}",
        code=code_of("score_trained"),
    output:
        scores="results/{run}/scores/{dataset}/{model}/trained/seed-{seed}.json",
        per_item="results/{run}/scores/{dataset}/{model}/trained/seed-{seed}.items.parquet",
    log:
        "logs/score_trained/{run}/{dataset}/{model}/{seed}.log",
    params:
        **params_of("score_trained"),
    wildcard_constraints:
        **constraints_of("score_trained"),
    shell:
        "python workflow/scripts/score.py --config {params.config} --sections {params.sections}"
        " --dataset {wildcards.dataset} --condition trained --data-dir {input.data} --predictions {input.predictions}"
        " --out {output.scores} --items {output.per_item} --seed {wildcards.seed} --log {log}"


rule references:
    input:
        data="data/{run}/processed/{dataset}",
        code=code_of("references"),
    output:
        references="results/{run}/scores/{dataset}/references.json",
    log:
        "logs/references/{run}/{dataset}.log",
    params:
        **params_of("references"),
    wildcard_constraints:
        **constraints_of("references"),
    shell:
        "python workflow/scripts/references.py --config {params.config} --sections {params.sections}"
        " --dataset {wildcards.dataset} --data-dir {input.data} --out {output.references} --log {log}"
