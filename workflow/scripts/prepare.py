"""Validate one dataset's release archive and write its train/dev/test Parquet tables.

Example:
    python workflow/scripts/prepare.py --config params.yaml --dataset anecdotes \
        --archive data/paper/raw/anecdotes.tar.gz --out-dir data/paper/processed/anecdotes
"""

from pathlib import Path

from moralign import cli
from moralign.steps import prepare


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--archive", required=True, type=Path, help="the dataset's release archive")
    p.add_argument("--out-dir", required=True, type=Path)
    cli.call(prepare.run, p.parse_args(argv))


if __name__ == "__main__":
    cli.run(main)
