"""Train one LoRA (QLoRA on GPU) adapter for a (model, dataset, recipe); resumes after an interruption.

Example:
    python workflow/scripts/finetune.py --config params.yaml --model mistral-7b-instruct-v0.3 \
        --dataset anecdotes --recipe soft --seed 0 --data-dir data/paper/processed/anecdotes \
        --base models/paper/base/mistral-7b-instruct-v0.3 \
        --out models/paper/adapters/anecdotes/mistral-7b-instruct-v0.3/soft/seed-0
"""

from pathlib import Path

from moralign import cli
from moralign.steps import finetune


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--seed", type=int, default=0, help="training seed (one of finetune.seeds)")
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--base", required=True, type=Path, help="folder of the base model (fetch_model's output)")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    finetune.run(cli.start(args), args.model, args.dataset, args.recipe, args.data_dir, args.base, args.out, args.seed)


if __name__ == "__main__":
    cli.run(main)
