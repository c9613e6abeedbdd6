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

Path grammar (one everywhere): ``<root>/<run>/<dataset>/<model>/<cell>/...``, where a cell is a condition, then
``/seed-<s>`` for a trained one; logs in ``logs/<stage>/<run>/<wildcards...>.log``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moralign import backends
from moralign.config import CONDITION_TRAINED, Config, load_schema
from moralign.data import ARCHIVES, TASKS
from moralign.figures import FIGURES
from moralign.pipeline.code import ROOT, module_dependencies, script_dependencies

RAW = "data/{run}/raw/{archive}.tar.gz"
PROCESSED = "data/{run}/processed/{dataset}"
BASE_MODEL = "models/{run}/base/{model}"
ADAPTER = "models/{run}/adapters/{dataset}/{model}/{recipe}/seed-{seed}"
ENCODER = "models/{run}/encoders/{dataset}/{model}/seed-{seed}"
# {cell} = the condition, then /seed-<s> for a trained cell (one per training seed)
PREDICTIONS = "results/{run}/predictions/{dataset}/{model}/{cell}"
SCORES = "results/{run}/scores/{dataset}/{model}/{cell}.json"
ITEM_SCORES = "results/{run}/scores/{dataset}/{model}/{cell}.items.parquet"
REFERENCES = "results/{run}/scores/{dataset}/references.json"
REPORTS = "reports/{run}"
FIGURE = "reports/{run}/figures/{dataset}_{kind}.{ext}"
# API responses, keyed by request: outside every declared output (orchestrators delete those before a rerun), so
# reruns and interrupted runs never pay twice; shared by every run and cell.
API_CACHE = "cache/openai"


Instance = dict[str, str]
Patterns = dict[str, str | list[str]]


@dataclass(frozen=True)
class Stage:
    """One step of the DAG: a script run once per instance (a dict of wildcard values and derived values).

    Path patterns use ``{run}``, the wildcards and derived values of an instance; ``sections`` are dotted config
    keys (patterns too); ``args`` is the script's argument template over instance values (``{dataset}``) and
    named paths (``{input.data}``, ``{output.predictions}``).
    """

    name: str
    script: str
    wildcards: tuple[str, ...]
    instances: Callable[[Config], list[Instance]]
    inputs: Callable[[Config], Patterns]
    outputs: Callable[[Config], Patterns]
    sections: tuple[str, ...]
    args: str
    folders: tuple[str, ...] = ()  # outputs that are folders
    device_section: str | None = None  # config section whose `device` decides whether the step wants a GPU
    threads_section: str | None = None  # config section whose `threads` the step sets torch to
    local: bool = False  # runs on the submitting machine (needs the network), never on a cluster node
    extra_modules: tuple[str, ...] = ()  # modules the script imports by name at run time
    resources: tuple[tuple[str, int], ...] = ()  # scheduler resources besides GPUs (e.g. an API's concurrency)
    metrics: tuple[str, ...] = ()  # outputs that are DVC metrics files
    group: str = "evaluate"  # the workflow/rules/<group>.smk file its rule is written to
    # outputs shown in Snakemake's HTML report: (output key, report() keyword arguments)
    report_items: tuple[tuple[str, dict[str, Any]], ...] = ()

    @property
    def script_path(self) -> str:
        """The step script, relative to the repository root."""
        return f"workflow/scripts/{self.script}.py"

    def code(self) -> list[str]:
        """The script and every project module it runs, relative to the repository root."""
        files = script_dependencies(ROOT / self.script_path)
        for module in self.extra_modules:
            files |= module_dependencies(module)
        return sorted({self.script_path, *files})

    def log(self) -> str:
        """Log file pattern."""
        tail = "/".join(f"{{{w}}}" for w in self.wildcards) or self.name
        return f"logs/{self.name}/{{run}}/{tail}.log"

    def command(self) -> str:
        """The command template: the script, the config file, the declared sections, the arguments, the log."""
        return f"python {self.script_path} --config {{config}} --sections {{sections}} {self.args} --log {{log}}"


# ------------------------------------------------------------------------------------------------ instances


def model_section(model: str) -> str:
    """The config section of one model entry.

    DVC's params syntax splits keys on dots, so a model whose name has one (``llama-3.1-8b-instruct``) is tracked
    by the whole ``models`` section, in both front ends alike.
    """
    return "models" if "." in model else f"models.{model}"


