"""The readings table (logprob, sample, verbal side by side) and its figures, for one dataset.

Example:
    python workflow/scripts/summarise_readings.py --config params.yaml --dataset dilemmas \
        --data-dir data/paper/processed/dilemmas \
        --predictions results/paper/predictions/dilemmas/zephyr-7b-beta/base ... \
        --readings results/paper/readings/dilemmas/zephyr-7b-beta/base ... \
        --table reports/paper/readings/dilemmas.csv --markdown reports/paper/readings/dilemmas.md \
        --differences reports/paper/readings/dilemmas.differences.csv --figures reports/paper/figures
"""

from pathlib import Path

from moralign import cli
from moralign.steps import summarise_readings


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument(
        "--predictions",
        required=True,
        nargs="+",
        type=Path,
        dest="pred_dirs",
        help="extract's folder of each read cell",
    )
    p.add_argument(
        "--readings", required=True, nargs="+", type=Path, dest="read_dirs", help="the read step's folder of each cell"
    )
    p.add_argument("--table", required=True, type=Path)
    p.add_argument("--markdown", required=True, type=Path)
    p.add_argument("--differences", required=True, type=Path)
    p.add_argument("--figures", required=True, type=Path, dest="figures_dir", help="folder of the figures")
    cli.call(summarise_readings.run, p.parse_args(argv))


if __name__ == "__main__":
    cli.run(main)
