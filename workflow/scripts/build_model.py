"""
Build a tiny random model of a real architecture with a tokenizer trained on the sample text.

Example:
    python workflow/scripts/build_model.py --config config/demo.yaml --model tiny-llama \
        --archives data/demo/raw/anecdotes.tar.gz data/demo/raw/dilemmas.tar.gz --out models/demo/base/tiny-llama
"""

from pathlib import Path

from moralign import cli, steps


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--archives", required=True, nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    steps.build_model(cli.start(args), args.model, args.archives, args.out)


if __name__ == "__main__":
    cli.run(main)