def cell_name(condition: str, seed: int | str | None) -> str:
    """The path part of a cell: its condition, then ``/seed-<s>`` for a trained cell."""
    return condition if seed is None else f"{condition}/seed-{seed}"


def _cell(pattern: str, condition: str, seed: str | None = None) -> str:
    return pattern.replace("{cell}", cell_name(condition, seed))


def _models_of(backend: str) -> Callable[[Config], list[str]]:
    return lambda cfg: [m for m in cfg.models if cfg.backend(m) == backend]


_hf_models = _models_of("hf")  # causal LMs: LoRA recipes
_encoder_models = _models_of("encoder")  # encoder baselines: trained the Scruples way


def _local_models(cfg: Config) -> list[str]:
    """Models with weights in a base model folder, fetched or built alike (their backend says so)."""
    return [m for m in cfg.models if backends.get(cfg.backend(m)).local_weights]


def _model_instance(model: str) -> Instance:
    return {"model": model, "model_section": model_section(model)}


def _base_cells(cfg: Config, models: Callable[[Config], list[str]] = lambda cfg: cfg.models) -> list[Instance]:
    """Every (dataset, model, base condition) of ``models`` (``base``, and ``base-4bit`` beside QLoRA recipes)."""
    return [
        {"dataset": d, **_model_instance(m), "condition": c}
        for d in cfg.datasets
        for m in models(cfg)
        for c in cfg.conditions_of(m)
        if c not in cfg.tuned(m)
    ]


def _tuned_cells(cfg: Config) -> list[Instance]:
    """Every (dataset, model, recipe, seed) of the causal LMs; ``baseline`` = the base it is compared with."""
    return [
        {
            "dataset": d,
            **_model_instance(m),
            "recipe": r,
            "seed": str(s),
            "baseline": cfg.baseline_of(r),
            "quantization": cfg.finetune(r)["quantization"],
        }
        for d in cfg.datasets
        for m in _hf_models(cfg)
        for r in cfg.tuned(m)
        for s in cfg.seeds_of(m, r)
    ]


def _backend_cells(backend: backends.Backend) -> Callable[[Config], list[Instance]]:
    """The untrained cells of one backend's models (with the response cache where the backend keeps one)."""
    extra = {"cache": API_CACHE} if "cache" in backend.extract_inputs else {}
    return lambda cfg: [{**i, **extra} for i in _base_cells(cfg, _models_of(backend.name))]


def _encoder_cells(cfg: Config) -> list[Instance]:
    """Every (dataset, encoder model, seed)."""
    return [
        {"dataset": d, **_model_instance(m), "seed": str(s)}
        for d in cfg.datasets
        for m in _encoder_models(cfg)
        for s in cfg.seeds_of(m, CONDITION_TRAINED)
    ]


def _archives(cfg: Config) -> list[Instance]:
    needed = {TASKS[d].archive for d in cfg.datasets}
    if any("build" in cfg.model(m) for m in _local_models(cfg)):
        needed |= set(ARCHIVES)  # a tiny model's tokenizer is trained on the sample text of both archives
    return [{"archive": a} for a in ARCHIVES if a in needed]


def _run_cells(cfg: Config, pattern: str, dataset: str = "{dataset}") -> list[str]:
    """``pattern`` for every cell of the run (of one dataset, or of ``{dataset}``)."""
    return [
        pattern.format(run="{run}", dataset=dataset, model=m, cell=cell_name(c, s))
        for m in cfg.models
        for c in cfg.conditions_of(m)
        for s in cfg.seeds_of(m, c)
    ]


def _figures(ext: str) -> list[str]:
    return [FIGURE.format(run="{run}", dataset="{dataset}", kind=k, ext=ext) for k in FIGURES]


def _keys_but_seeds(section: str) -> tuple[str, ...]:
    """A section's keys, each declared alone, but its ``seeds``: adding a seed must not rerun the others."""
    keys = load_schema()["properties"][section]["properties"]
    return tuple(f"{section}.{k}" for k in keys if k != "seeds")


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
        inputs=lambda cfg: {"data": PROCESSED, "predictions": _cell(PREDICTIONS, cell, "{seed}" if seeded else None)},
        outputs=lambda cfg: {
            "scores": _cell(SCORES, cell, "{seed}" if seeded else None),
            "per_item": _cell(ITEM_SCORES, cell, "{seed}" if seeded else None),
        },
        sections=("score", "experiment.eval_split"),
        args=(
            f"--dataset {{dataset}} --condition {cell} --data-dir {{input.data}}"
            " --predictions {input.predictions} --out {output.scores} --items {output.per_item}"
            + (SEED_ARG if seeded else "")
        ),
    )


