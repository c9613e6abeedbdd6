"""Predictors: the ways of turning the items of one split into a model's distribution over the answers.

A predictor is built once per (model, dataset, condition) cell and, for any slice of a split's items, returns
the predictions frame every later step reads (docs/design.md, "Prediction files"): ``id, logp_choice, coverage,
p, n_prompt_tokens``.
Its ``provenance`` (model identity, template hash, dtype, library versions, ...) goes into every prediction file.

A backend is one module of this package with a ``build(...)`` function (``hf``: local causal LMs, with or
without a LoRA adapter; ``openai``: any OpenAI-compatible chat-completions endpoint; ``encoder``: the Scruples
baselines) and one entry in the backend registry (moralign.backends), which names the module. The extract step
imports it by that name, the stage table declares it as the cell's code dependency, and a new backend never
touches the steps (docs/extending.md).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from moralign import backends
from moralign.config import Config


class Predictor(ABC):
    """Answer distributions for items of one (model, dataset, condition) cell."""

    provenance: dict[str, Any]

    @abstractmethod
    def predict(self, items: pd.DataFrame) -> pd.DataFrame:
        """The predictions frame of ``items`` (rows of a processed split), in their order."""

    def examples(self, items: pd.DataFrame) -> str:
        """The rendered inputs of ``items``, for a human to read (written next to the predictions)."""
        return ""

    def plan(self, splits: Mapping[str, pd.DataFrame]) -> dict[str, Any]:
        """What predicting ``splits`` will take, stated before anything runs (logged; ``extract --dry-run`` prints it).

        A backend that spends money counts its requests, tokens and cost here, and refuses (in ``predict``) a run
        its limits do not allow.
        """
        return {"items": {split: len(frame) for split, frame in splits.items()}}

    def summarise(self, predictions: pd.DataFrame) -> dict[str, Any]:
        """Backend-specific facts about one split's predictions, added to the split's entry in ``summary.json``."""
        return {}


@dataclass(frozen=True)
class CellInputs:
    """What a predictor may need: the processed data, the model's files (absent for API models), a response cache.

    ``cache_dir`` (API models) lies outside the step's declared outputs, which both orchestrators delete before
    rerunning a step: cached responses survive reruns and interrupted runs.
    """

    data_dir: Path
    base_dir: Path | None = None
    adapter_dir: Path | None = None
    cache_dir: Path | None = None
    # the base weights the plan scores an adapter on ("none" or "4bit": those it was trained on)
    base_quantization: str | None = None


def build(cfg: Config, model: str, dataset: str, condition: str, inputs: CellInputs) -> Predictor:
    """The predictor of one cell, from the backend its model entry names."""
    module = importlib.import_module(backends.get(cfg.backend(model)).module)
    return module.build(cfg, model, dataset, condition, inputs)
