"""Figures of one dataset: bars with BEST/uniform levels, reliability, per-item scatter, coverage, differences.

Example:
    python workflow/scripts/plot.py --config params.yaml --dataset dilemmas --report-dir reports/paper \
        --data-dir data/paper/processed/dilemmas --predictions results/paper/predictions/dilemmas \
        --out-dir reports/paper/figures
"""

from pathlib import Path

from moralign import cli, figures


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--report-dir", required=True, type=Path, help="folder of results.csv and differences.csv")
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--predictions", required=True, nargs="+", type=Path)
    p.add_argument("--out-dir", required=True, type=Path)
    args = p.parse_args(argv)
    cfg = cli.start(args)
    split = cfg["experiment"]["eval_split"]
    figures.plot_dataset(
        args.report_dir, args.dataset, args.predictions, args.data_dir, split, args.out_dir, cfg.cells()
    )


if __name__ == "__main__":
    cli.run(main)
