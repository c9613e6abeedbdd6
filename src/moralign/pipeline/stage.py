"""A stage of the DAG: one step script, run once per instance, described for both front ends.

The stage table (moralign.pipeline.table) lists the stages; moralign.pipeline.rules and .dvcfile render them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moralign.config import Config
from moralign.pipeline.cells import Instance, Patterns
from moralign.pipeline.code import ROOT, module_dependencies, script_dependencies


@dataclass(frozen=True)
class Stage:
    """One step of the DAG: a script run once per instance (a dict of wildcard values and derived values).

    Path patterns use ``{run}``, the wildcards and derived values of an instance; ``sections`` are dotted config
    keys (patterns too); ``args`` is the script's argument template over instance values (``{dataset}``) and
    named paths (``{input.data}``, ``{output.predictions}``).
    """

    name: str
    wildcards: tuple[str, ...]
    instances: Callable[[Config], list[Instance]]
    # path patterns by name; a function of the configuration where they list the run's cells (summaries)
    inputs: Patterns | Callable[[Config], Patterns]
    outputs: Patterns
    sections: tuple[str, ...]
    args: str
    script: str = ""  # workflow/scripts/<script>.py; default: the stage's name
    folders: tuple[str, ...] = ()  # outputs that are folders
    device_section: str | None = None  # config section whose `device` decides whether the step wants a GPU
    threads_section: str | None = None  # config section whose `threads` the step sets torch to
    local: bool = False  # runs on the submitting machine (needs the network), never on a cluster node
    extra_modules: tuple[str, ...] = ()  # modules the script imports by name at run time
    resources: tuple[tuple[str, int], ...] = ()  # scheduler resources besides GPUs (e.g. an API's concurrency)
    metrics: tuple[str, ...] = ()  # outputs that are DVC metrics files
    group: str = "evaluate"  # the workflow/rules/<group>.smk file its rule is written to
    # outputs shown in Snakemake's HTML report: (output key, report() keyword arguments)
    report_items: tuple[tuple[str, dict[str, Any]], ...] = ()

    @property
    def script_path(self) -> str:
        """The step script, relative to the repository root."""
        return f"workflow/scripts/{self.script or self.name}.py"

    def input_patterns(self, cfg: Config) -> Patterns:
        """The inputs' path patterns for a configuration."""
        return self.inputs(cfg) if callable(self.inputs) else dict(self.inputs)

    def output_patterns(self, cfg: Config) -> Patterns:
        """The outputs' path patterns (the same for every configuration: the rule files show them literally)."""
        return dict(self.outputs)

    def code(self) -> list[str]:
        """The script and every project module it runs, relative to the repository root."""
        files = script_dependencies(ROOT / self.script_path)
        for module in self.extra_modules:
            files |= module_dependencies(module)
        return sorted({self.script_path, *files})

    def log(self) -> str:
        """Log file pattern."""
        tail = "/".join(f"{{{w}}}" for w in self.wildcards) or self.name
        return f"logs/{self.name}/{{run}}/{tail}.log"

    def command(self) -> str:
        """The command template: the script, the config file, the declared sections, the arguments, the log."""
        return f"python {self.script_path} --config {{config}} --sections {{sections}} {self.args} --log {{log}}"
