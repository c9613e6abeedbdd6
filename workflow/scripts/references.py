"""Reference rows of one dataset: uniform, train prior and Scruples' BEST oracle.

Example:
    python workflow/scripts/references.py --config params.yaml --dataset dilemmas \
        --data-dir data/paper/processed/dilemmas --out results/paper/scores/dilemmas/references.json
"""

from pathlib import Path

from moralign import cli
from moralign.steps import references


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    cli.call(references.run, p.parse_args(argv))


if __name__ == "__main__":
    cli.run(main)
