# Configuration and the helpers the generated rules call (workflow/rules/{data,models,evaluate,report}.smk, written
# by `python -m moralign.pipeline rules` from the stage table, src/moralign/pipeline/table.py). No rules here.
import os
import re
import sys

from moralign.config import load_config, validate, write_resolved
from moralign.pipeline.plan import Plan, fill, instance_of
from moralign.pipeline.table import BY_NAME

# The same files, merged the same way, reach every step through --config (Snakemake's configfile first,
# then each --configfile overlay in order).
CONFIG_FILES = list(dict.fromkeys(["params.yaml", *(os.path.relpath(f) for f in workflow.overwrite_configfiles)]))
CFG = load_config(CONFIG_FILES)
if validate(config).data != CFG.data:
    raise WorkflowError(
        "the configuration differs from the merged config files "
        f"{CONFIG_FILES}: --config KEY=VALUE overrides are not passed to the steps; put them in an overlay file"
    )
PLAN = Plan(CFG)
# the base weights and seeds of the fine-tuned cells, said where the plan is read (dry runs included)
print(PLAN.describe(), file=sys.stderr)
# Steps read the merged configuration from one stable file (rewritten only when its content changes).
CONFIG_ARG = str(write_resolved(CFG, f".snakemake/moralign/{CFG.run}.config.yaml"))


def _instance(name, wildcards):
    return instance_of(PLAN, BY_NAME[name], {k: v for k, v in wildcards.items() if k != "run"})


def code_of(name):
    """The step script and every project file it runs (a change reruns the step)."""
    return BY_NAME[name].code()


def listed(name, key):
    """An input that lists the run's cells (e.g. every score file a summary reads)."""
    return PLAN.inputs(BY_NAME[name])[key]


def with_values(name, pattern):
    """A pattern over values derived from the cell (e.g. the base a fine-tuned cell is compared with)."""
    return lambda wildcards: fill(pattern, {**dict(wildcards.items()), **_instance(name, wildcards)})


def constraints_of(name):
    """Each wildcard matches exactly the values the stage's instances have (rules never overlap)."""
    stage = BY_NAME[name]
    values = {w: sorted({i[w] for i in PLAN.instances(stage)}) for w in stage.wildcards}
    return {"run": re.escape(CFG.run), **{w: "|".join(re.escape(v) for v in vs) or "(?!)" for w, vs in values.items()}}


def params_of(name):
    """The config file, the declared sections (and their hash: a change reruns the step) and derived values."""
    stage = BY_NAME[name]
    derived = [k for k in PLAN.instance_keys(stage) if k not in stage.wildcards]

    def sections(wildcards):
        return PLAN.sections(stage, _instance(name, wildcards))

    values = {k: (lambda wildcards, k=k: _instance(name, wildcards)[k]) for k in derived}
    return {
        "config": CONFIG_ARG,
        "sections": lambda wildcards: " ".join(sections(wildcards)),
        "settings": lambda wildcards: CFG.section_hash(*sections(wildcards)),
        **values,
    }


def gpus_of(name):
    return lambda wildcards: PLAN.gpus(BY_NAME[name], _instance(name, wildcards))


def threads_of(name):
    return lambda wildcards: PLAN.threads(BY_NAME[name], _instance(name, wildcards))


def all_targets():
    """Everything a run produces: the table in every format, the DVC metrics file and every figure."""
    return PLAN.targets()
