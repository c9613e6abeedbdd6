"""Fine-tune one encoder baseline (BERT, RoBERTa) on one dataset, as Scruples did; resumes after an interruption.

Example:
    python workflow/scripts/train_encoder.py --config params.yaml --sections encoder models.roberta-large \
        --model roberta-large --dataset anecdotes --seed 0 --data-dir data/paper/processed/anecdotes \
        --base models/paper/base/roberta-large --out models/paper/encoders/anecdotes/roberta-large/seed-0
"""

from pathlib import Path

from moralign import cli
from moralign.steps import train_encoder


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--seed", type=int, default=0, help="training seed (one of encoder.seeds)")
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--base", required=True, type=Path, help="folder of the pretrained encoder (fetch_model's output)")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    train_encoder.run(cli.start(args), args.model, args.dataset, args.data_dir, args.base, args.out, args.seed)


if __name__ == "__main__":
    cli.run(main)
