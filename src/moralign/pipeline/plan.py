"""The stage table bound to one configuration: instances, filled patterns, resources, what a run produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moralign.config import Config
from moralign.pipeline.cells import Instance, Patterns
from moralign.pipeline.stage import Stage
from moralign.pipeline.table import BY_NAME, STAGES


class _Keep(dict):
    """format_map mapping that leaves unknown placeholders as they are."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def fill(pattern: str, values: dict[str, str]) -> str:
    """Fill the placeholders of ``pattern`` that ``values`` has; leave the others."""
    return pattern.format_map(_Keep(values))


def _fill_all(patterns: Patterns, values: dict[str, str]) -> Patterns:
    return {k: [fill(p, values) for p in v] if isinstance(v, list) else fill(v, values) for k, v in patterns.items()}


def _as_list(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


@dataclass(frozen=True)
class Plan:
    """The stage table bound to one configuration."""

    cfg: Config
    stages: tuple[Stage, ...] = field(default=STAGES)

    def instances(self, stage: Stage) -> list[Instance]:
        """The instances of ``stage`` in this run."""
        return stage.instances(self.cfg)

    def inputs(self, stage: Stage) -> Patterns:
        """Input patterns (``{run}`` filled), code included as ``code``."""
        patterns = _fill_all(stage.input_patterns(self.cfg), {"run": self.cfg.run})
        return {**patterns, "code": stage.code()}

    def outputs(self, stage: Stage) -> Patterns:
        """Output patterns (``{run}`` filled)."""
        return _fill_all(stage.output_patterns(self.cfg), {"run": self.cfg.run})

    def log(self, stage: Stage) -> str:
        """Log pattern (``{run}`` filled)."""
        return fill(stage.log(), {"run": self.cfg.run})

    def sections(self, stage: Stage, instance: Instance) -> list[str]:
        """The config sections one instance reads."""
        return [fill(s, instance) for s in stage.sections]

    def device(self, stage: Stage, instance: Instance) -> str | None:
        """The device setting of an instance's step (None for CPU-only steps)."""
        if stage.device_section is None:
            return None
        return self._step_settings(stage, instance)["device"]

    def threads(self, stage: Stage, instance: Instance) -> int:
        """The torch threads an instance's step sets (1 for steps without torch)."""
        if stage.threads_section is None:
            return 1
        return self._step_settings(stage, instance)["threads"]

    def _step_settings(self, stage: Stage, instance: Instance) -> dict[str, Any]:
        if stage.name == "finetune":
            return self.cfg.finetune(instance["recipe"])  # a recipe may override the shared settings
        return self.cfg[stage.device_section or stage.threads_section]

    def gpus(self, stage: Stage, instance: Instance) -> int:
        """GPUs an instance asks for: one for GPU steps unless the config pins them to the CPU."""
        device = self.device(stage, instance)
        return 0 if device in (None, "cpu") else 1

    def describe(self) -> str:
        """What a reader of the plan must know that the file list does not say: the base weights of each recipe."""
        lines = []
        for recipe in self.cfg.recipes:
            settings = self.cfg.finetune(recipe)
            if settings["quantization"] == "4bit":
                how = "trained and scored on the 4-bit NF4 base (QLoRA); differences against base-4bit"
            else:
                how = (
                    "trained and scored on the full-precision base (finetune.quantization: none"
                    + ("; 4-bit needs CUDA, so a CPU run falls back to it" if settings["device"] == "cpu" else "")
                    + "); differences against base"
                )
            seeds = ", ".join(str(s) for s in settings["seeds"])
            lines.append(f"moralign plan: recipe {recipe}: seeds [{seeds}], {how}")
        return "\n".join(lines)

    def targets(self) -> list[str]:
        """Everything a run produces: the tables in every format, the DVC metrics file and every figure."""
        out = []
        for name in ("summarise", "plot", "summarise_readings"):
            stage = BY_NAME[name]
            for instance in self.instances(stage):
                for value in self.outputs(stage).values():
                    out += [fill(p, instance) for p in _as_list(value)]
        return out

    def instance_keys(self, stage: Stage) -> list[str]:
        """The names of the values an instance of ``stage`` has: its wildcards first, then derived values."""
        keys = dict.fromkeys(stage.wildcards)
        for instance in self.instances(stage):
            keys.update(dict.fromkeys(instance))
        return list(keys)


def instance_of(plan: Plan, stage: Stage, wildcards: dict[str, str]) -> Instance:
    """The instance of ``stage`` with these wildcard values."""
    key = tuple(wildcards[w] for w in stage.wildcards)
    for instance in plan.instances(stage):
        if tuple(instance[w] for w in stage.wildcards) == key:
            return instance
    raise KeyError(f"{stage.name}: no instance with {dict(zip(stage.wildcards, key, strict=True))}")
