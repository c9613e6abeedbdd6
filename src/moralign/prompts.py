"""Prompts: a variant is data (config), rendering is here.

A prompt = optional system text + k few-shot examples (one fixed, seeded draw from train, each shown with its
majority answer) + the item + the question. Instruct models get their own chat template with the generation
prompt appended; ``chat_template: false`` feeds raw text ending in ``Answer:``. Every item shares the same
shots, so every prompt of a run shares one long prefix (which extraction computes once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from moralign.config import Config, digest
from moralign.data import TASKS, Task

RAW_ANSWER_PREFIX = "Answer:"


def select_shots(train: pd.DataFrame, n_shots: int, seed: int) -> pd.DataFrame:
    """``n_shots`` + 1 seeded train items with a clear majority (the spare replaces an item drawn as its own shot)."""
    if n_shots == 0:
        return train.head(0)
    pool = train[~train["tie"]]
    if len(pool) <= n_shots:
        raise ValueError(f"train has only {len(pool)} untied items; cannot draw {n_shots} shots")
    order = np.random.default_rng(seed).permutation(len(pool))[: n_shots + 1]
    return pool.iloc[order].reset_index(drop=True)


@dataclass(frozen=True)
class PromptBuilder:
    """Renders the prompt of any item of one (dataset, model) pair."""

    task: Task
    spec: dict[str, Any]
    chat: bool
    system_role: bool = True
    shots: pd.DataFrame = field(default_factory=pd.DataFrame)

    @classmethod
    def from_config(cls, cfg: Config, model: str, dataset: str, train: pd.DataFrame) -> PromptBuilder:
        """The builder of one (model, dataset) pair: its prompt variant, its model's chat settings, shots from train."""
        spec, mcfg = cfg.prompt(dataset), cfg.model(model)
        return cls(
            task=TASKS[dataset],
            spec=spec,
            chat=mcfg["chat_template"],
            system_role=mcfg["system_role"],
            shots=select_shots(train, spec["n_shots"], spec["shot_seed"]),
        )

    @property
    def answers(self) -> list[str]:
        """One answer string per choice, in the task's choice order."""
        return list(self.spec["answers"])

    def item_text(self, row: dict[str, Any] | pd.Series) -> str:
        """The item and its question, from the template."""
        try:
            return self.spec["template"].format(**{f: row[f] for f in self.task.fields})
        except KeyError as err:
            raise ValueError(
                f"prompts.{self.task.name}.template uses {{{err.args[0]}}}; available fields: {list(self.task.fields)}"
            ) from err

    def _shots_for(self, item_id: str) -> list[tuple[str, str]]:
        n = int(self.spec.get("n_shots", 0))
        chosen = [s for _, s in self.shots.iterrows() if s["id"] != item_id][:n]
        return [(self.item_text(s), self.answers[int(s["majority"])]) for s in chosen]

    def messages(self, row: dict[str, Any] | pd.Series) -> list[dict[str, str]]:
        """Chat messages: system (if any), shots as user/assistant turns, then the item."""
        msgs: list[dict[str, str]] = []
        if self.spec.get("system"):
            msgs.append({"role": "system", "content": self.spec["system"]})
        for text, answer in self._shots_for(row["id"]):
            msgs += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        msgs.append({"role": "user", "content": self.item_text(row)})
        return msgs

    def render(self, tokenizer: Any, row: dict[str, Any] | pd.Series) -> str:
        """The full prompt text; the answer is the next token."""
        if not self.chat:
            parts = [self.spec["system"]] if self.spec.get("system") else []
            parts += [f"{text}\n{RAW_ANSWER_PREFIX} {answer}" for text, answer in self._shots_for(row["id"])]
            parts.append(f"{self.item_text(row)}\n{RAW_ANSWER_PREFIX}")
            return "\n\n".join(parts)
        msgs = self.messages(row)
        if not self.system_role:
            msgs = fold_system(msgs)
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except jinja2.TemplateError:
            # Templates that reject a system turn (Mistral's) get the system text in the first user turn.
            if msgs[0]["role"] != "system":
                raise
            return tokenizer.apply_chat_template(fold_system(msgs), add_generation_prompt=True, tokenize=False)

    def fingerprint(self, tokenizer: Any) -> str:
        """Hash of everything that shapes a prompt: the variant, the chat template and the shots."""
        return digest(
            {
                "spec": self.spec,
                "chat": self.chat,
                "system_role": self.system_role,
                "chat_template": getattr(tokenizer, "chat_template", None) if self.chat else None,
                "shots": list(self.shots["id"]) if len(self.shots) else [],
            }
        )


def fold_system(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    """Move a leading system message into the first user turn."""
    if not msgs or msgs[0]["role"] != "system":
        return msgs
    system, rest = msgs[0]["content"], [dict(m) for m in msgs[1:]]
    rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


def swap_options(row: pd.Series, task: Task) -> pd.Series:
    """The same item with its two options in the other order (for ``debias: swap``)."""
    if task.option_fields is None:
        raise ValueError(f"{task.name}: items present no options to swap")
    a, b = task.option_fields
    swapped = row.copy()
    swapped[a], swapped[b] = row[b], row[a]
    return swapped
