"""The stage table: every step of the DAG described once, for Snakemake and DVC alike.

Each :class:`Stage` names its step script, its wildcards, the path patterns of its inputs and outputs, the
config sections it reads and the command that runs it. Both front ends are generated from this table
(``python -m moralign.pipeline``): the Snakemake rules in ``workflow/rules/*.smk`` (moralign.pipeline.rules) and
``dvc.yaml`` (moralign.pipeline.dvcfile), both committed, and a test checks each equals its generator's output.

What a step runs is part of what it depends on: every stage declares its step script and every ``moralign``
module the script imports (moralign.pipeline.code), so editing the scoring code re-scores without re-extracting.
Every step also receives the exact list of config sections it declared (``--sections``) and sees only those
(:meth:`moralign.config.Config.restrict`): a step cannot depend on configuration that would not rerun it.

The extract stage of each backend's untrained conditions comes from the backend registry (moralign.backends):
a new backend gets its stage without an edit here.

The path grammar and the instances of each stage (the cells of a run) are in moralign.pipeline.cells; logs go to
``logs/<stage>/<run>/<wildcards...>.log``.
"""

from __future__ import annotations

from collections.abc import Callable

from moralign import backends
from moralign.config import CONDITION_TRAINED, Config
from moralign.data import ARCHIVES, TASKS
from moralign.figures import READING_FIGURES
from moralign.pipeline.cells import (
    ADAPTER,
    BASE_MODEL,
    ENCODER,
    FIGURE,
    ITEM_SCORES,
    PREDICTIONS,
    PROCESSED,
    RAW,
    READINGS,
    REFERENCES,
    REPORTS,
    SCORES,
    Instance,
    archives,
    backend_cells,
    base_cells,
    cell_path,
    encoder_cells,
    figure_paths,
    keys_but_seeds,
    local_models,
    model_instance,
    read_cells,
    read_run_cells,
    read_tuned_cells,
    run_cells,
    tuned_cells,
)
from moralign.pipeline.stage import Stage

TABLE = f"{REPORTS}/results"
# What decides a run's cells (moralign.config.Config.cells): models, recipes, their seeds and base weights
SUMMARY_SECTIONS = ("experiment", "models", "finetune.quantization", "finetune.seeds", "recipes", "encoder.seeds")
SEED_ARG = " --seed {seed}"


def _score_stage(
    name: str, wildcards: tuple[str, ...], instances: Callable[[Config], list[Instance]], cell: str
) -> Stage:
    """A score stage of cells without a paired baseline (the base conditions, an encoder's ``trained`` seeds)."""
    seeded = "seed" in wildcards
    return Stage(
        name=name,
        script="score",
        wildcards=wildcards,
        instances=instances,
        inputs={
            "data": PROCESSED,
            "predictions": cell_path(PREDICTIONS, cell, "{seed}" if seeded else None),
        },
        outputs={
            "scores": cell_path(SCORES, cell, "{seed}" if seeded else None),
            "per_item": cell_path(ITEM_SCORES, cell, "{seed}" if seeded else None),
        },
        sections=("score", "experiment.eval_split"),
        args=(
            f"--dataset {{dataset}} --condition {cell} --data-dir {{input.data}}"
            " --predictions {input.predictions} --out {output.scores} --items {output.per_item}"
            + (SEED_ARG if seeded else "")
        ),
    )


# What every stage that loads one cell's model reads of the configuration besides its own section
CELL_SECTIONS = ("prompts.{dataset}", "{model_section}")
EXTRACT_SECTIONS = ("extract", *CELL_SECTIONS)
# The folder each step that loads a cell's model writes: its output key and results root
CELL_OUTPUTS = {"extract": ("predictions", PREDICTIONS), "read": ("readings", READINGS)}
# What the read steps load and draw with: the model as extract loads it, and the readings' own settings.
READ_SECTIONS = (
    "experiment.readings",
    "experiment.eval_split",
    *(f"extract.{k}" for k in ("device", "dtype", "quantization", "max_length", "threads", "debias")),
    *(f"readings.{k}" for k in ("max_items", "sample", "verbal", "max_rows", "token_budget")),
    *CELL_SECTIONS,
)
CACHE_ARG = " --cache-dir {cache}"


