"""Every metric, with bootstrap intervals, of one (model, dataset, condition, seed) cell.

Example:
    python workflow/scripts/score.py --config params.yaml --dataset dilemmas --condition soft \
        --data-dir data/paper/processed/dilemmas \
        --seed 0 --predictions results/paper/predictions/dilemmas/zephyr-7b-beta/soft/seed-0 \
        --baseline results/paper/predictions/dilemmas/zephyr-7b-beta/base-4bit \
        --out results/paper/scores/dilemmas/zephyr-7b-beta/soft/seed-0.json \
        --items results/paper/scores/dilemmas/zephyr-7b-beta/soft/seed-0.items.parquet
"""

from pathlib import Path

from moralign import cli
from moralign.steps import score


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--condition", required=True)
    p.add_argument("--seed", type=int, help="training seed of a trained cell (none for a base condition)")
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--predictions", required=True, type=Path, dest="pred_dir")
    p.add_argument(
        "--baseline", type=Path, dest="baseline_dir", help="base-condition predictions, for paired differences"
    )
    p.add_argument("--out", required=True, type=Path, help="the cell's scores (JSON)")
    p.add_argument("--items", required=True, type=Path, help="per-item metrics (Parquet)")
    cli.call(score.run, p.parse_args(argv))


if __name__ == "__main__":
    cli.run(main)
