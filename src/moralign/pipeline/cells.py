"""The path grammar and the cells of a run: which instance of each stage exists for a configuration.

Path grammar (one everywhere): ``<root>/<run>/<dataset>/<model>/<cell>/...``, where a cell is a condition, then
``/seed-<s>`` for a trained one (one per training seed). An instance is a dict of a stage's wildcard values and
the values derived from them (the model's config section, the base a fine-tuned cell is compared with, ...).
"""

from __future__ import annotations

from collections.abc import Callable

from moralign import backends
from moralign.config import CONDITION_TRAINED, Config, load_schema
from moralign.data import ARCHIVES, TASKS
from moralign.figures import FIGURES

RAW = "data/{run}/raw/{archive}.tar.gz"
PROCESSED = "data/{run}/processed/{dataset}"
BASE_MODEL = "models/{run}/base/{model}"
ADAPTER = "models/{run}/adapters/{dataset}/{model}/{recipe}/seed-{seed}"
ENCODER = "models/{run}/encoders/{dataset}/{model}/seed-{seed}"
# {cell} = the condition, then /seed-<s> for a trained cell (one per training seed)
PREDICTIONS = "results/{run}/predictions/{dataset}/{model}/{cell}"
# the `sample` and `verbal` readings of a cell (docs/readings.md), beside its `logprob` predictions
READINGS = "results/{run}/readings/{dataset}/{model}/{cell}"
SCORES = "results/{run}/scores/{dataset}/{model}/{cell}.json"
ITEM_SCORES = "results/{run}/scores/{dataset}/{model}/{cell}.items.parquet"
REFERENCES = "results/{run}/scores/{dataset}/references.json"
REPORTS = "reports/{run}"
FIGURE = "reports/{run}/figures/{dataset}_{kind}.{ext}"
# API responses, keyed by request: outside every declared output (orchestrators delete those before a rerun), so
# reruns and interrupted runs never pay twice; shared by every run and cell.
API_CACHE = "cache/openai"
# Raw completions of the local models' readings, keyed by the whole request (moralign.readings.cache): the same
# reasons, so a changed parser or a rerun never generates twice.
GENERATION_CACHE = "cache/generations"


Instance = dict[str, str]
Patterns = dict[str, str | list[str]]


def model_section(model: str) -> str:
    """The config section of one model entry.

    DVC's params syntax splits keys on dots, so a model whose name has one (``llama-3.1-8b-instruct``) is tracked
    by the whole ``models`` section, in both front ends alike.
    """
    return "models" if "." in model else f"models.{model}"


def cell_name(condition: str, seed: int | str | None) -> str:
    """The path part of a cell: its condition, then ``/seed-<s>`` for a trained cell."""
    return condition if seed is None else f"{condition}/seed-{seed}"


def cell_path(pattern: str, condition: str, seed: str | None = None) -> str:
    """``pattern`` with its ``{cell}`` filled for ``condition`` (and ``seed``, for a trained cell)."""
    return pattern.replace("{cell}", cell_name(condition, seed))


def models_of(backend: str) -> Callable[[Config], list[str]]:
    """The run's models of one backend (a function of the configuration)."""
    return lambda cfg: [m for m in cfg.models if cfg.backend(m) == backend]


hf_models = models_of("hf")  # causal LMs: LoRA recipes
encoder_models = models_of("encoder")  # encoder baselines: trained the Scruples way


def local_models(cfg: Config) -> list[str]:
    """Models with weights in a base model folder, fetched or built alike (their backend says so)."""
    return [m for m in cfg.models if backends.get(cfg.backend(m)).local_weights]


def model_instance(model: str) -> Instance:
    """A model and the config section that defines it."""
    return {"model": model, "model_section": model_section(model)}


def base_cells(cfg: Config, models: Callable[[Config], list[str]] = lambda cfg: cfg.models) -> list[Instance]:
    """Every (dataset, model, base condition) of ``models`` (``base``, and ``base-4bit`` beside QLoRA recipes)."""
    return [
        {"dataset": d, **model_instance(m), "condition": c}
        for d in cfg.datasets
        for m in models(cfg)
        for c in cfg.conditions_of(m)
        if c not in cfg.tuned(m)
    ]


