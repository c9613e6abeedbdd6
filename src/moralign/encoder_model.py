"""An encoder with its head, run on encoded sequences; loading one, and checking a trained one's folder.

Prediction is batched by length under a token budget (:func:`pack`), and every distinct sequence is scored once, in
an order fixed by the sequences themselves: an item's logits do not depend on the order of the items, and swapping a
dilemma's actions swaps its probabilities exactly. On CUDA the forward pass may run in bfloat16 autocast (weights
stay float32); prediction runs at the precision the best epoch was selected with (:func:`prediction_autocast`), so
the selected model is the one scored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moralign.encoder_heads import HEAD_CHOICE, head_labels, head_of
from moralign.encoder_inputs import Unit
from moralign.errors import DataError
from moralign.io import read_json

# A trained encoder's record in its folder (written by the train_encoder step, checked by check_trained).
METADATA = "metadata.json"


def prediction_autocast(trained_autocast: bool, device: torch.device) -> bool:
    """Whether prediction runs in bfloat16 autocast: where training selected its epoch that way, on CUDA.

    Weights are always float32, as in training. bfloat16 autocast is CUDA's (training refuses it elsewhere); a
    model trained so but predicted on a CPU runs in float32, the closest precision there.
    """
    return trained_autocast and device.type == "cuda"


def pack(lengths: Sequence[int], widths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Items grouped longest-first so that ``sequences x longest sequence`` stays within ``token_budget``.

    ``lengths[i]`` is item i's longest sequence, ``widths[i]`` its number of sequences (kept in one group). A group
    always takes at least one item, however long. Training cuts its optimiser batches into micro-batches by the same
    rule.
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
