"""Answer probabilities for every item of one (model, dataset, condition) cell.

Examples:
    python workflow/scripts/extract.py --config params.yaml --model zephyr-7b-beta --dataset dilemmas \
        --condition base --data-dir data/paper/processed/dilemmas --base models/paper/base/zephyr-7b-beta \
        --out-dir results/paper/predictions/dilemmas/zephyr-7b-beta/base
    # a fine-tuned condition adds --adapter models/paper/adapters/dilemmas/zephyr-7b-beta/soft/seed-0 and
    # --base-quantization 4bit (the base it was trained on, checked against the adapter's metadata)
    # an API model (backend openai) takes --cache-dir cache/openai instead of --base; --dry-run states the
    # requests, estimated prompt tokens and cost without sending anything:
    python workflow/scripts/extract.py --config params.yaml --model gpt-4o --dataset dilemmas --condition base \
        --data-dir data/paper/processed/dilemmas --cache-dir cache/openai \
        --out-dir results/paper/predictions/dilemmas/gpt-4o/base --dry-run
"""

import json

from moralign import cli
from moralign.predictors import CellInputs
from moralign.steps import extract


def main(argv=None):
    p = cli.cell_parser(__doc__)
    p.add_argument("--dry-run", action="store_true", help="print the plan (requests, tokens, cost) and stop")
    args = p.parse_args(argv)
    inputs = CellInputs(*cli.take(args, "data_dir", "base", "adapter", "cache_dir", "base_quantization"))
    plan = cli.call(extract.run, args, inputs=inputs)
    if args.dry_run:
        print(json.dumps(plan, indent=2, sort_keys=True))


if __name__ == "__main__":
    cli.run(main)
