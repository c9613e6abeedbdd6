"""Fetch one Scruples release archive (URL, local mirror, or the synthetic sample) and record its sha256.

Example:
    python workflow/scripts/download.py --config params.yaml --archive anecdotes \
        --out data/paper/raw/anecdotes.tar.gz
"""

from pathlib import Path

from moralign import cli
from moralign.steps import download


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--archive", required=True, choices=["anecdotes", "dilemmas"])
    p.add_argument("--out", required=True, type=Path)
    cli.call(download.run, p.parse_args(argv))


if __name__ == "__main__":
    cli.run(main)