def _cell_stage(
    backend: backends.Backend,
    name: str,
    script: str,
    instances: Callable[[Config], list[Instance]],
    sections: tuple[str, ...],
    *,
    tuned: bool = False,
) -> Stage:
    """A stage that runs ``script`` (extract or read) on one cell's model and writes the cell's folder.

    Untrained conditions get what the backend's registry entry says its stage needs (hf: ``base`` on the weights
    extract.quantization loads, ``base-4bit`` on the 4-bit base QLoRA recipes train on). ``tuned``: every
    fine-tuned cell, its adapter loaded on the base weights it was trained on.
    """
    key, root = CELL_OUTPUTS[script]
    local = tuned or backend.local_weights
    base = tuned or "base" in backend.extract_inputs
    condition, cell = ("{recipe}", cell_path(root, "{recipe}", "{seed}")) if tuned else ("{condition}", None)
    args = f"--model {{model}} --dataset {{dataset}} --condition {condition} --data-dir {{input.data}}"
    args += " --base {input.base}" if base else ""
    args += " --adapter {input.adapter} --base-quantization {quantization}" if tuned else ""
    args += CACHE_ARG if script == "read" or "cache" in backend.extract_inputs else ""
    return Stage(
        name=name,
        script=script,
        wildcards=("dataset", "model", "recipe", "seed") if tuned else ("dataset", "model", "condition"),
        instances=instances,
        inputs={"data": PROCESSED, **({"base": BASE_MODEL} if base else {}), **({"adapter": ADAPTER} if tuned else {})},
        outputs={key: cell or cell_path(root, "{condition}")},
        folders=(key,),
        sections=sections,
        args=args + f" --out-dir {{output.{key}}}",
        device_section="extract" if local else None,
        threads_section="extract" if local else None,
        extra_modules=(backend.module,),
        resources=backend.resources,
    )


