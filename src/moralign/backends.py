"""The registry of backends: the ways a model turns items into answer distributions, each declared once.

A backend is one predictor module (``moralign.predictors.<name>``, imported only by the extract step: it may
import torch) and one :class:`Backend` entry here (no heavy imports: the configuration, the stage table and the
input checks read it). The entry says everything the rest of the system needs to know:

* ``conditions``: which cells a model of this backend has (``moralign.config.Config.conditions_of`` asks here);
* ``local_weights``: whether it has a base model folder (fetched or built: ``fetch_model``/``build_model``);
* ``extract_stage`` and ``extract_inputs``: the extract stage that scores its untrained conditions and what that
  stage needs besides the processed data (``base``: the model folder; ``cache``: a response cache outside the
  outputs), with ``resources`` for the scheduler (``moralign.pipeline.table`` builds the stage from this);
* ``read_stage``: the stage that draws the ``sample`` and ``verbal`` readings of those conditions (same inputs;
  None: the backend cannot generate text, like the encoders);
* ``check_config``: its cross-field configuration checks; ``same_model``: how a score file's provenance is
  matched with the model's configuration (a same-named model of another run must fail).

Trained conditions have stages of their own (``finetune``/``extract_tuned`` for LoRA recipes of ``hf`` models,
``train_encoder``/``extract_trained`` for ``encoder`` models). docs/extending.md shows how to add a backend.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from moralign.errors import ConfigError

CONDITION_BASE = "base"
# The base condition scored on the 4-bit NF4 weights QLoRA recipes train on: the baseline of their differences.
CONDITION_BASE_4BIT = "base-4bit"
BASE_CONDITIONS = (CONDITION_BASE, CONDITION_BASE_4BIT)
# The one condition of an encoder baseline: trained on the votes; its untrained head is noise.
CONDITION_TRAINED = "trained"
# build.architecture values of the encoder baselines (moralign.tinyencoders); the others are causal LMs.
ENCODER_ARCHITECTURES = ("bert", "roberta")


@dataclass(frozen=True)
class Backend:
    """One way of predicting; see the module docstring for what each field feeds."""

    name: str
    module: str
    description: str
    local_weights: bool
    # (recipes of the run, whether a recipe trains on a 4-bit base) -> this backend's conditions, in table order
    conditions: Callable[[list[str], bool], list[str]]
    extract_stage: str | None = None
    extract_inputs: tuple[str, ...] = ()
    # the stage that draws the `sample` and `verbal` readings of its untrained conditions (same inputs as extract)
    read_stage: str | None = None
    resources: tuple[tuple[str, int], ...] = ()
    check_config: Callable[[str, Mapping[str, Any], str], None] = lambda name, model, origin: None
    # (score provenance, model config) -> None when they describe the same model, else the reason
    same_model: Callable[[Mapping[str, Any], Mapping[str, Any]], str | None] = lambda prov, cfg: None


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend to the registry (its name must be new)."""
    if backend.name in BACKENDS:
        raise ValueError(f"backend {backend.name!r} is registered twice")
    BACKENDS[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    """The backend called ``name``."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r} (known: {sorted(BACKENDS)})") from None


# ------------------------------------------------------------------------------------------ shared checks


def _check_local(name: str, model: Mapping[str, Any], origin: str, encoder: bool) -> None:
    """A model with weights to load (``hf_id``) or build (``build``), of the right architecture family."""
    if ("hf_id" in model) == ("build" in model):
        raise ConfigError(
            f"{origin}: models.{name} needs exactly one of 'hf_id' (load a model) or 'build' (build a tiny one)"
        )
    built = model.get("build", {}).get("architecture")
    if built is not None and (built in ENCODER_ARCHITECTURES) != encoder:
        want = "encoder" if built in ENCODER_ARCHITECTURES else "hf"
        raise ConfigError(
            f"{origin}: models.{name}.build.architecture is {built!r}, which needs backend: {want} "
            f"(backend is {model['backend']!r})"
        )
    if "openai" in model:
        raise ConfigError(
            f"{origin}: models.{name} has an 'openai' block but backend '{model['backend']}'; "
            f"set backend: openai or remove the block"
        )


def _same_weights(prov: Mapping[str, Any], cfg: Mapping[str, Any]) -> str | None:
    """A local model's score provenance names the weights its config does (built spec, or Hub id and revision)."""
    base = prov.get("base") or {}
    if "build" in cfg:
        same = base.get("built") == cfg["build"]
    else:
        pinned = cfg.get("revision")
        same = base.get("hf_id") == cfg.get("hf_id") and pinned in (
            None,
            base.get("revision"),
            base.get("requested_revision"),
        )
    return None if same else "other weights"


def _check_hf(name: str, model: Mapping[str, Any], origin: str) -> None:
    _check_local(name, model, origin, encoder=False)


def _check_encoder(name: str, model: Mapping[str, Any], origin: str) -> None:
    _check_local(name, model, origin, encoder=True)
    if model["chat_template"]:
        raise ConfigError(
            f"{origin}: models.{name} has backend: encoder, which reads the item's text with no prompt or chat "
            "markup; set chat_template: false"
        )


def _check_openai(name: str, model: Mapping[str, Any], origin: str) -> None:
    """An API model names its endpoint's model and nothing a local model needs."""
    if "openai" not in model:
        raise ConfigError(
            f"{origin}: models.{name} has backend: openai but no 'openai' block; add at least "
            f"openai: {{api_model: <the server's model id, e.g. gpt-4o-2024-08-06>}}"
        )
    env = model["openai"].get("api_key_env")
    if env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
        # never echo the value: a key pasted here by mistake must not reach a log
        raise ConfigError(
            f"{origin}: models.{name}.openai.api_key_env must be the NAME of an environment variable (letters, "
            f"digits, _), e.g. OPENAI_API_KEY, not the key itself (value not shown)"
        )
    clash = [key for key in ("hf_id", "build") if key in model]
    if clash:
        raise ConfigError(
            f"{origin}: models.{name} has backend: openai and {clash}; an API model has no local weights, "
            f"remove {clash}"
        )
    if not model["chat_template"]:
        raise ConfigError(
            f"{origin}: models.{name}: chat_template: false feeds raw text to a local model; the openai backend "
            f"always sends chat messages, remove it"
        )


def _same_api_model(prov: Mapping[str, Any], cfg: Mapping[str, Any]) -> str | None:
    """An API model's identity is the endpoint's model id."""
    want = cfg["openai"]["api_model"]
    return None if prov.get("api_model") == want else f"API model {prov.get('api_model')!r}, not {want!r}"


# ------------------------------------------------------------------------------------------------ entries

register(
    Backend(
        name="hf",
        module="moralign.predictors.hf",
        description="a local causal LM loaded with from_pretrained (base and fine-tuned conditions)",
        local_weights=True,
        conditions=lambda recipes, quantized: [
            CONDITION_BASE,
            *([CONDITION_BASE_4BIT] if quantized else []),
            *recipes,
        ],
        extract_stage="extract_base",
        extract_inputs=("base",),
        read_stage="read_base",
        check_config=_check_hf,
        same_model=_same_weights,
    )
)
register(
    Backend(
        name="openai",
        module="moralign.predictors.openai",
        description="an OpenAI-compatible chat-completions endpoint (base only; settings in `openai`)",
        local_weights=False,
        conditions=lambda recipes, quantized: [CONDITION_BASE],
        extract_stage="extract_api",
        extract_inputs=("cache",),
        read_stage="read_api",
        # one API job at a time shares the endpoint's rate limit; requests within a job run concurrently
        resources=(("openai_api", 1),),
        check_config=_check_openai,
        same_model=_same_api_model,
    )
)
register(
    Backend(
        name="encoder",
        module="moralign.predictors.encoder",
        description=(
            "a BERT/RoBERTa baseline fine-tuned on the votes the way Scruples did (condition `trained` only; "
            "settings in `encoder`; needs chat_template: false)"
        ),
        local_weights=True,
        conditions=lambda recipes, quantized: [CONDITION_TRAINED],
        check_config=_check_encoder,
        same_model=_same_weights,
    )
)
