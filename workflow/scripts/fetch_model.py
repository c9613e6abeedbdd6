"""Put a base model in models/<run>/base/<model>: a hub snapshot (pinned revision) or a tiny model built locally.

Run this on a login node with network before submitting GPU jobs to a cluster without it.

Example:
    python workflow/scripts/fetch_model.py --config config/demo.yaml --model tiny-llama \
        --archives data/demo/raw/anecdotes.tar.gz data/demo/raw/dilemmas.tar.gz --out models/demo/base/tiny-llama
"""

from pathlib import Path

from moralign import cli
from moralign.steps import fetch_model


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--archives", nargs="*", type=Path, default=[], help="sample text for a built model's tokenizer")
    p.add_argument("--out", required=True, type=Path)
    cli.call(fetch_model.run, p.parse_args(argv))


if __name__ == "__main__":
    cli.run(main)
