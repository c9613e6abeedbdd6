"""Fine-tune one encoder baseline (BERT, RoBERTa) on one dataset, as Scruples did; resumes after an interruption.

Example:
    python workflow/scripts/train_encoder.py --config params.yaml --sections encoder models.roberta-large \
        --model roberta-large --dataset anecdotes --seed 0 --data-dir data/paper/processed/anecdotes \
        --base models/paper/base/roberta-large --out models/paper/encoders/anecdotes/roberta-large/seed-0
"""

from moralign import cli
from moralign.steps import train_encoder


def main(argv=None):
    cli.call(train_encoder.run, cli.training_parser(__doc__, "encoder.seeds").parse_args(argv))


if __name__ == "__main__":
    cli.run(main)
