# Configuration, path grammar and input functions. No rules here.
import os
import re

from moralign.config import CONDITION_BASE, load_config, validate, write_resolved
from moralign.data import TASKS
from moralign.figures import FIGURES

# The same files, merged the same way, reach every step through --config (Snakemake's configfile first,
# then each --configfile overlay in order).
CONFIG_FILES = list(dict.fromkeys(["params.yaml", *(os.path.relpath(f) for f in workflow.overwrite_configfiles)]))
CFG = load_config(CONFIG_FILES)
if validate(config).data != CFG.data:
    raise WorkflowError(
        "the configuration differs from the merged config files "
        f"{CONFIG_FILES}: --config KEY=VALUE overrides are not passed to the steps; put them in an overlay file"
    )
RUN = CFG.run
# Steps read the merged configuration from one stable file (rewritten only when its content changes).
CONFIG_ARG = str(write_resolved(CFG, f".snakemake/moralign/{RUN}.config.yaml"))


def _alternatives(values):
    return "|".join(re.escape(v) for v in values)


wildcard_constraints:
    dataset=_alternatives(CFG.datasets),
    model=_alternatives(CFG.models),
    recipe=_alternatives(CFG.recipes),
    condition=_alternatives(CFG.conditions),
    archive="anecdotes|dilemmas",


# Path grammar: <root>/<run>/<dataset>/<model>/<condition>/...
RAW = f"data/{RUN}/raw/{{archive}}.tar.gz"
PROCESSED = f"data/{RUN}/processed/{{dataset}}"
BASE_MODEL = f"models/{RUN}/base/{{model}}"
ADAPTER = f"models/{RUN}/adapters/{{dataset}}/{{model}}/{{recipe}}"
PREDICTIONS = f"results/{RUN}/predictions/{{dataset}}/{{model}}/{{condition}}"
SCORES = f"results/{RUN}/scores/{{dataset}}/{{model}}/{{condition}}.json"
REFERENCES = f"results/{RUN}/scores/{{dataset}}/references.json"
REPORTS = f"reports/{RUN}"
SPLITS = ["train", "dev", "test"]


def lib(*modules):
    """Library modules a step runs, declared as inputs so that changing them reruns the step."""
    return [f"src/moralign/{m}.py" for m in modules]


def section(*keys):
    """Hash of the config sections a step reads; passed as a param so that Snakemake reruns it on a change."""
    return CFG.section_hash(*keys)


def sample_text_input(wildcards):
    """A model built locally trains its tokenizer on the sample text; a hub model needs nothing."""
    return [RAW.format(archive=a) for a in ("anecdotes", "dilemmas")] if "build" in CFG.model(wildcards.model) else []


def adapter_input(wildcards):
    if wildcards.condition == CONDITION_BASE:
        return []
    return ADAPTER.format(dataset=wildcards.dataset, model=wildcards.model, recipe=wildcards.condition)


def adapter_arg(wildcards, input):
    return f"--adapter {input.adapter}" if input.adapter else ""


def baseline_input(wildcards):
    if wildcards.condition == CONDITION_BASE:
        return []
    return PREDICTIONS.format(dataset=wildcards.dataset, model=wildcards.model, condition=CONDITION_BASE)


def baseline_arg(wildcards, input):
    return f"--baseline {input.baseline}" if input.baseline else ""


def gpus(step):
    """GPU steps ask for one GPU unless the config pins them to the CPU."""
    device = CFG["extract"]["device"] if step == "extract" else CFG["finetune"]["device"]
    return 0 if device == "cpu" else 1


def archive_of(wildcards):
    return RAW.format(archive=TASKS[wildcards.dataset].archive)


def cells():
    return [(d, m, c) for d in CFG.datasets for m in CFG.models for c in CFG.conditions]


def score_files():
    return [SCORES.format(dataset=d, model=m, condition=c) for d, m, c in cells()]


def reference_files():
    return [REFERENCES.format(dataset=d) for d in CFG.datasets]


def figures():
    return [f"{REPORTS}/figures/{d}_{k}.{ext}" for d in CFG.datasets for k in FIGURES for ext in ("png", "pdf")]


def all_targets():
    """Everything a run produces: the table in every format, the DVC metrics file and every figure."""
    table = [f"{REPORTS}/{name}" for name in ("results.csv", "results.md", "results.tex", "differences.csv")]
    table.append(f"{REPORTS}/metrics.json")
    return table + figures()
