"""Train one LoRA (QLoRA on GPU) adapter for a (model, dataset, recipe); resumes after an interruption.

Example:
    python workflow/scripts/finetune.py --config params.yaml --model mistral-7b-instruct-v0.3 \
        --dataset anecdotes --recipe soft --data-dir data/paper/processed/anecdotes \
        --base models/paper/base/mistral-7b-instruct-v0.3 \
        --out models/paper/adapters/anecdotes/mistral-7b-instruct-v0.3/soft
"""

from pathlib import Path

from moralign import cli
from moralign.steps import finetune


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--base", required=True, type=Path, help="folder of the base model (fetch_model's output)")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    finetune.run(cli.start(args), args.model, args.dataset, args.recipe, args.data_dir, args.base, args.out)


if __name__ == "__main__":
    cli.run(main)
