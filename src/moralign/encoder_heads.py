"""Encoder heads: which head each task trains, and the task's distribution read from it.

Set-up of Lourie, Le Bras & Choi (AAAI 2021), from their code (allenai/scruples, ``src/scruples/baselines/``:
``bert.py``, ``roberta.py``):

* **Anecdotes** (``anecdotes``, ``anecdotes-5way``): sequence classification with Scruples' five-way head (AUTHOR,
  OTHER, EVERYBODY, NOBODY, INFO), trained on the five-way vote counts for both datasets. ``anecdotes-5way`` reads
  the head directly; the binary ``anecdotes`` collapses it the way the release binarises the votes: WRONG = AUTHOR
  + EVERYBODY, RIGHT = OTHER + NOBODY, INFO dropped, renormalised (:func:`task_log_probs`). A 2-way head trained on
  the binarised counts would be another model than the one Scruples published.
* **Dilemmas**: a multiple-choice head (``*ForMultipleChoice``): each action is scored on its own and the scores
  of the two actions are soft-maxed.

Either loss (:mod:`moralign.encoder_losses`) predicts softmax(logits) = α / Σα with α = exp(logits); a model
trained with the Dirichlet-multinomial loss also predicts how sure it is, Σα (:func:`task_concentration`), which
its predictions keep: the score's ``dirichlet`` is then the model's own likelihood, Scruples' score of such a model.
Kept apart from the model and its training because the predictor and the training step both read a head this way.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moralign.data import ANECDOTE_LABELS, LABEL_COUNTS, TASKS, counts_matrix
from moralign.errors import DataError

HEAD_SEQUENCE, HEAD_CHOICE = "sequence", "choice"
# Tasks read from a head with more labels: each choice is the sum of these head labels (the rest is dropped).
# anecdotes: the release's binarisation (moralign.data checks it on every record), in the task's choice order.
COLLAPSE: dict[str, tuple[tuple[str, ...], ...]] = {"anecdotes": (("AUTHOR", "EVERYBODY"), ("OTHER", "NOBODY"))}
HEAD_LABELS: dict[str, tuple[str, ...]] = {"anecdotes": ANECDOTE_LABELS}


def head_of(dataset: str) -> str:
    """``choice`` for a task whose choices are texts of their own (dilemmas), else ``sequence``."""
    return HEAD_CHOICE if TASKS[dataset].option_fields else HEAD_SEQUENCE


def head_labels(dataset: str) -> tuple[str, ...]:
    """The labels of the head trained for ``dataset`` (one logit each): the task's choices, or Scruples' five."""
    return HEAD_LABELS.get(dataset, TASKS[dataset].choices)


def head_counts(frame: pd.DataFrame, dataset: str) -> np.ndarray:
    """The (items, head labels) vote counts the head of ``dataset`` is trained and selected on."""
    if dataset not in HEAD_LABELS:
        return counts_matrix(frame)
    if LABEL_COUNTS not in frame.columns:
        raise DataError(
            f"the processed {dataset} table has no column {LABEL_COUNTS!r} (the five-way votes the encoder is "
            "trained on): it was prepared by an older moralign; run prepare again"
        )
    return np.stack(frame[LABEL_COUNTS].to_numpy()).astype(np.int64)


def _groups(dataset: str) -> list[list[int]] | None:
    if dataset not in COLLAPSE:
        return None
    labels = head_labels(dataset)
    return [[labels.index(name) for name in group] for group in COLLAPSE[dataset]]


def logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """The log of Σ_j exp(x_ij) per row, shifted by the row's maximum so that large logits do not overflow."""
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def task_log_probs(logits: np.ndarray, dataset: str) -> np.ndarray:
    """The task's log p from the head's (items, labels) logits.

    The softmax of the head, each task choice the sum of its head labels, renormalised over the task's choices
    (INFO dropped, as the binarised votes drop it); for a head that is the task, just log_softmax.
    """
    logp = logits - logsumexp_rows(logits)[:, None]
    groups = _groups(dataset)
    if groups is None:
        return logp
    merged = np.stack([logsumexp_rows(logp[:, g]) for g in groups], axis=1)
    return merged - logsumexp_rows(merged)[:, None]


def task_concentration(logits: np.ndarray, dataset: str) -> np.ndarray:
    """Σα over the task's choices, α = exp(logits) (what a Dirichlet-multinomial head predicts besides p).

    Summing Dirichlet components gives a Dirichlet with the summed α, and the share of WRONG among the binarised
    votes is Beta(α_WRONG, α_RIGHT) whatever INFO gets: so the binary task's concentration is the α of its four
    labels, INFO's left out.
    """
    groups = _groups(dataset)
    columns = list(range(logits.shape[1])) if groups is None else sorted(i for g in groups for i in g)
    return np.exp(logsumexp_rows(logits[:, columns]))