def _extract_stage(backend: backends.Backend) -> Stage:
    """The extract stage of a backend's untrained conditions, from what its registry entry says it needs."""
    local = backend.local_weights
    inputs = {"data": PROCESSED, **({"base": BASE_MODEL} if "base" in backend.extract_inputs else {})}
    args = "--model {model} --dataset {dataset} --condition {condition} --data-dir {input.data}"
    if "base" in backend.extract_inputs:
        args += " --base {input.base}"
    if "cache" in backend.extract_inputs:
        args += " --cache-dir {cache}"
    return Stage(
        name=backend.extract_stage,
        script="extract",
        wildcards=("dataset", "model", "condition"),
        # hf: base on the weights extract.quantization loads; base-4bit on the 4-bit base QLoRA recipes train on
        instances=_backend_cells(backend),
        inputs=lambda cfg: inputs,
        outputs=lambda cfg: {"predictions": _cell(PREDICTIONS, "{condition}")},
        folders=("predictions",),
        sections=("extract", "prompts.{dataset}", "{model_section}"),
        args=args + " --out-dir {output.predictions}",
        device_section="extract" if local else None,
        threads_section="extract" if local else None,
        extra_modules=(backend.module,),
        resources=backend.resources,
    )


STAGES: tuple[Stage, ...] = (
    Stage(
        name="download",
        group="data",
        script="download",
        wildcards=("archive",),
        instances=_archives,
        inputs=lambda cfg: {},
        outputs=lambda cfg: {"archive": RAW, "sha256": f"{RAW}.sha256"},
        sections=("data.source", "data.sha256.{archive}", "data.sample"),
        args="--archive {archive} --out {output.archive}",
    ),
    Stage(
        name="prepare",
        group="data",
        script="prepare",
        wildcards=("dataset",),
        instances=lambda cfg: [{"dataset": d, "archive": TASKS[d].archive} for d in cfg.datasets],
        inputs=lambda cfg: {"archive": RAW},
        outputs=lambda cfg: {"data": PROCESSED},
        folders=("data",),
        sections=(),
        args="--dataset {dataset} --archive {input.archive} --out-dir {output.data}",
    ),
    Stage(
        name="build_model",
        group="models",
        script="fetch_model",
        wildcards=("model",),
        instances=lambda cfg: [_model_instance(m) for m in _local_models(cfg) if "build" in cfg.model(m)],
        inputs=lambda cfg: {"archives": [RAW.format(run="{run}", archive=a) for a in ARCHIVES]},
        outputs=lambda cfg: {"model": BASE_MODEL},
        folders=("model",),
        sections=("{model_section}",),
        args="--model {model} --archives {input.archives} --out {output.model}",
    ),
    Stage(
        name="fetch_model",
        group="models",
        script="fetch_model",
        wildcards=("model",),
        instances=lambda cfg: [_model_instance(m) for m in _local_models(cfg) if "build" not in cfg.model(m)],
        inputs=lambda cfg: {},
        outputs=lambda cfg: {"model": BASE_MODEL},
        folders=("model",),
        sections=("{model_section}",),
        args="--model {model} --out {output.model}",
        local=True,
    ),
    Stage(
        name="finetune",
        group="models",
        script="finetune",
        wildcards=("dataset", "model", "recipe", "seed"),
        instances=_tuned_cells,
        inputs=lambda cfg: {"data": PROCESSED, "base": BASE_MODEL},
        outputs=lambda cfg: {"adapter": ADAPTER},
        folders=("adapter",),
        sections=(*_keys_but_seeds("finetune"), "recipes.{recipe}", "prompts.{dataset}", "{model_section}"),
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
        script="train_encoder",
        wildcards=("dataset", "model", "seed"),
        instances=_encoder_cells,
        inputs=lambda cfg: {"data": PROCESSED, "base": BASE_MODEL},
        outputs=lambda cfg: {"encoder": ENCODER},
        folders=("encoder",),
        sections=(*_keys_but_seeds("encoder"), "{model_section}"),
        args=(
            "--model {model} --dataset {dataset} --seed {seed} --data-dir {input.data} --base {input.base}"
            " --out {output.encoder}"
        ),
        device_section="encoder",
        threads_section="encoder",
    ),
    *(_extract_stage(b) for b in backends.BACKENDS.values() if b.extract_stage),
    Stage(
        name="extract_tuned",
        script="extract",
        wildcards=("dataset", "model", "recipe", "seed"),
        # on the base weights the adapter was trained on (4-bit for QLoRA: read from the adapter's metadata)
        instances=_tuned_cells,
        inputs=lambda cfg: {"data": PROCESSED, "base": BASE_MODEL, "adapter": ADAPTER},
        outputs=lambda cfg: {"predictions": _cell(PREDICTIONS, "{recipe}", "{seed}")},
        folders=("predictions",),
        sections=("extract", "prompts.{dataset}", "{model_section}"),
        args=(
            "--model {model} --dataset {dataset} --condition {recipe} --data-dir {input.data} --base {input.base}"
            " --adapter {input.adapter} --base-quantization {quantization} --out-dir {output.predictions}"
        ),
        device_section="extract",
        threads_section="extract",
        extra_modules=("moralign.predictors.hf",),
    ),
    Stage(
        name="extract_trained",
        script="extract",
        wildcards=("dataset", "model", "seed"),
        instances=_encoder_cells,
        inputs=lambda cfg: {"data": PROCESSED, "base": BASE_MODEL, "encoder": ENCODER},
        outputs=lambda cfg: {"predictions": _cell(PREDICTIONS, CONDITION_TRAINED, "{seed}")},
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
    _score_stage("score_base", ("dataset", "model", "condition"), _base_cells, "{condition}"),
    Stage(
        name="score_tuned",
        script="score",
        wildcards=("dataset", "model", "recipe", "seed"),
        instances=_tuned_cells,
        inputs=lambda cfg: {
            "data": PROCESSED,
            "predictions": _cell(PREDICTIONS, "{recipe}", "{seed}"),
            # the base condition on the weights the recipe trained on (base-4bit beside QLoRA)
            "baseline": _cell(PREDICTIONS, "{baseline}"),
        },
        outputs=lambda cfg: {
            "scores": _cell(SCORES, "{recipe}", "{seed}"),
            "per_item": _cell(ITEM_SCORES, "{recipe}", "{seed}"),
        },
        sections=("score", "experiment.eval_split"),
        args=(
            "--dataset {dataset} --condition {recipe} --seed {seed} --data-dir {input.data}"
            " --predictions {input.predictions} --baseline {input.baseline} --out {output.scores}"
            " --items {output.per_item}"
        ),
    ),
    _score_stage("score_trained", ("dataset", "model", "seed"), _encoder_cells, CONDITION_TRAINED),
    Stage(
        name="references",
        script="references",
        wildcards=("dataset",),
        instances=lambda cfg: [{"dataset": d} for d in cfg.datasets],
        inputs=lambda cfg: {"data": PROCESSED},
        outputs=lambda cfg: {"references": REFERENCES},
        sections=("score", "experiment.eval_split", "extract.max_items"),
        args="--dataset {dataset} --data-dir {input.data} --out {output.references}",
    ),
    Stage(
        name="summarise",
        group="report",
        script="summarise",
        wildcards=(),
        instances=lambda cfg: [{"reports": REPORTS.format(run=cfg.run)}],
        inputs=lambda cfg: {
            "scores": [p for d in cfg.datasets for p in _run_cells(cfg, SCORES, d)],
            # per-item metrics of every cell: the table's means over seeds resample seeds and items together
            "per_item": [p for d in cfg.datasets for p in _run_cells(cfg, ITEM_SCORES, d)],
            "references": [REFERENCES.format(run="{run}", dataset=d) for d in cfg.datasets],
        },
        outputs=lambda cfg: {
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
        name="plot",
        group="report",
        script="plot",
        wildcards=("dataset",),
        instances=lambda cfg: [
            {"dataset": d, "reports": REPORTS.format(run=cfg.run), "figures": f"{REPORTS.format(run=cfg.run)}/figures"}
            for d in cfg.datasets
        ],
        inputs=lambda cfg: {
            "results": f"{TABLE}.csv",
            "differences": f"{REPORTS}/differences.csv",
            "data": PROCESSED,
            "predictions": _run_cells(cfg, PREDICTIONS),
        },
        outputs=lambda cfg: {"png": _figures("png"), "pdf": _figures("pdf")},
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
