"""Encoder losses and the dev criterion that picks the epoch kept.

From Scruples' ``src/scruples/baselines/loss.py`` and ``train.py``:

* ``xentropy-soft``, cross-entropy against the vote distribution (the default), and ``dirichlet-multinomial``, the
  negative log-likelihood of the votes under a Dirichlet-multinomial with α = exp(logits), without the multinomial
  coefficient (Scruples' form; it does not depend on the model). Either way the predicted distribution is
  softmax(logits) = α / Σα.
* The epoch kept is the one with the best dev *calibrated* xentropy (Scruples' criterion: the xentropy after one
  temperature fitted on the dev logits themselves, :func:`calibrated_xentropy`), so an epoch is judged by what its
  scores rank, not by how sharp they happen to be.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from moralign import metrics
from moralign.encoder_heads import logsumexp_rows

LOSSES = ("xentropy-soft", "dirichlet-multinomial")
# The epoch kept is the one with the lowest value of this dev metric (Scruples' criterion).
SELECTION = "dev_calibrated_xentropy"


def soft_xentropy(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per item: −Σ_j h_j log softmax(logits)_j with h = counts / N (Scruples' ``SoftCrossEntropyLoss``)."""
    target = counts / counts.sum(-1, keepdim=True)
    return -(target * torch.log_softmax(logits, dim=-1)).sum(-1)


def dirichlet_multinomial_nll(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per item: −log P(votes) under a Dirichlet-multinomial with α = exp(logits), no multinomial coefficient.

    Scruples' ``DirichletMultinomialLoss``: −[lnΓ(Σα) − lnΓ(Σα + N) + Σ_j (lnΓ(α_j + y_j) − lnΓ(α_j))].
    """
    alpha = torch.exp(logits)
    return -(
        torch.lgamma(alpha.sum(-1))
        - torch.lgamma((alpha + counts).sum(-1))
        + (torch.lgamma(alpha + counts) - torch.lgamma(alpha)).sum(-1)
    )


LOSS_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "xentropy-soft": soft_xentropy,
    "dirichlet-multinomial": dirichlet_multinomial_nll,
}


def xentropy(logits: np.ndarray, counts: np.ndarray) -> float:
    """Mean soft-label cross-entropy of softmax(logits) against the vote distributions."""
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(-(counts / counts.sum(-1, keepdims=True) * logp).sum(-1).mean())


def calibrated_xentropy(logits: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """Scruples' selection metric: xentropy of softmax(logits / T), T fitted on these items; returns (value, T)."""
    h = counts / counts.sum(-1, keepdims=True)
    logp = logits - logsumexp_rows(logits)[:, None]
    temperature = metrics.fit_temperature(h, logp)
    return xentropy(logits / temperature, counts), temperature


def better(record: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Whether an epoch's dev ``record`` beats the ``best`` so far under :data:`SELECTION` (ties: the earlier)."""
    return best is None or record[SELECTION] < best[SELECTION]
