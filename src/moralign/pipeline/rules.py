"""The Snakemake rules from the stage table: ``workflow/rules/<group>.smk``, generated, committed and readable.

``python -m moralign.pipeline rules`` rewrites them (a test checks the committed files equal its output). Each rule
shows its inputs, outputs, log and shell command as literal path patterns, so a reader of ``workflow/rules/`` sees
what a rule reads and writes without running the generator in their head. Only what depends on the run's
configuration is a call into ``workflow/rules/common.smk``: the step's code files (``code_of``), the lists of cells
a summary reads (``listed``), patterns over values derived from a cell (``with_values``: e.g. the base a fine-tuned
cell is compared with), params, wildcard constraints, threads and GPUs.

``{run}`` is a wildcard in these patterns, constrained to the run's name, so the files do not change with the
configuration; DVC's ``dvc.yaml`` (moralign.pipeline.dvcfile) is generated for one configuration instead.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from moralign.pipeline.code import ROOT
from moralign.pipeline.plan import Plan
from moralign.pipeline.stage import Stage
from moralign.pipeline.table import STAGES

RULES_DIR = Path("workflow/rules")
GROUPS = ("data", "models", "evaluate", "report")
HEADER = """\
# GENERATED from the stage table (src/moralign/pipeline/table.py): do not edit by hand; regenerate with
#   python -m moralign.pipeline rules
# {run} is the run's name (data/<run>, results/<run>, ...); the other wildcards are a stage's cells. The helpers
# (code_of, listed, with_values, params_of, ...) are in common.smk.
"""
_FORMATTER = string.Formatter()


def _placeholders(pattern: str) -> set[str]:
    return {name for _, name, _, _ in _FORMATTER.parse(pattern) if name is not None}


def _shell(stage: Stage) -> list[str]:
    """The command template with Snakemake's placeholders, cut into lines of whole arguments."""
    out = []
    for literal, name, _spec, _conv in _FORMATTER.parse(stage.command()):
        out.append(literal)
        if name is None:
            continue
        if name.startswith(("input.", "output.")) or name == "log":
            out.append("{" + name + "}")
        elif name in stage.wildcards:
            out.append("{wildcards." + name + "}")
        else:  # the config file, the sections and values derived from the cell (params_of)
            out.append("{params." + name + "}")
    words, lines, line = "".join(out).split(), [], ""
    for word in words:
        if line and len(line) + len(word) > 90 and word.startswith("--"):
            lines.append(line)
            line = " "
        line += ("" if not line or line == " " else " ") + word
    lines.append(line)
    return lines


def _literal(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _kwargs(items: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_py(v)}" for k, v in items.items())


def _py(value: Any) -> str:
    if isinstance(value, str):
        return _literal(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_py(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def rule_text(plan: Plan, stage: Stage) -> str:
    """One ``rule`` block of ``stage`` (patterns from ``plan``'s configuration, which must not change them)."""
    wildcards = {"run", *stage.wildcards}
    lines = [f"rule {stage.name}:", "    input:"]
    for key, value in stage.input_patterns(plan.cfg).items():
        if isinstance(value, list):
            lines.append(f'        {key}=listed("{stage.name}", "{key}"),')
        elif _placeholders(value) <= wildcards:
            lines.append(f"        {key}={_literal(value)},")
        else:
            lines.append(f'        {key}=with_values("{stage.name}", {_literal(value)}),')
    lines.append(f'        code=code_of("{stage.name}"),')
    lines.append("    output:")
    reports = dict(stage.report_items)
    for key, value in stage.output_patterns(plan.cfg).items():
        values = value if isinstance(value, list) else [value]
        extra = _placeholders(" ".join(values)) - wildcards
        if extra:
            raise ValueError(f"stage {stage.name}: output {key} uses {sorted(extra)}, which are not wildcards")
        text = _literal(value) if isinstance(value, str) else "[" + ", ".join(_literal(v) for v in values) + "]"
        if key in stage.folders:
            text = f"directory({text})"
        if key in reports:
            text = f"report({text}, {_kwargs(reports[key])})"
        lines.append(f"        {key}={text},")
    lines += ["    log:", f"        {_literal(stage.log())},", "    params:", f'        **params_of("{stage.name}"),']
    lines += ["    wildcard_constraints:", f'        **constraints_of("{stage.name}"),']
    if stage.threads_section:
        lines.append(f'    threads: threads_of("{stage.name}")')
    if stage.device_section or stage.resources:
        lines.append("    resources:")
        if stage.device_section:
            lines.append(f'        gpu=gpus_of("{stage.name}"),')
        lines += [f"        {name}={amount}," for name, amount in stage.resources]
    lines.append("    shell:")
    lines += [f"        {_literal(part)}" for part in _shell(stage)]
    return "\n".join(lines) + "\n"


def rule_files(plan: Plan) -> dict[Path, str]:
    """Every rule file's text, by path relative to the repository root."""
    files = {}
    for group in GROUPS:
        stages = [s for s in STAGES if s.group == group]
        local = [s.name for s in stages if s.local]
        parts = [HEADER]
        if local:
            parts.append("# run on the submitting machine (they need the network), never on a cluster node\n")
            parts.append("localrules:\n" + "".join(f"    {name},\n" for name in local))
        parts += [rule_text(plan, s) for s in stages]
        files[RULES_DIR / f"{group}.smk"] = "\n\n".join(p.rstrip("\n") + "\n" for p in parts)
    return files


def write_rules(plan: Plan, root: Path = ROOT) -> list[Path]:
    """Write the rule files under ``root``; returns their paths."""
    written = []
    for rel, text in rule_files(plan).items():
        (root / rel).write_text(text)
        written.append(root / rel)
    return written
