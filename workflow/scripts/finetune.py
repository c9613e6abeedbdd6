"""Train one LoRA (QLoRA on GPU) adapter for a (model, dataset, recipe); resumes after an interruption.

Example:
    python workflow/scripts/finetune.py --config params.yaml --model mistral-7b-instruct-v0.3 \
        --dataset anecdotes --recipe soft --seed 0 --data-dir data/paper/processed/anecdotes \
        --base models/paper/base/mistral-7b-instruct-v0.3 \
        --out models/paper/adapters/anecdotes/mistral-7b-instruct-v0.3/soft/seed-0
"""

from moralign import cli
from moralign.steps import finetune


def main(argv=None):
    p = cli.training_parser(__doc__, "finetune.seeds")
    p.add_argument("--recipe", required=True)
    cli.call(finetune.run, p.parse_args(argv))


if __name__ == "__main__":
    cli.run(main)
