"""Encoder baselines (BERT, RoBERTa) trained on the vote distributions the way Scruples trained them.

Set-up of Lourie, Le Bras & Choi (AAAI 2021), from their code (allenai/scruples, ``src/scruples/baselines/``:
``bert.py``, ``roberta.py``, ``loss.py``, ``train.py``; ``src/scruples/dataset/transforms.py``):

* **Anecdotes** (``anecdotes``, ``anecdotes-5way``): sequence classification over the pair (title, text) with
  Scruples' five-way head (AUTHOR, OTHER, EVERYBODY, NOBODY, INFO), trained on the five-way vote counts for both
  datasets. ``anecdotes-5way`` reads the head directly; the binary ``anecdotes`` collapses it the way the release
  binarises the votes: WRONG = AUTHOR + EVERYBODY, RIGHT = OTHER + NOBODY, INFO dropped, renormalised
  (:func:`task_log_probs`). A 2-way head trained on the binarised counts would be another model than the one
  Scruples published. Inputs are at most ``max_length`` = 512 tokens, special tokens included. As
  in Scruples' ``BertTransform`` (truncation strategy ``beginning`` for both pieces), the BEGINNING of each piece
  is kept: each piece may use half the room and the other's unused half, so a short title is kept whole and the
  text loses its end. An item with an empty text is encoded as the title alone.
* **Dilemmas**: a multiple-choice head (``*ForMultipleChoice``): each action is encoded on its own
  (``[CLS] action [SEP]``, at most 96 tokens in Scruples' BERT ranker, 90 in its RoBERTa ranker), scored by the
  head, and the scores of the two actions are soft-maxed. Swapping the actions swaps the probabilities exactly:
  every distinct action is scored once per call, in an order that does not depend on the items' order.
* **Losses** (``loss.py``): ``xentropy-soft``, cross-entropy against the vote distribution (the default), and
  ``dirichlet-multinomial``, the negative log-likelihood of the votes under a Dirichlet-multinomial with
  α = exp(logits), without the multinomial coefficient (Scruples' form; it does not depend on the model). Either
  way the predicted distribution is softmax(logits) = α / Σα. A model trained with the Dirichlet-multinomial loss
  also predicts how sure it is, Σα, which its predictions keep (:func:`task_concentration`): the score's
  ``dirichlet`` is then the model's own likelihood, Scruples' score of such a model.
* **Optimisation** (``train.py``): AdamW with no weight decay on biases and LayerNorm weights, a linear warm-up
  over ``warmup_proportion`` of the steps then linear decay to 0, a fixed number of epochs with the dev set
  evaluated after each; the epoch with the best dev *calibrated* xentropy is kept (Scruples' criterion: the
  xentropy after one temperature fitted on the dev logits themselves, :func:`calibrated_xentropy`), so an epoch
  is judged by what its scores rank, not by how sharp they happen to be. A diverged (NaN) loss stops the job with
  an error instead of producing a row.

Beyond Scruples, for speed: batches are length-sorted (items are drawn in random pools of
:data:`POOL_BATCHES` batches, sorted by length inside a pool, cut into batches whose order is shuffled), and every
optimiser batch is run in micro-batches under ``token_budget`` padded tokens with gradient accumulation (Scruples
accumulated over fixed micro-batches of 2); on CUDA the forward pass runs in bfloat16 autocast (weights and AdamW
state stay float32). Prediction runs at the precision the best epoch was selected with (float32 weights, and the
same autocast when it runs on CUDA: :func:`prediction_autocast`), so the selected model is the one scored.
Item text is always plain text: a ``[SEP]``, ``</s>`` or ``<s>`` written in a post is tokenized as its
characters, never as the special token it spells (only the tokenizer's post-processor adds special tokens).
Training checkpoints everything (weights, optimiser, schedule, random state, best epoch so far)
every ``checkpoint_steps`` optimiser steps and after every epoch; a killed job resumes from its last checkpoint
and ends with the same weights and predictions as an uninterrupted one (each epoch's batches are a function of the
seed and the epoch; bit for bit on a CPU, up to the few CUDA kernels without a deterministic version on a GPU).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from moralign import metrics
from moralign.data import ANECDOTE_LABELS, LABEL_COUNTS, TASKS, counts_matrix
from moralign.errors import DataError
from moralign.io import atomic_path, read_json

log = logging.getLogger(__name__)

LOSSES = ("xentropy-soft", "dirichlet-multinomial")
HEAD_SEQUENCE, HEAD_CHOICE = "sequence", "choice"
PAIR_FIELDS = ("title", "text")  # the anecdote pair, in Scruples' order
# Items are length-sorted within random pools of this many batches: batches pad little, yet every batch still
# mixes items from across the split.
POOL_BATCHES = 16
METADATA = "metadata.json"
# The epoch kept is the one with the lowest value of this dev metric (Scruples' criterion).
SELECTION = "dev_calibrated_xentropy"
# Tasks read from a head with more labels: each choice is the sum of these head labels (the rest is dropped).
# anecdotes: the release's binarisation (moralign.data checks it on every record), in the task's choice order.
COLLAPSE: dict[str, tuple[tuple[str, ...], ...]] = {"anecdotes": (("AUTHOR", "EVERYBODY"), ("OTHER", "NOBODY"))}
HEAD_LABELS: dict[str, tuple[str, ...]] = {"anecdotes": ANECDOTE_LABELS}

Unit = tuple[list[int], list[int]]  # token ids and token type ids of one encoded sequence


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


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def task_log_probs(logits: np.ndarray, dataset: str) -> np.ndarray:
    """The task's log p from the head's (items, labels) logits.

    The softmax of the head, each task choice the sum of its head labels, renormalised over the task's choices
    (INFO dropped, as the binarised votes drop it); for a head that is the task, just log_softmax.
    """
    logp = logits - _logsumexp(logits)[:, None]
    groups = _groups(dataset)
    if groups is None:
        return logp
    merged = np.stack([_logsumexp(logp[:, g]) for g in groups], axis=1)
    return merged - _logsumexp(merged)[:, None]


def task_concentration(logits: np.ndarray, dataset: str) -> np.ndarray:
    """Σα over the task's choices, α = exp(logits) (what a Dirichlet-multinomial head predicts besides p).

    Summing Dirichlet components gives a Dirichlet with the summed α, and the share of WRONG among the binarised
    votes is Beta(α_WRONG, α_RIGHT) whatever INFO gets: so the binary task's concentration is the α of its four
    labels, INFO's left out.
    """
    groups = _groups(dataset)
    columns = list(range(logits.shape[1])) if groups is None else sorted(i for g in groups for i in g)
    return np.exp(_logsumexp(logits[:, columns]))


def prediction_autocast(trained_autocast: bool, device: torch.device) -> bool:
    """Whether prediction runs in bfloat16 autocast: where training selected its epoch that way, on CUDA.

    Weights are always float32, as in training. bfloat16 autocast is CUDA's (training refuses it elsewhere); a
    model trained so but predicted on a CPU runs in float32, the closest precision there.
    """
    return trained_autocast and device.type == "cuda"


def max_length_of(settings: dict[str, Any], dataset: str) -> int:
    """The ``encoder.max_length`` of a dataset's source (anecdotes-5way shares the anecdotes' length)."""
    return settings["max_length"][TASKS[dataset].archive]


# ----------------------------------------------------------------------------------------------------- inputs


def pair_room(n_first: int, n_second: int, room: int) -> tuple[int, int]:
    """Tokens kept of each piece of a pair with ``room`` tokens besides the special ones (Scruples' rule).

    Each piece may use half the room, plus whatever the other piece leaves of its half.
    """
    keep_first = max(room // 2, room - n_second)
    keep_second = max(room // 2, room - n_first)
    return min(n_first, keep_first), min(n_second, keep_second)


class InputEncoder:
    """Encodes the items of a processed split as the model reads them (see the module docstring)."""

    def __init__(self, tokenizer: Any, dataset: str, max_length: int) -> None:
        self.dataset, self.max_length = dataset, max_length
        self.head = head_of(dataset)
        self.task = TASKS[dataset]
        # the tokenizer's own post-processor adds the special tokens ([CLS] A [SEP] B [SEP] / <s> A </s></s> B </s>)
        self.backend = copy.deepcopy(tokenizer.backend_tokenizer)
        self.backend.no_truncation()
        self.backend.no_padding()
        # item text is text: a post that writes "[SEP]" or "</s>" gets those characters, not the special token
        # (which would end a segment early); the post-processor still adds the real ones around each piece
        self.backend.encode_special_tokens = True

    def _encode(self, texts: Sequence[str]) -> list[Any]:
        return self.backend.encode_batch(list(texts), add_special_tokens=False)

    def _single(self, encoding: Any) -> Unit:
        encoding.truncate(self.max_length - self.backend.num_special_tokens_to_add(False), 0, "right")
        out = self.backend.post_process(encoding, None, add_special_tokens=True)
        return list(out.ids), list(out.type_ids)

    def _pair(self, first: Any, second: Any) -> Unit:
        if not second.ids:  # Scruples encodes an empty text as the title alone
            return self._single(first)
        room = self.max_length - self.backend.num_special_tokens_to_add(True)
        keep_first, keep_second = pair_room(len(first.ids), len(second.ids), room)
        first.truncate(keep_first, 0, "right")
        second.truncate(keep_second, 0, "right")
        out = self.backend.post_process(first, second, add_special_tokens=True)
        return list(out.ids), list(out.type_ids)

    def encode(self, frame: pd.DataFrame) -> list[list[Unit]]:
        """Per item, its encoded sequences: one (title, text) pair, or one per option (in choice order)."""
        if self.head == HEAD_CHOICE:
            columns = [[self._single(e) for e in self._encode(frame[f])] for f in self.task.option_fields]
            return [list(units) for units in zip(*columns, strict=True)]
        firsts, seconds = (self._encode(frame[f]) for f in PAIR_FIELDS)
        return [[self._pair(a, b)] for a, b in zip(firsts, seconds, strict=True)]

    def describe(self, units: list[Unit], tokenizer: Any) -> str:
        """The sequences of one item as the model reads them (special tokens shown)."""
        return "\n".join(tokenizer.decode(ids, skip_special_tokens=False) for ids, _ in units)


# ------------------------------------------------------------------------------------------------------ losses


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
    logp = logits - _logsumexp(logits)[:, None]
    temperature = metrics.fit_temperature(h, logp)
    return xentropy(logits / temperature, counts), temperature


def better(record: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Whether an epoch's dev ``record`` beats the ``best`` so far under :data:`SELECTION` (ties: the earlier)."""
    return best is None or record[SELECTION] < best[SELECTION]


# ---------------------------------------------------------------------------------------------------- batching


def pack(lengths: Sequence[int], widths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Items grouped longest-first so that ``sequences x longest sequence`` stays within ``token_budget``.

    ``lengths[i]`` is item i's longest sequence, ``widths[i]`` its number of sequences (kept in one group). A group
    always takes at least one item, however long.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (rows + widths[i]) * longest > token_budget:
            groups.append(current)
            current, rows = [], 0
        current.append(i)
        rows += widths[i]
    if current:
        groups.append(current)
    return groups


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The optimiser batches of one epoch: a function of ``seed`` and ``epoch`` only (resuming redraws them).

    Random pools of :data:`POOL_BATCHES` batches, length-sorted inside, cut into batches, in shuffled order.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    pool = batch_size * POOL_BATCHES
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool].tolist(), key=lambda i: lengths[i])  # stable: ties stay random
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]


