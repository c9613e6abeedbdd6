"""Encoder training, the way Scruples trained its baselines, resumable from its last checkpoint.

From Scruples' ``src/scruples/baselines/train.py``: AdamW with no weight decay on biases and LayerNorm weights, a
linear warm-up over ``warmup_proportion`` of the steps then linear decay to 0, a fixed number of epochs with the dev
set evaluated after each; the epoch kept is the one :mod:`moralign.encoder_losses` selects. A diverged (NaN) loss
stops the job with an error instead of producing a row.

Beyond Scruples, for speed: batches are length-sorted (items are drawn in random pools of :data:`POOL_BATCHES`
batches, sorted by length inside a pool, cut into batches whose order is shuffled), and every optimiser batch is run
in micro-batches under ``token_budget`` padded tokens with gradient accumulation (Scruples accumulated over fixed
micro-batches of 2); on CUDA the forward pass runs in bfloat16 autocast (weights and AdamW state stay float32).
Training checkpoints everything (weights, optimiser, schedule, random state, best epoch so far) every
``checkpoint_steps`` optimiser steps and after every epoch; a killed job resumes from its last checkpoint and ends
with the same weights and predictions as an uninterrupted one (each epoch's batches are a function of the seed and
the epoch; bit for bit on a CPU, up to the few CUDA kernels without a deterministic version on a GPU).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moralign.encoder_inputs import Unit
from moralign.encoder_losses import LOSS_FUNCTIONS, LOSSES, SELECTION, better, calibrated_xentropy, xentropy
from moralign.encoder_model import EncoderModel, pack
from moralign.io import atomic_path

log = logging.getLogger(__name__)

# Items are length-sorted within random pools of this many batches: batches pad little, yet every batch still
# mixes items from across the split.
POOL_BATCHES = 16


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