STAGES: tuple[Stage, ...] = (
    Stage(
        name="download",
        group="data",
        wildcards=("archive",),
        instances=archives,
        inputs={},
        outputs={"archive": RAW, "sha256": f"{RAW}.sha256"},
        sections=("data.source", "data.sha256.{archive}", "data.sample"),
        args="--archive {archive} --out {output.archive}",
    ),
    Stage(
        name="prepare",
        group="data",
        wildcards=("dataset",),
        instances=lambda cfg: [{"dataset": d, "archive": TASKS[d].archive} for d in cfg.datasets],
        inputs={"archive": RAW},
        outputs={"data": PROCESSED},
        folders=("data",),
        sections=(),
        args="--dataset {dataset} --archive {input.archive} --out-dir {output.data}",
    ),
    Stage(
        name="build_model",
        group="models",
        script="fetch_model",
        wildcards=("model",),
        instances=lambda cfg: [model_instance(m) for m in local_models(cfg) if "build" in cfg.model(m)],
        inputs={"archives": [RAW.format(run="{run}", archive=a) for a in ARCHIVES]},
        outputs={"model": BASE_MODEL},
        folders=("model",),
        sections=("{model_section}",),
        args="--model {model} --archives {input.archives} --out {output.model}",
    ),
    Stage(
        name="fetch_model",
        group="models",
        wildcards=("model",),
        instances=lambda cfg: [model_instance(m) for m in local_models(cfg) if "build" not in cfg.model(m)],
        inputs={},
        outputs={"model": BASE_MODEL},
        folders=("model",),
        sections=("{model_section}",),
        args="--model {model} --out {output.model}",
        local=True,
    ),
    Stage(
        name="finetune",
        group="models",
        wildcards=("dataset", "model", "recipe", "seed"),
        instances=tuned_cells,
        inputs={"data": PROCESSED, "base": BASE_MODEL},
        outputs={"adapter": ADAPTER},
        folders=("adapter",),
        sections=(*keys_but_seeds("finetune"), "recipes.{recipe}", "prompts.{dataset}", "{model_section}"),
        args=(
            "--model {model} --dataset {dataset} --recipe {recipe} --seed {seed} --data-dir {input.data}"
            " --base {input.base} --out {output.adapter}"
        ),
        device_section="finetune",
        threads_section="finetune",
    ),
    Stage(
        name="train_encoder",
        group="models",
        wildcards=("dataset", "model", "seed"),
        instances=encoder_cells,
        inputs={"data": PROCESSED, "base": BASE_MODEL},
        outputs={"encoder": ENCODER},
        folders=("encoder",),
        sections=(*keys_but_seeds("encoder"), "{model_section}"),
        args=(
            "--model {model} --dataset {dataset} --seed {seed} --data-dir {input.data} --base {input.base}"
            " --out {output.encoder}"
        ),
        device_section="encoder",
        threads_section="encoder",
    ),
    *(
        _cell_stage(b, b.extract_stage, "extract", backend_cells(b), EXTRACT_SECTIONS)
        for b in backends.BACKENDS.values()
        if b.extract_stage
    ),
    # on the base weights the adapter was trained on (4-bit for QLoRA: read from the adapter's metadata)
    _cell_stage(backends.BACKENDS["hf"], "extract_tuned", "extract", tuned_cells, EXTRACT_SECTIONS, tuned=True),
    Stage(
        name="extract_trained",
        script="extract",
        wildcards=("dataset", "model", "seed"),
        instances=encoder_cells,
        inputs={"data": PROCESSED, "base": BASE_MODEL, "encoder": ENCODER},
        outputs={"predictions": cell_path(PREDICTIONS, CONDITION_TRAINED, "{seed}")},
        folders=("predictions",),
        # no prompt: the encoder reads the item's text, truncated as in training (recorded in its folder)
        sections=("extract", "{model_section}"),
        args=(
            "--model {model} --dataset {dataset} --condition trained --data-dir {input.data} --base {input.base}"
            " --adapter {input.encoder} --out-dir {output.predictions}"
        ),
        device_section="extract",
        threads_section="extract",
        extra_modules=("moralign.predictors.encoder",),
    ),
    *(
        _cell_stage(b, b.read_stage, "read", read_cells(b), READ_SECTIONS)
        for b in backends.BACKENDS.values()
        if b.read_stage
    ),
    _cell_stage(backends.BACKENDS["hf"], "read_tuned", "read", read_tuned_cells, READ_SECTIONS, tuned=True),
    _score_stage("score_base", ("dataset", "model", "condition"), base_cells, "{condition}"),
    Stage(
        name="score_tuned",
        script="score",
        wildcards=("dataset", "model", "recipe", "seed"),
        instances=tuned_cells,
        inputs={
            "data": PROCESSED,
            "predictions": cell_path(PREDICTIONS, "{recipe}", "{seed}"),
            # the base condition on the weights the recipe trained on (base-4bit beside QLoRA)
            "baseline": cell_path(PREDICTIONS, "{baseline}"),
        },
        outputs={
            "scores": cell_path(SCORES, "{recipe}", "{seed}"),
            "per_item": cell_path(ITEM_SCORES, "{recipe}", "{seed}"),
        },
        sections=("score", "experiment.eval_split"),
        args=(
            "--dataset {dataset} --condition {recipe} --seed {seed} --data-dir {input.data}"
            " --predictions {input.predictions} --baseline {input.baseline} --out {output.scores}"
            " --items {output.per_item}"
        ),
    ),
    _score_stage("score_trained", ("dataset", "model", "seed"), encoder_cells, CONDITION_TRAINED),
    Stage(
        name="references",
        wildcards=("dataset",),
        instances=lambda cfg: [{"dataset": d} for d in cfg.datasets],
        inputs={"data": PROCESSED},
        outputs={"references": REFERENCES},
        sections=("score", "experiment.eval_split", "extract.max_items"),
        args="--dataset {dataset} --data-dir {input.data} --out {output.references}",
    ),
    Stage(
        name="summarise",
        group="report",
        wildcards=(),
        instances=lambda cfg: [{"reports": REPORTS.format(run=cfg.run)}],
        inputs=lambda cfg: {
            "scores": [p for d in cfg.datasets for p in run_cells(cfg, SCORES, d)],
            # per-item metrics of every cell: the table's means over seeds resample seeds and items together
            "per_item": [p for d in cfg.datasets for p in run_cells(cfg, ITEM_SCORES, d)],
            "references": [REFERENCES.format(run="{run}", dataset=d) for d in cfg.datasets],
        },
        outputs={
            "csv": f"{TABLE}.csv",
            "md": f"{TABLE}.md",
            "tex": f"{TABLE}.tex",
            "differences": f"{REPORTS}/differences.csv",
            "metrics": f"{REPORTS}/metrics.json",
            "censoring": f"{REPORTS}/censoring.md",
        },
        sections=(*SUMMARY_SECTIONS, "score"),
        args="--scores {input.scores} {input.references} --out-dir {reports}",
        metrics=("metrics",),
        report_items=(
            (
                "csv",
                {
                    "caption": "../report/results.rst",
                    "category": "Results table",
                    "labels": {"table": "long form (CSV)"},
                },
            ),
            (
                "differences",
                {
                    "caption": "../report/differences_table.rst",
                    "category": "Results table",
                    "labels": {"table": "fine-tuned minus base (CSV)"},
                },
            ),
        ),
    ),
    Stage(
        name="summarise_readings",
        group="report",
        wildcards=("dataset",),
        instances=lambda cfg: [
            {"dataset": d, "figures": f"{REPORTS.format(run=cfg.run)}/figures"}
            for d in cfg.datasets
            if cfg.read_models()
        ],
        inputs=lambda cfg: {
            "data": PROCESSED,
            # the logprob reading of every read cell, then its sample and verbal readings, in the same order
            "predictions": read_run_cells(cfg, PREDICTIONS),
            "readings": read_run_cells(cfg),
        },
        outputs={
            "csv": f"{REPORTS}/readings/{{dataset}}.csv",
            "md": f"{REPORTS}/readings/{{dataset}}.md",
            "differences": f"{REPORTS}/readings/{{dataset}}.differences.csv",
            "png": [FIGURE.format(run="{run}", dataset="{dataset}", kind=k, ext="png") for k in READING_FIGURES],
            "pdf": [FIGURE.format(run="{run}", dataset="{dataset}", kind=k, ext="pdf") for k in READING_FIGURES],
        },
        sections=(
            *SUMMARY_SECTIONS,
            "readings.models",
            "readings.max_items",
            "readings.sample.n_draws",
            "readings.smoothing",
            "score",
        ),
        args=(
            "--dataset {dataset} --data-dir {input.data} --predictions {input.predictions}"
            " --readings {input.readings} --table {output.csv} --markdown {output.md}"
            " --differences {output.differences} --figures {figures}"
        ),
        report_items=(
            ("csv", {"caption": "../report/readings.rst", "category": "Readings", "subcategory": "{dataset}"}),
            ("png", {"caption": "../report/readings.rst", "category": "Readings", "subcategory": "{dataset}"}),
        ),
    ),
    Stage(
        name="plot",
        group="report",
        wildcards=("dataset",),
        instances=lambda cfg: [
            {"dataset": d, "reports": REPORTS.format(run=cfg.run), "figures": f"{REPORTS.format(run=cfg.run)}/figures"}
            for d in cfg.datasets
        ],
        inputs=lambda cfg: {
            "results": f"{TABLE}.csv",
            "differences": f"{REPORTS}/differences.csv",
            "data": PROCESSED,
            "predictions": run_cells(cfg, PREDICTIONS),
        },
        outputs={"png": figure_paths("png"), "pdf": figure_paths("pdf")},
        report_items=(
            ("png", {"caption": "../report/figures.rst", "category": "Figures", "subcategory": "{dataset}"}),
        ),
        sections=SUMMARY_SECTIONS,
        args=(
            "--dataset {dataset} --report-dir {reports} --data-dir {input.data} --predictions {input.predictions}"
            " --out-dir {figures}"
        ),
    ),
)
BY_NAME = {s.name: s for s in STAGES}
