"""Load, merge and validate a run configuration.

One configuration drives both orchestrators: Snakemake reads ``params.yaml`` plus any ``--configfile`` overlay,
DVC reads ``params.yaml``, and every step script gets the same list of files through ``--config``. Files are
merged the way Snakemake merges them (nested mappings merge, lists and scalars replace), so a step sees exactly
the configuration its orchestrator planned with.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from moralign import backends
from moralign.backends import (
    BASE_CONDITIONS,
    CONDITION_BASE,
    CONDITION_BASE_4BIT,
    CONDITION_TRAINED,
    ENCODER_ARCHITECTURES,
)
from moralign.errors import ConfigError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false, never yes/no/on/off.

    Answer strings such as No are plain strings in YAML 1.2, and tools that rewrite params.yaml (DVC's
    `exp run -S`) write them unquoted; YAML 1.1 would read them as False.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    """Parse YAML with YAML 1.2 booleans (see :class:`_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)


# The conditions and the backends that decide them live in the backend registry; re-exported for the steps.
__all__ = [
    "BASE_CONDITIONS",
    "CONDITION_BASE",
    "CONDITION_BASE_4BIT",
    "CONDITION_TRAINED",
    "ENCODER_ARCHITECTURES",
    "Config",
    "ConfigError",
    "load_config",
    "validate",
]


def merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``overlay`` into ``base`` like Snakemake's ``update_config``: mappings merge, all else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _fill_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """Fill schema defaults into ``value`` (objects only; a default object supplies its missing keys)."""
    if not isinstance(value, dict):
        return value
    if isinstance(schema.get("default"), dict):
        for key, default in schema["default"].items():
            value.setdefault(key, copy.deepcopy(default))
    props = schema.get("properties", {})
    for key, sub in props.items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            _fill_defaults(sub, value[key])
    extra = schema.get("additionalProperties")
    patterns = schema.get("patternProperties", {})
    for key in value:
        if key in props:
            continue
        if isinstance(extra, dict):
            _fill_defaults(extra, value[key])
        for sub in patterns.values():
            _fill_defaults(sub, value[key])
    return value


def load_schema() -> dict[str, Any]:
    """Return the configuration's JSON schema, the backends (enum and description) from their registry."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    backend = schema["properties"]["models"]["additionalProperties"]["properties"]["backend"]
    backend["enum"] = list(backends.BACKENDS)
    backend["description"] = "How the model predicts: " + "; ".join(
        f"{b.name} = {b.description}" for b in backends.BACKENDS.values()
    )
    return schema


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = load_yaml(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: config file not found") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a YAML mapping, got {type(data).__name__}")
    return data


class _Partial(dict):
    """A mapping cut down to the sections a step declared; reading an undeclared key is a ConfigError."""

    def __init__(self, data: dict[str, Any], where: str, declared: tuple[str, ...]) -> None:
        super().__init__(data)
        self.where, self.declared = where, declared

    def __missing__(self, key: str) -> Any:
        name = f"{self.where}.{key}" if self.where else key
        raise ConfigError(
            f"config section '{name}' is not among the sections this step declared ({', '.join(self.declared)}): "
            "add it to the step's sections in moralign.pipeline.table, so that changing it reruns the step"
        )


@dataclass(frozen=True)
class Config:
    """A validated configuration with the lookups every step needs."""

    data: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def restrict(self, sections: Iterable[str]) -> Config:
        """The part of this configuration made of ``sections`` (dotted keys); reading anything else is an error.

        Every step gets the sections its stage declares (moralign.pipeline.table), which are exactly what Snakemake
        hashes and DVC tracks as its params: a step cannot read configuration that would not rerun it.
        """
        declared = tuple(sections)
        out = _Partial({}, "", declared)
        for dotted in declared:
            node, path = out, key_path(self.data, dotted)
            for depth, key in enumerate(path[:-1]):
                if key not in node:
                    dict.__setitem__(node, key, _Partial({}, ".".join(path[: depth + 1]), declared))
                node = dict.__getitem__(node, key)
            dict.__setitem__(node, path[-1], copy.deepcopy(lookup(self.data, dotted)))
        return Config(out)

    @property
    def run(self) -> str:
        """Name of the run; part of every output path."""
        return self.data["run"]

    @property
    def models(self) -> list[str]:
        """Names of the models this run evaluates."""
        return list(self.data["experiment"]["models"])

    @property
    def datasets(self) -> list[str]:
        """Tasks this run evaluates."""
        return list(self.data["experiment"]["datasets"])

    @property
    def recipes(self) -> list[str]:
        """Fine-tuning recipes this run trains."""
        return list(self.data["experiment"]["recipes"])

    def model(self, name: str) -> dict[str, Any]:
        """Definition of model ``name``."""
        return self.data["models"][name]

    def backend(self, model: str) -> str:
        """How model ``model`` predicts (moralign.predictors.<backend>)."""
        return self.model(model)["backend"]

    def conditions_of(self, model: str) -> list[str]:
        """The conditions of model ``model``: the one place that decides which cells a model has.

        A local causal LM has ``base`` (its weights as ``extract`` loads them: bf16 in the paper run), also
        ``base-4bit`` when a recipe trains on a 4-bit base (QLoRA: the baseline of that recipe's differences), and
        one condition per fine-tuning recipe; an API model (``backend: openai``) has only ``base``: there are no
        weights to tune; an encoder baseline (``backend: encoder``) has only ``trained``: a classification head is
        random until trained, so there is no base row.
        """
        quantized = any(self.finetune(r)["quantization"] == "4bit" for r in self.recipes)
        return backends.get(self.backend(model)).conditions(self.recipes, quantized)

    def seeds_of(self, model: str, condition: str) -> list[int | None]:
        """Training seeds of a cell: ``finetune.seeds`` for a recipe, ``encoder.seeds`` for an encoder; [None] else.

        Each seed is a cell of its own (its own adapter, predictions and scores); the table averages over them.
        """
        if condition in BASE_CONDITIONS:
            return [None]
        if self.backend(model) == "encoder":
            return list(self.data["encoder"]["seeds"])
        return list(self.data["finetune"]["seeds"])

    @property
    def readings(self) -> list[str]:
        """The readings drawn beside ``logprob`` (``sample``, ``verbal``; docs/readings.md)."""
        return list(self.data["experiment"]["readings"])

    def read_models(self) -> list[str]:
        """The run's models whose ``sample`` and ``verbal`` readings are drawn (none without readings)."""
        if not self.readings:
            return []
        chosen = self.data["readings"]["models"]
        return [m for m in self.models if backends.get(self.backend(m)).read_stage and (chosen is None or m in chosen)]

    def reading_cells(self) -> list[tuple[str, str, int | None]]:
        """Every (model, condition, seed) whose readings are drawn, in table order (the same cells in every dataset)."""
        return [(m, c, s) for m in self.read_models() for c in self.conditions_of(m) for s in self.seeds_of(m, c)]

    def baseline_of(self, recipe: str) -> str:
        """The base condition a recipe's differences are taken against: the weights it was trained on."""
        return CONDITION_BASE_4BIT if self.finetune(recipe)["quantization"] == "4bit" else CONDITION_BASE

    @property
    def conditions(self) -> list[str]:
        """Every condition of any model of the run, in table order (``base`` first)."""
        return list(dict.fromkeys(c for m in self.models for c in self.conditions_of(m)))

    def cells(self) -> list[tuple[str, str, str, int | None]]:
        """Every (dataset, model, condition, seed) cell of the run, in table order; seed None where untrained."""
        return [
            (d, m, c, s)
            for d in self.datasets
            for m in self.models
            for c in self.conditions_of(m)
            for s in self.seeds_of(m, c)
        ]

    def comparisons(self) -> list[tuple[str, str]]:
        """(condition, baseline) pairs of the differences table.

        Each recipe against the base it was trained on, then each recipe against every earlier one (seed for
        seed), in ``experiment.recipes`` order.
        """
        pairs = [(r, self.baseline_of(r)) for r in self.recipes]
        pairs += [(b, a) for k, a in enumerate(self.recipes) for b in self.recipes[k + 1 :]]
        return pairs

    def tuned(self, model: str) -> list[str]:
        """The trained conditions of ``model`` (LoRA recipes; ``trained`` for an encoder)."""
        return [c for c in self.conditions_of(model) if c not in BASE_CONDITIONS]

    def prompt(self, dataset: str) -> dict[str, Any]:
        """Prompt variant of ``dataset``."""
        return self.data["prompts"][dataset]

    def finetune(self, recipe: str, seed: int | None = None) -> dict[str, Any]:
        """Hyperparameters of ``recipe``: the shared ``finetune`` section overridden by the recipe's own keys.

        With ``seed`` (one of ``finetune.seeds``), the settings of that one training run: ``seed`` set.
        """
        settings = {**self.data["finetune"], **self.data["recipes"][recipe]}
        return settings if seed is None else {**settings, "seed": seed}

    def section_hash(self, *keys: str) -> str:
        """Short stable hash of the named sections (dotted keys), for rerun triggers and provenance."""
        return digest({k: lookup(self.data, k) for k in keys})


def key_path(data: Mapping[str, Any], dotted: str) -> list[str]:
    """The keys of a dotted name; keys that contain dots (``models.llama-3.1-8b``) are matched whole."""
    node: Any = data
    rest, keys = dotted, []
    while rest:
        if not isinstance(node, Mapping):
            raise KeyError(f"{dotted}: {'.'.join(keys)} is not a section")
        key = next((k for k in sorted(node, key=len, reverse=True) if rest == k or rest.startswith(k + ".")), None)
        if key is None:
            raise KeyError(f"{dotted}: no key {rest!r}")
        keys.append(key)
        node, rest = node[key], rest[len(key) + 1 :]
    return keys


def lookup(data: Mapping[str, Any], dotted: str) -> Any:
    """``lookup(d, "a.b")`` is ``d["a"]["b"]``; keys that contain dots (``models.llama-3.1-8b``) are matched whole."""
    node: Any = data
    for key in key_path(data, dotted):
        node = node[key]
    return node


def digest(obj: Any, length: int = 16) -> str:
    """Stable hex digest of a JSON-serialisable object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _check_cross_fields(cfg: dict[str, Any], origin: str) -> None:
    exp = cfg["experiment"]
    for name in exp["models"]:
        model = cfg["models"].get(name)
        if model is None:
            raise ConfigError(
                f"{origin}: experiment.models names '{name}', which is not defined under models "
                f"(defined: {sorted(cfg['models'])}); add models.{name} or remove it from the list"
            )
        backends.get(model["backend"]).check_config(name, model, origin)
    for name in exp["recipes"]:
        if name in (*BASE_CONDITIONS, CONDITION_TRAINED):
            raise ConfigError(
                f"{origin}: experiment.recipes: '{name}' names a condition of its own (the untuned models, the "
                "encoder baselines), not a recipe; rename the recipe"
            )
        if name not in cfg["recipes"]:
            raise ConfigError(
                f"{origin}: experiment.recipes names '{name}', which is not defined under recipes "
                f"(defined: {sorted(cfg['recipes'])}); add recipes.{name} or remove it from the list"
            )
    for dataset in exp["datasets"]:
        if dataset not in cfg["prompts"]:
            raise ConfigError(f"{origin}: experiment.datasets has '{dataset}' but prompts.{dataset} is missing")
    if exp["eval_split"] == "dev":
        raise ConfigError(
            f"{origin}: experiment.eval_split is 'dev', but the temperature (calibrated_xentropy) and the "
            "concentration (dirichlet_fitted) are fitted on dev, so a dev evaluation would report them fitted on "
            "the evaluated items themselves; set experiment.eval_split: test"
        )
    if "dev" not in cfg["extract"]["splits"]:
        raise ConfigError(
            f"{origin}: extract.splits {cfg['extract']['splits']} lacks 'dev', on which every cell's temperature "
            "and concentration are fitted; add dev to extract.splits"
        )
    if exp["eval_split"] not in cfg["extract"]["splits"]:
        raise ConfigError(
            f"{origin}: experiment.eval_split '{exp['eval_split']}' is not among extract.splits "
            f"{cfg['extract']['splits']}; add it there"
        )
    for name in exp["recipes"]:
        settings = {**cfg["finetune"], **cfg["recipes"][name]}
        if settings["quantization"] == "4bit" and settings["device"] == "cpu":
            raise ConfigError(
                f"{origin}: recipe {name} trains on a 4-bit base (finetune.quantization: 4bit) on device cpu, but "
                "4-bit weights need CUDA; set finetune.quantization: none (plain LoRA: the recipe's cells and their "
                "baseline are then scored on the same full-precision base)"
            )
    # readings.models picks among the run's models: one defined but not run is simply not read (an overlay that
    # narrows experiment.models need not touch it); one not defined at all is a typo
    for name in cfg["readings"]["models"] or []:
        if name not in cfg["models"]:
            raise ConfigError(
                f"{origin}: readings.models names '{name}', which is not defined under models "
                f"(defined: {sorted(cfg['models'])})"
            )
        if not backends.get(cfg["models"][name]["backend"]).read_stage:
            raise ConfigError(
                f"{origin}: readings.models names '{name}', a {cfg['models'][name]['backend']} model, which "
                "generates no text: only chat models (backends hf and openai) are read by sampling"
            )
    for key in ("models", "datasets", "recipes"):
        dupes = {x for x in exp[key] if exp[key].count(x) > 1}
        if dupes:
            raise ConfigError(f"{origin}: experiment.{key} lists {sorted(dupes)} more than once")


def validate(raw: Mapping[str, Any], origin: str = "config") -> Config:
    """Fill defaults, validate against the schema and run cross-field checks."""
    schema = load_schema()
    cfg = _fill_defaults(schema, copy.deepcopy(dict(raw)))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors[:10]:
            where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
            lines.append(f"  {where}: {err.message}")
        raise ConfigError(f"{origin}: invalid configuration\n" + "\n".join(lines))
    _check_cross_fields(cfg, origin)
    return Config(cfg)


def write_resolved(cfg: Config, path: str | Path) -> Path:
    """Write the merged, validated configuration to ``path``, leaving the file untouched when it is unchanged.

    Snakemake passes this one stable path to every step instead of the list of config files it merged, so
    renaming or moving an overlay does not look like a parameter change (which would rerun every step); the
    per-step section hashes decide what reruns.
    """
    path = Path(path)
    text = yaml.safe_dump(cfg.data, sort_keys=True, allow_unicode=True)
    if not path.exists() or path.read_text() != text:
        from moralign.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return path


def load_config(paths: str | Path | Iterable[str | Path]) -> Config:
    """Read, merge (in order) and validate configuration files."""
    if isinstance(paths, str | Path):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ConfigError("no config file given")
    merged: dict[str, Any] = {}
    for path in paths:
        merged = merge(merged, _read_yaml(path))
    return validate(merged, origin=" + ".join(str(p) for p in paths))
