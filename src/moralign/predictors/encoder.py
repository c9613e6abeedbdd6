"""Fine-tuned encoders (BERT, RoBERTa) trained by ``train_encoder``: the head's softmax is the distribution.

``logp_choice`` = log_softmax of the head's logits (Scruples' five-way anecdote head collapsed to WRONG / RIGHT
for ``anecdotes``: :func:`moralign.encoder_heads.task_log_probs`), so ``coverage`` is 1: an encoder head has no
other answers. A model trained with the Dirichlet-multinomial loss also writes ``concentration`` (Σα, α =
exp(logits), over the task's choices), which the score's ``dirichlet`` uses as the model's own α = Σα · p.
Inputs are encoded exactly as in training (moralign.encoder_inputs: the truncation length recorded in the trained
folder's metadata). Batches are length-sorted under ``extract.token_budget``. The model runs at the precision its
epoch was selected with: float32 weights, with bfloat16 autocast on CUDA where training used it
(:func:`moralign.encoder_model.prediction_autocast`); ``extract.dtype`` (the causal LMs' weight dtype) does not apply.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from moralign.config import CONDITION_TRAINED, Config, ConfigError
from moralign.encoder_heads import task_concentration, task_log_probs
from moralign.encoder_inputs import InputEncoder
from moralign.encoder_model import EncoderModel, check_trained, load_model, prediction_autocast
from moralign.errors import DataError
from moralign.io import environment
from moralign.predictors import CellInputs, Predictor

log = logging.getLogger(__name__)
CONCENTRATION = "concentration"  # the predictions' column of Σα (Dirichlet-multinomial models only)


class EncoderPredictor(Predictor):
    """Scores items with a trained encoder; see the module docstring."""

    def __init__(
        self,
        model: EncoderModel,
        encoder: InputEncoder,
        tokenizer: Any,
        token_budget: int,
        concentration: bool = False,
    ) -> None:
        self.model, self.encoder, self.tokenizer, self.token_budget = model, encoder, tokenizer, token_budget
        self.concentration = concentration
        self.provenance: dict[str, Any] = {
            "head": encoder.head,
            "max_length": encoder.max_length,
            "dtype": str(next(model.net.parameters()).dtype).removeprefix("torch."),
            "autocast": "bfloat16" if model.autocast else None,
        }

    def predict(self, items: pd.DataFrame) -> pd.DataFrame:
        """See :meth:`Predictor.predict`."""
        units = self.encoder.encode(items)
        logits = self.model.predict(units, self.token_budget)
        logp = task_log_probs(logits, self.encoder.dataset)
        frame = pd.DataFrame(
            {
                "id": list(items["id"]),
                "logp_choice": list(logp),
                "coverage": np.ones(len(items)),
                "p": list(np.exp(logp)),
                "n_prompt_tokens": [sum(len(ids) for ids, _ in u) for u in units],
            }
        )
        if self.concentration:
            frame[CONCENTRATION] = task_concentration(logits, self.encoder.dataset)
        return frame

    def examples(self, items: pd.DataFrame) -> str:
        """The encoded sequences, decoded with their special tokens, exactly as the model reads them."""
        units = self.encoder.encode(items)
        return "\n".join(
            f"===== {i} =====\n{self.encoder.describe(u, self.tokenizer)}\n"
            for i, u in zip(items["id"], units, strict=True)
        )


def build(cfg: Config, model: str, dataset: str, condition: str, inputs: CellInputs) -> EncoderPredictor:
    """Load the trained encoder (``inputs.adapter_dir``) after checking it against its base model folder."""
    import torch

    from moralign.modelfiles import base_identity, trained_identity
    from moralign.modeling import configure_torch, load_tokenizer, resolve_device

    if condition != CONDITION_TRAINED:
        raise ConfigError(f"{model}: an encoder model has only the condition {CONDITION_TRAINED!r}, not {condition!r}")
    if inputs.adapter_dir is None or inputs.base_dir is None:
        raise DataError(f"{model}: an encoder cell needs its base model (--base) and trained encoder (--adapter)")
    meta = check_trained(inputs.adapter_dir, inputs.base_dir, dataset)
    settings = cfg["extract"]
    device = resolve_device(settings["device"])
    runtime = configure_torch(settings["threads"], device)
    trained_autocast = bool(meta["runtime"].get("bf16_autocast"))
    autocast = prediction_autocast(trained_autocast, device)
    if trained_autocast and not autocast:
        log.info("%s: trained with bfloat16 autocast on CUDA, predicted on %s in float32", model, device.type)
    tokenizer = load_tokenizer(str(inputs.adapter_dir))
    net = load_model(inputs.adapter_dir, dataset, device, torch.float32, autocast)
    encoder = InputEncoder(tokenizer, dataset, meta["max_length"])
    loss = meta["hyperparameters"]["loss"]
    predictor = EncoderPredictor(
        net, encoder, tokenizer, settings["token_budget"], concentration=loss == "dirichlet-multinomial"
    )
    predictor.provenance.update(
        model=model,
        base=base_identity(inputs.base_dir),
        adapter=trained_identity(inputs.adapter_dir),
        condition=condition,
        dataset=dataset,
        loss=loss,
        head_labels=meta["head_labels"],
        selection=meta["selection"],
        best_epoch=meta["best_epoch"],
        trained_bf16_autocast=trained_autocast,
        runtime=runtime,
        environment=environment(),
    )
    return predictor
