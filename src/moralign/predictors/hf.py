"""Local causal language models (Hugging Face ``from_pretrained``, optionally 4-bit, optionally with a LoRA adapter).

One forward pass per prompt through the extraction engine (moralign.extraction); with ``extract.debias: swap``
binary items are also scored with their two options exchanged and the two distributions averaged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from moralign import extraction as ex
from moralign.config import CONDITION_BASE_4BIT, Config
from moralign.errors import DataError
from moralign.extraction_packed import make_scorer
from moralign.io import environment, read_json
from moralign.predictors import CellInputs, Predictor
from moralign.prompts import EncodedPrompt, PromptBuilder, swap_options

log = logging.getLogger(__name__)


class HFPredictor(Predictor):
    """Scores rendered prompts with a local model; see the module docstring."""

    def __init__(self, model: Any, tokenizer: Any, builder: PromptBuilder, settings: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.builder = builder
        self.max_length = settings["max_length"]
        self.debias = settings["debias"]
        if self.debias == "swap" and builder.task.option_fields is None:
            raise ValueError(
                f"extract.debias: swap needs a task whose prompt shows its options in order; "
                f"{builder.task.name} has none"
            )
        self.answers = ex.answer_variants(tokenizer, builder.answers)
        self.scorer = make_scorer(model, tokenizer.pad_token_id, settings)
        self.provenance: dict[str, Any] = {
            "template_hash": builder.fingerprint(tokenizer),
            "answers": self.answers.describe(),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "quantization": settings["quantization"],
            "debias": self.debias,
            "max_length": self.max_length,
        }

    def encode(self, items: pd.DataFrame) -> list[EncodedPrompt]:
        """The items' prompts, rendered and tokenized by the one function fine-tuning uses too."""
        return [self.builder.encode(self.tokenizer, row, self.max_length) for _, row in items.iterrows()]

    def _logp(self, items: pd.DataFrame) -> tuple[list[EncodedPrompt], Any]:
        encoded = self.encode(items)
        prompts = ex.PromptSet(
            list(items["id"]), [e.text for e in encoded], [e.ids for e in encoded], [e.plain for e in encoded]
        )
        return encoded, ex.score_prompts(self.scorer, self.tokenizer, prompts, self.answers, self.builder.chat)

    def predict(self, items: pd.DataFrame) -> pd.DataFrame:
        """See :meth:`Predictor.predict`."""
        encoded, logp = self._logp(items)
        ids, n_tokens, shortened = list(items["id"]), [len(e.ids) for e in encoded], [e.shortened for e in encoded]
        if self.debias != "swap":
            return ex.predictions_frame(ids, logp, n_tokens, shortened=shortened)
        swapped = pd.DataFrame([swap_options(row, self.builder.task) for _, row in items.iterrows()])
        _, logp_swapped = self._logp(swapped)
        mean_logp, p = ex.average_orders(logp, logp_swapped[:, ::-1])
        return ex.predictions_frame(ids, mean_logp, n_tokens, p=p, shortened=shortened)

    def summarise(self, predictions: pd.DataFrame) -> dict[str, Any]:
        """How many items had their text cut to fit ``extract.max_length`` (moralign.prompts.PromptBuilder.encode)."""
        shortened = int(predictions["shortened"].sum())
        if shortened:
            log.warning("%d items shortened to fit extract.max_length=%s", shortened, self.max_length)
        return {"shortened_items": shortened}

    def examples(self, items: pd.DataFrame) -> str:
        """The rendered prompts, exactly as the model reads them (shortened items as shortened)."""
        return "\n".join(
            f"===== {row_id} =====\n{e.text}\n" for row_id, e in zip(items["id"], self.encode(items), strict=True)
        )


