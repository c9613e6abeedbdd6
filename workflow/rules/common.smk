# Configuration and the stage table's Snakemake adapters. No rules here.
# Every rule reads its inputs, outputs, params, resources and shell command from moralign.stages, the one
# description of the DAG that dvc.yaml is generated from too.
import os
import re
import sys

from moralign import stages as S
from moralign.config import load_config, validate, write_resolved

# The same files, merged the same way, reach every step through --config (Snakemake's configfile first,
# then each --configfile overlay in order).
CONFIG_FILES = list(dict.fromkeys(["params.yaml", *(os.path.relpath(f) for f in workflow.overwrite_configfiles)]))
CFG = load_config(CONFIG_FILES)
if validate(config).data != CFG.data:
    raise WorkflowError(
        "the configuration differs from the merged config files "
        f"{CONFIG_FILES}: --config KEY=VALUE overrides are not passed to the steps; put them in an overlay file"
    )
PLAN = S.Plan(CFG)
# the base weights and seeds of the fine-tuned cells, said where the plan is read (dry runs included)
print(PLAN.describe(), file=sys.stderr)
# Steps read the merged configuration from one stable file (rewritten only when its content changes).
CONFIG_ARG = str(write_resolved(CFG, f".snakemake/moralign/{CFG.run}.config.yaml"))


def _stage(name):
    return S.BY_NAME[name]


def _instance(name, wildcards):
    return S.instance_of(PLAN, _stage(name), dict(wildcards.items()))


def constraints(name):
    """Each wildcard matches exactly the values the stage's instances have (rules never overlap)."""
    stage = _stage(name)
    values = {w: sorted({i[w] for i in PLAN.instances(stage)}) for w in stage.wildcards}
    return {w: "|".join(re.escape(v) for v in vs) or "(?!)" for w, vs in values.items()}


def inputs(name):
    """Input function (for unpack) of the stage's named inputs, its code included."""
    stage = _stage(name)
    patterns = PLAN.inputs(stage)

    def resolve(wildcards):
        values = _instance(name, wildcards)
        return {k: [S.fill(p, values) for p in v] if isinstance(v, list) else S.fill(v, values) for k, v in patterns.items()}

    return resolve


def outputs(name, reports=None):
    """The stage's named outputs; folders marked as directories, report items wrapped for --report."""
    stage = _stage(name)
    out = {}
    for key, value in PLAN.outputs(stage).items():
        if key in stage.folders:
            value = directory(value)
        if reports and key in reports:
            value = report(value, **reports[key])
        out[key] = value
    return out


def params(name):
    """The config file, the declared sections (and their hash: a change reruns the step) and instance values."""
    stage = _stage(name)
    keys = PLAN._instance_keys(stage)

    def sections(wildcards):
        return PLAN.sections(stage, _instance(name, wildcards))

    values = {k: (lambda wildcards, k=k: _instance(name, wildcards)[k]) for k in keys}
    return {
        "config": CONFIG_ARG,
        "sections": lambda wildcards: " ".join(sections(wildcards)),
        "settings": lambda wildcards: CFG.section_hash(*sections(wildcards)),
        **values,
    }


def log_of(name):
    return PLAN.log(_stage(name))


def shell_of(name):
    return S.snakemake_shell(_stage(name))


def gpus(name):
    return lambda wildcards: PLAN.gpus(_stage(name), _instance(name, wildcards))


def resources_of(name):
    return dict(_stage(name).resources)


def threads_of(name):
    return lambda wildcards: PLAN.threads(_stage(name), _instance(name, wildcards))


def all_targets():
    """Everything a run produces: the table in every format, the DVC metrics file and every figure."""
    return PLAN.targets()
