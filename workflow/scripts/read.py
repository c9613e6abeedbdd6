"""The `sample` and `verbal` readings of one (model, dataset, condition) cell: sampled and stated answer shares.

Examples:
    python workflow/scripts/read.py --config params.yaml --model zephyr-7b-beta --dataset dilemmas \
        --condition base --data-dir data/paper/processed/dilemmas --base models/paper/base/zephyr-7b-beta \
        --cache-dir cache/generations --out-dir results/paper/readings/dilemmas/zephyr-7b-beta/base
    # a fine-tuned condition adds --adapter models/paper/adapters/dilemmas/zephyr-7b-beta/soft/seed-0 and
    # --base-quantization 4bit; an API model (backend openai) takes --cache-dir cache/openai and no --base
"""

from moralign import cli
from moralign.predictors import CellInputs
from moralign.steps import read


def main(argv=None):
    p = cli.cell_parser(__doc__)
    args = p.parse_args(argv)
    inputs = CellInputs(args.data_dir, args.base, args.adapter, args.cache_dir, args.base_quantization)
    read.run(cli.start(args), args.model, args.dataset, args.condition, inputs, args.out_dir)


if __name__ == "__main__":
    cli.run(main)
