"""The metric registry: each metric declared once (lm-evaluation-harness' ``@register_metric`` idea).

A metric declares its direction, its function, its format and whether the BEST oracle bounds it.

The metrics themselves are registered in moralign.metrics, next to their functions; read the registry through
``moralign.metrics`` (``names()``, ``lower_is_better()``, ``best_floors()``), which is complete once imported.
Tables, figures and both bootstraps iterate over it, so a registered metric cannot go missing from the table.
docs/extending.md shows how to add one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ItemContext:
    """What a per-item metric sees.

    The votes, their distribution, the model's log p and coverage, the T and c fitted on dev, the majority labels
    (-1 on a tie) and, for a model that predicts alpha, its per-item sum.
    """

    counts: np.ndarray
    h: np.ndarray
    logp: np.ndarray
    coverage: np.ndarray
    temperature: float
    concentration: float
    labels: np.ndarray
    own_concentration: np.ndarray | None = None


@dataclass(frozen=True)
class Metric:
    """A metric, declared once: every table, figure and bootstrap reads it from :data:`REGISTRY`.

    ``per_item`` gives one value per item (the metric is their mean; NaN only where ``excludes_ties`` and the
    human majority is tied); a metric of the whole set (macro-F1) gives ``whole_set(shares, labels, idx)`` instead:
    one value, or one per bootstrap resample with ``idx`` (resamples x items). ``best_bounds``: BEST is a floor
    (or ceiling) no predictor can beat in expectation, so the table prints it; ``decimals``: its table format.
    """

    name: str
    lower_is_better: bool
    per_item: Callable[[ItemContext], np.ndarray] | None = None
    whole_set: Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray] | None = None
    excludes_ties: bool = False
    best_bounds: bool = False
    decimals: int = 3


REGISTRY: dict[str, Metric] = {}


def register_metric(
    name: str,
    *,
    lower_is_better: bool,
    whole_set: bool = False,
    excludes_ties: bool = False,
    best_bounds: bool = False,
    decimals: int = 3,
) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(ctx: ItemContext) -> per-item values`` (or ``fn(shares, labels, idx)`` with ``whole_set``)."""

    def register(fn: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"metric {name!r} is registered twice")
        REGISTRY[name] = Metric(
            name,
            lower_is_better,
            per_item=None if whole_set else fn,
            whole_set=fn if whole_set else None,
            excludes_ties=excludes_ties,
            best_bounds=best_bounds,
            decimals=decimals,
        )
        return fn

    return register
