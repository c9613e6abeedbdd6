"""Summarise a run in its results table: results.csv, results.md, results.tex and metrics.json.

Example:
    python workflow/scripts/summarise.py --config params.yaml --scores results/paper/scores --out-dir reports/paper
"""

from pathlib import Path

from moralign import cli, tables
from moralign.inputs import check_scores


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--scores", required=True, nargs="+", type=Path, help="score and reference files, or folders")
    p.add_argument("--out-dir", required=True, type=Path)
    args = p.parse_args(argv)
    cfg = cli.start(args)
    cells = cfg.cells()
    check_scores(args.scores, cells, cfg["experiment"]["eval_split"], {m: cfg.model(m) for m in cfg.models})
    cells, refs = tables.collect_scores(args.scores, cells)
    tables.tabulate(cells, refs, args.out_dir, cfg["score"], cfg.comparisons())


if __name__ == "__main__":
    cli.run(main)