def training_log(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's ``metadata.json`` (written by finetune), or an error naming the folder."""
    from moralign.modelfiles import TRAINING_LOG

    path = Path(adapter_dir) / TRAINING_LOG
    if not path.is_file():
        raise DataError(f"{path}: no training log; an adapter scored here must come from the finetune step")
    return read_json(path)


def base_quantization(settings: dict[str, Any], condition: str, adapter_dir: Path | None) -> str:
    """The base weights a cell is scored on: a fine-tuned cell's are those it was TRAINED on (its metadata says).

    ``base`` loads the base as ``extract.quantization`` says (the paper's base numbers are bf16); ``base-4bit`` is
    the 4-bit NF4 base QLoRA recipes train on, the baseline of their differences. Scoring a QLoRA adapter on a
    bf16 base would mix the adapter's effect with an unmeasured change of the base weights.
    """
    if adapter_dir is not None:
        return training_log(adapter_dir)["hyperparameters"]["quantization"]
    return "4bit" if condition == CONDITION_BASE_4BIT else settings["quantization"]


@dataclass(frozen=True)
class LoadedCell:
    """A cell's model as extract loads it: the weights (adapter applied), tokenizer, prompt builder, provenance.

    ``provenance`` names the weights (``base``: the base model's identity; ``adapter``: the trained adapter's,
    with its hash) and the runtime; it is the model identity of the readings' generation cache too.
    """

    model: Any
    tokenizer: Any
    builder: PromptBuilder
    quantization: str
    provenance: dict[str, Any]


def load_cell(cfg: Config, model: str, dataset: str, condition: str, inputs: CellInputs) -> LoadedCell:
    """Load the cell's base model (and adapter) from the folders fetch_model and finetune wrote.

    Reads ``extract.{device, dtype, quantization, threads}`` only (the read steps declare no more).
    """
    from moralign.modelfiles import base_identity, check_adapter, check_model_folder, trained_identity
    from moralign.modeling import configure_torch, load_model, load_tokenizer, resolve_device, resolve_dtype

    extract = cfg["extract"]
    quantization = base_quantization(extract, condition, inputs.adapter_dir)
    if inputs.base_quantization is not None and inputs.base_quantization != quantization:
        raise DataError(
            f"{inputs.adapter_dir}: trained on a base with quantization {quantization!r}, but the plan scores it on "
            f"{inputs.base_quantization!r} (finetune.quantization changed since it was trained? rerun finetune)"
        )
    check_model_folder(inputs.base_dir, cfg.model(model)["chat_template"])
    if inputs.adapter_dir is not None:
        check_adapter(inputs.adapter_dir, inputs.base_dir)
    device = resolve_device(extract["device"])
    runtime = configure_torch(extract["threads"], device)
    dtype = resolve_dtype(extract["dtype"], device)
    tokenizer = load_tokenizer(str(inputs.base_dir))
    lm = load_model(str(inputs.base_dir), None, device, dtype, quantization, inputs.adapter_dir)
    builder = PromptBuilder.from_config(cfg, model, dataset, pd.read_parquet(inputs.data_dir / "train.parquet"))
    provenance = {
        "model": model,
        "base": base_identity(inputs.base_dir),
        "adapter": trained_identity(inputs.adapter_dir) if inputs.adapter_dir else None,
        "seed": training_log(inputs.adapter_dir)["hyperparameters"]["seed"] if inputs.adapter_dir else None,
        "condition": condition,
        "dataset": dataset,
        "runtime": runtime,
        "environment": environment(),
    }
    return LoadedCell(lm, tokenizer, builder, quantization, provenance)


def build(cfg: Config, model: str, dataset: str, condition: str, inputs: CellInputs) -> HFPredictor:
    """The cell's predictor: its model loaded by :func:`load_cell`, scored as ``extract`` says."""
    cell = load_cell(cfg, model, dataset, condition, inputs)
    predictor = HFPredictor(
        cell.model, cell.tokenizer, cell.builder, {**cfg["extract"], "quantization": cell.quantization}
    )
    predictor.provenance.update(cell.provenance)
    return predictor
