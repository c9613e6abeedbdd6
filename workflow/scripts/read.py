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
    args = cli.cell_parser(__doc__).parse_args(argv)
    inputs = CellInputs(*cli.take(args, "data_dir", "base", "adapter", "cache_dir", "base_quantization"))
    cli.call(read.run, args, inputs=inputs)


if __name__ == "__main__":
    cli.run(main)