def tuned_cells(cfg: Config) -> list[Instance]:
    """Every (dataset, model, recipe, seed) of the causal LMs; ``baseline`` = the base it is compared with."""
    return [
        {
            "dataset": d,
            **model_instance(m),
            "recipe": r,
            "seed": str(s),
            "baseline": cfg.baseline_of(r),
            "quantization": cfg.finetune(r)["quantization"],
        }
        for d in cfg.datasets
        for m in hf_models(cfg)
        for r in cfg.tuned(m)
        for s in cfg.seeds_of(m, r)
    ]


def backend_cells(backend: backends.Backend) -> Callable[[Config], list[Instance]]:
    """The untrained cells of one backend's models (with the response cache where the backend keeps one)."""
    extra = {"cache": API_CACHE} if "cache" in backend.extract_inputs else {}
    return lambda cfg: [{**i, **extra} for i in base_cells(cfg, models_of(backend.name))]


def read_cells(backend: backends.Backend) -> Callable[[Config], list[Instance]]:
    """The untrained cells of one backend's models whose readings are drawn, with the cache each reads through."""
    cache = {"cache": API_CACHE if "cache" in backend.extract_inputs else GENERATION_CACHE}

    def cells(cfg: Config) -> list[Instance]:
        models = [m for m in cfg.read_models() if cfg.backend(m) == backend.name]
        return [{**i, **cache} for i in base_cells(cfg, lambda _: models)]

    return cells


def read_tuned_cells(cfg: Config) -> list[Instance]:
    """The fine-tuned cells whose readings are drawn."""
    models = cfg.read_models()
    return [{**i, "cache": GENERATION_CACHE} for i in tuned_cells(cfg) if i["model"] in models]


def read_run_cells(cfg: Config, pattern: str = READINGS, dataset: str = "{dataset}") -> list[str]:
    """``pattern`` for every read cell of the run (of one dataset, or of ``{dataset}``), in table order."""
    return [
        pattern.format(run="{run}", dataset=dataset, model=m, cell=cell_name(c, s)) for m, c, s in cfg.reading_cells()
    ]


def encoder_cells(cfg: Config) -> list[Instance]:
    """Every (dataset, encoder model, seed)."""
    return [
        {"dataset": d, **model_instance(m), "seed": str(s)}
        for d in cfg.datasets
        for m in encoder_models(cfg)
        for s in cfg.seeds_of(m, CONDITION_TRAINED)
    ]


def archives(cfg: Config) -> list[Instance]:
    """The release archives the run needs."""
    needed = {TASKS[d].archive for d in cfg.datasets}
    if any("build" in cfg.model(m) for m in local_models(cfg)):
        needed |= set(ARCHIVES)  # a tiny model's tokenizer is trained on the sample text of both archives
    return [{"archive": a} for a in ARCHIVES if a in needed]


def run_cells(cfg: Config, pattern: str, dataset: str = "{dataset}") -> list[str]:
    """``pattern`` for every cell of the run (of one dataset, or of ``{dataset}``)."""
    return [
        pattern.format(run="{run}", dataset=dataset, model=m, cell=cell_name(c, s))
        for m in cfg.models
        for c in cfg.conditions_of(m)
        for s in cfg.seeds_of(m, c)
    ]


def figure_paths(ext: str) -> list[str]:
    """Every figure of a dataset, in one format."""
    return [FIGURE.format(run="{run}", dataset="{dataset}", kind=k, ext=ext) for k in FIGURES]


def keys_but_seeds(section: str) -> tuple[str, ...]:
    """A section's keys, each declared alone, but its ``seeds``: adding a seed must not rerun the others."""
    keys = load_schema()["properties"][section]["properties"]
    return tuple(f"{section}.{k}" for k in keys if k != "seeds")
