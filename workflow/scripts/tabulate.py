"""
The results table of a run: results.csv, results.md, results.tex and metrics.json.

Example:
    python workflow/scripts/tabulate.py --config params.yaml --scores results/paper/scores/*/*/*.json \
        --references results/paper/scores/*/references.json --out-dir reports/paper
"""

from pathlib import Path

from moralign import cli, reporting


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--scores", required=True, nargs="+", type=Path)
    p.add_argument("--references", required=True, nargs="+", type=Path)
    p.add_argument("--out-dir", required=True, type=Path)
    args = p.parse_args(argv)
    cli.start(args)
    reporting.tabulate(args.scores, args.references, args.out_dir)


if __name__ == "__main__":
    cli.run(main)
