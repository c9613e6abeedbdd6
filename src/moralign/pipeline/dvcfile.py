"""dvc.yaml from the stage table: one ``foreach`` group per stage whose keys are its instances.

``python -m moralign.pipeline dvc > dvc.yaml`` writes it (committed; a test checks the committed file equals the
generated one). Every stage lists its inputs and code as ``deps``, its declared config keys as ``params`` and its
outputs as ``outs`` (``metrics`` for DVC metrics files), so ``dvc repro`` reruns exactly what Snakemake would.
"""

from __future__ import annotations

import string
from typing import Any

import yaml

from moralign.pipeline.cells import REPORTS
from moralign.pipeline.plan import Plan, _as_list, fill
from moralign.pipeline.stage import Stage

_FORMATTER = string.Formatter()


def _render(template: str, values: dict[str, str]) -> str:
    """Fill a command template's fields (paths and instance values)."""
    out = []
    for literal, name, _spec, _conv in _FORMATTER.parse(template):
        out.append(literal)
        if name is not None:
            out.append(values[name])
    return "".join(out)


def dvc_stage(plan: Plan, stage: Stage, config_file: str) -> dict[str, Any]:
    """One dvc.yaml entry: a ``foreach`` over the instances (keys = wildcard values), or a plain stage."""
    if stage.wildcards:
        item = {k: f"${{item.{k}}}" for k in plan.instance_keys(stage)}
    else:  # a single plain stage: its values are written out
        (item,) = plan.instances(stage)
    values = {**item, "run": plan.cfg.run}
    inputs, outputs = plan.inputs(stage), plan.outputs(stage)
    refs: dict[str, str] = {"config": config_file, "log": fill(plan.log(stage), item)}
    refs["sections"] = " ".join(fill(s, item) for s in stage.sections)
    for kind, paths in (("input", inputs), ("output", outputs)):
        for key, value in paths.items():
            refs[f"{kind}.{key}"] = " ".join(fill(p, item) for p in _as_list(value))
    body: dict[str, Any] = {"cmd": " ".join(_render(stage.command(), {**item, **refs}).split())}
    deps = [fill(p, values) for v in inputs.values() for p in _as_list(v)]
    if deps:
        body["deps"] = deps
    params = [fill(s, item) for s in stage.sections]
    if params:
        body["params"] = params if config_file == "params.yaml" else [{config_file: params}]
    outs, metrics = [], []
    for key, value in outputs.items():
        for p in _as_list(value):
            (metrics if key in stage.metrics else outs).append(fill(p, values))
    body["outs"] = outs
    if metrics:
        body["metrics"] = metrics
    if not stage.wildcards:
        return body
    foreach = {"-".join(i[w] for w in stage.wildcards): dict(i) for i in plan.instances(stage)}
    return {"foreach": foreach, "do": body}


def dvc_yaml(plan: Plan, config_file: str = "params.yaml") -> str:
    """The whole dvc.yaml of this configuration."""
    stages = {s.name: dvc_stage(plan, s, config_file) for s in plan.stages if plan.instances(s)}
    doc = {"stages": stages, "plots": [f"{REPORTS.format(run=plan.cfg.run)}/figures"]}
    header = (
        "# GENERATED from the stage table (src/moralign/pipeline/table.py) for "
        f"{config_file}: do not edit by hand.\n"
        f"# Regenerate after changing the run's models, datasets, recipes or run name:\n"
        f"#   python -m moralign.pipeline dvc --config {config_file} > dvc.yaml\n"
        "# Stage instances are cells of the results table: extract_tuned@<dataset>-<model>-<recipe>, ...\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False, width=120, allow_unicode=True)
