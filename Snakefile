# moralign: how well do language models' answer probabilities match human moral-judgment distributions?
#   snakemake --cores 2 --configfile config/demo.yaml   (offline demo)
#   snakemake --profile profiles/slurm                  (paper configuration on a SLURM cluster)
from snakemake.utils import min_version

min_version("9.0")


configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