def _pad(units: Sequence[Unit], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ids, token types and attention mask (encoders number positions from the left)."""
    width = max(len(ids) for ids, _ in units)
    ids = torch.full((len(units), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(units), width), dtype=torch.long)
    mask = torch.zeros((len(units), width), dtype=torch.long)
    for k, (row, row_types) in enumerate(units):
        ids[k, : len(row)] = torch.tensor(row)
        types[k, : len(row)] = torch.tensor(row_types)
        mask[k, : len(row)] = 1
    return {"input_ids": ids.to(device), "token_type_ids": types.to(device), "attention_mask": mask.to(device)}


@dataclass
class EncoderModel:
    """A sequence-classification or multiple-choice encoder with what it needs to run on a list of sequences."""

    net: Any
    head: str
    pad_id: int
    autocast: bool = False  # bfloat16 autocast on CUDA (training keeps float32 weights)

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return next(self.net.parameters()).device

    def _context(self) -> contextlib.AbstractContextManager:
        if self.autocast:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def logits(self, units: Sequence[Unit]) -> torch.Tensor:
        """One logit vector per sequence (sequence head), or one score per sequence (choice head), in float32."""
        batch = _pad(units, self.pad_id, self.device)
        if self.net.config.type_vocab_size < 2:  # RoBERTa has one token type: leave the ids out, as Scruples did
            batch.pop("token_type_ids")
        with self._context():
            if self.head == HEAD_CHOICE:
                # (sequences, 1 choice, length): the head scores every sequence on its own
                out = self.net(**{k: v[:, None] for k, v in batch.items()}).logits[:, 0]
            else:
                out = self.net(**batch).logits
        return out.float()

    def item_logits(self, items: Sequence[list[Unit]]) -> torch.Tensor:
        """(items, choices) logits of items given whole (every option of a dilemma in one call)."""
        flat = [u for units in items for u in units]
        out = self.logits(flat)
        return out.view(len(items), -1) if self.head == HEAD_CHOICE else out

    def predict(self, items: Sequence[list[Unit]], token_budget: int) -> np.ndarray:
        """(items, choices) logits in float64, batched by length under ``token_budget``, in eval mode.

        Every distinct sequence is scored once, in an order fixed by the sequences themselves (length, then ids),
        so an item's logits do not depend on the order of the items or of its options.
        """
        distinct = sorted(
            {tuple(ids): (ids, types) for units in items for ids, types in units}.values(),
            key=lambda u: (-len(u[0]), u[0]),
        )
        index = {tuple(ids): k for k, (ids, _) in enumerate(distinct)}
        groups = pack([len(ids) for ids, _ in distinct], [1] * len(distinct), token_budget)
        scores: list[np.ndarray | None] = [None] * len(distinct)
        was_training = self.net.training
        self.net.eval()
        with torch.inference_mode():
            for group in groups:
                out = self.logits([distinct[k] for k in group]).double().cpu().numpy()
                for k, row in zip(group, out, strict=True):
                    scores[k] = row
        self.net.train(was_training)
        table = np.array(scores)
        if self.head == HEAD_CHOICE:
            return np.array([[table[index[tuple(ids)]] for ids, _ in units] for units in items], dtype=np.float64)
        return np.array([table[index[tuple(units[0][0])]] for units in items], dtype=np.float64)


def load_model(
    folder: str | Path, dataset: str, device: torch.device, dtype: torch.dtype = torch.float32, autocast: bool = False
) -> EncoderModel:
    """The head of ``dataset`` on the encoder in ``folder`` (a pretrained encoder gets a new, seeded head)."""
    from transformers import AutoConfig, AutoModelForMultipleChoice, AutoModelForSequenceClassification

    head = head_of(dataset)
    choices = head_labels(dataset)
    if head == HEAD_CHOICE:
        net = AutoModelForMultipleChoice.from_pretrained(str(folder), dtype=dtype)
    else:
        labels = {"num_labels": len(choices), "id2label": dict(enumerate(choices))}
        labels["label2id"] = {c: i for i, c in labels["id2label"].items()}
        net = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=dtype, **labels)
    pad_id = AutoConfig.from_pretrained(str(folder)).pad_token_id
    return EncoderModel(net.to(device), head, 0 if pad_id is None else pad_id, autocast)


# ---------------------------------------------------------------------------------------------------- training


@dataclass
class Split:
    """The encoded items of one split, their vote counts and each item's longest sequence (``lengths``)."""

    items: list[list[Unit]]
    counts: np.ndarray
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = [max(len(ids) for ids, _ in units) for units in self.items]


def parameter_groups(net: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases and LayerNorm weights, ``weight_decay`` on the rest (as Scruples)."""

    def exempt(name: str) -> bool:
        return name.endswith("bias") or "layernorm" in name.lower().replace("_", "")

    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exempt(n)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exempt(n)], "weight_decay": weight_decay},
    ]


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj: Any, path: Path) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(obj, tmp)


@dataclass
class Trainer:
    """Fine-tunes an :class:`EncoderModel` with checkpoints in ``checkpoints`` (see the module docstring)."""

    model: EncoderModel
    settings: dict[str, Any]
    checkpoints: Path
    fingerprint: str  # of everything that decides the result; a checkpoint of anything else is not resumed

    def __post_init__(self) -> None:
        s = self.settings
        if s["loss"] not in LOSS_FUNCTIONS:
            raise ValueError(f"encoder.loss {s['loss']!r}: not one of {LOSSES}")
        self.loss = LOSS_FUNCTIONS[s["loss"]]
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model.net, s["weight_decay"]), lr=s["learning_rate"])

    def _micro_batches(self, train: Split, batch: list[int]) -> Iterator[list[int]]:
        lengths = [train.lengths[i] for i in batch]
        widths = [len(train.items[i]) for i in batch]
        for group in pack(lengths, widths, self.settings["token_budget"]):
            yield [batch[k] for k in group]

    def schedule(self, total_steps: int) -> None:
        """Set the learning-rate schedule for ``total_steps`` optimiser steps (warm-up, then linear decay)."""
        warmup = int(self.settings["warmup_proportion"] * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(warmup, total_steps))

    def step(self, train: Split, batch: list[int]) -> tuple[float, int]:
        """One optimiser step over ``batch``: the mean loss over its items, accumulated over micro-batches.

        Returns the loss and the tokens run (without padding).
        """
        total, tokens = 0.0, 0
        for micro in self._micro_batches(train, batch):
            logits = self.model.item_logits([train.items[i] for i in micro])
            counts = torch.tensor(train.counts[micro], dtype=torch.float32, device=logits.device)
            loss = self.loss(logits, counts).sum() / len(batch)
            loss.backward()
            total += float(loss.detach())
            tokens += sum(len(ids) for i in micro for ids, _ in train.items[i])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if not math.isfinite(total):
            raise RuntimeError(
                f"training diverged (loss {total}) at step {self.scheduler.last_epoch}: lower encoder.learning_rate "
                f"({self.settings['learning_rate']})"
            )
        return total, tokens

    def _checkpoint(self, state: dict[str, Any]) -> None:
        state = {
            **state,
            "fingerprint": self.fingerprint,
            "model": self.model.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
        }
        _save(state, self.checkpoints / "last.pt")

    def _resume(self) -> dict[str, Any] | None:
        path = self.checkpoints / "last.pt"
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            log.info("%s: checkpoints of other settings or data; starting over", self.checkpoints)
            shutil.rmtree(self.checkpoints)
            return None
        self.model.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        log.info(
            "resuming from the checkpoint taken after %d epoch(s) and %d batch(es)", state["epoch"], state["batch"]
        )
        return {k: state[k] for k in ("epoch", "batch", "best", "history", "losses", "tokens")}

    def train(self, train: Split, dev: Split) -> dict[str, Any]:
        """Train for ``epochs``; leaves the best epoch's weights in the model; returns the training record."""
        s = self.settings
        per_epoch = math.ceil(len(train.items) / s["batch_size"])
        total = s["epochs"] * per_epoch
        self.schedule(total)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        fresh = {"epoch": 0, "batch": 0, "best": None, "history": [], "losses": [], "tokens": 0}
        state = self._resume() or fresh
        resumed_from = (state["epoch"], state["batch"]) if state["epoch"] or state["batch"] else None
        self.model.net.train()
        t0 = time.perf_counter()
        for epoch in range(state["epoch"], s["epochs"]):
            batches = epoch_batches(train.lengths, s["batch_size"], s["seed"], epoch)
            losses, tokens, t_epoch = list(state["losses"]), state["tokens"], time.perf_counter()
            tokens_before = tokens  # of this epoch, trained before a resume
            for b in range(state["batch"], len(batches)):
                loss, n = self.step(train, batches[b])
                losses.append(loss)
                tokens += n
                if s["checkpoint_steps"] and (b + 1) % s["checkpoint_steps"] == 0 and b + 1 < len(batches):
                    self._checkpoint({**state, "epoch": epoch, "batch": b + 1, "losses": losses, "tokens": tokens})
            seconds = time.perf_counter() - t_epoch
            dev_logits = self.model.predict(dev.items, s["token_budget"])
            calibrated, temperature = calibrated_xentropy(dev_logits, dev.counts)
            record = {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)) if losses else None,
                "dev_xentropy": xentropy(dev_logits, dev.counts),
                "dev_calibrated_xentropy": calibrated,
                "dev_temperature": temperature,
                "dev_loss": float(
                    self.loss(torch.from_numpy(dev_logits), torch.from_numpy(dev.counts.astype(np.float64))).mean()
                ),
                "train_tokens": tokens,
                "train_tokens_per_second": round((tokens - tokens_before) / seconds) if seconds > 0 else None,
            }
            log.info("epoch %d/%d: %s", epoch + 1, s["epochs"], record)
            history = [*state["history"], record]
            best = state["best"]
            if better(record, best):
                best = {k: record[k] for k in ("epoch", "dev_xentropy", "dev_calibrated_xentropy", "dev_temperature")}
                _save(self.model.net.state_dict(), self.checkpoints / "best.pt")
            state = {"epoch": epoch + 1, "batch": 0, "best": best, "history": history, "losses": [], "tokens": 0}
            self._checkpoint(state)
        best_weights = torch.load(self.checkpoints / "best.pt", map_location="cpu", weights_only=True)
        self.model.net.load_state_dict(best_weights)
        self.model.net.eval()
        return {
            "steps": total,
            "steps_per_epoch": per_epoch,
            "selection": SELECTION,
            "best_epoch": state["best"]["epoch"],
            "best_dev_xentropy": state["best"]["dev_xentropy"],
            "best_dev_calibrated_xentropy": state["best"]["dev_calibrated_xentropy"],
            "best_dev_temperature": state["best"]["dev_temperature"],
            "history": state["history"],
            "resumed_from": {"epoch": resumed_from[0], "batch": resumed_from[1]} if resumed_from else None,
            "wall_seconds": round(time.perf_counter() - t0, 2),
        }


# ------------------------------------------------------------------------------------------------ trained folders


def check_trained(folder: str | Path, base_dir: str | Path, dataset: str) -> dict[str, Any]:
    """The metadata of a trained encoder folder, checked against its base model folder and dataset."""
    from moralign.modelfiles import base_identity, describe_base

    folder = Path(folder)
    if not (folder / METADATA).is_file():
        raise DataError(f"{folder}: no {METADATA}: not an encoder folder written by train_encoder")
    meta = read_json(folder / METADATA)
    if meta.get("dataset") != dataset:
        raise DataError(f"{folder}: trained on {meta.get('dataset')!r}, not {dataset!r}")
    if meta.get("head_labels") != list(head_labels(dataset)):
        raise DataError(
            f"{folder}: its head has the labels {meta.get('head_labels')}, not {list(head_labels(dataset))} "
            "(trained by an older moralign?): run train_encoder again"
        )
    base = base_identity(base_dir)
    if (meta.get("base") or {}).get("weights") != base["weights"]:
        raise DataError(
            f"{folder}: trained from {describe_base(meta.get('base') or {})}, but {base_dir} holds "
            f"{describe_base(base)}: pass the base model it was trained from"
        )
    return meta
