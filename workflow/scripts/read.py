"""The `sample` and `verbal` readings of one (model, dataset, condition) cell: sampled and stated answer shares.

Examples:
    python workflow/scripts/read.py --config params.yaml --model zephyr-7b-beta --dataset dilemmas \
        --condition base --data-dir data/paper/processed/dilemmas --base models/paper/base/zephyr-7b-beta \
        --cache-dir cache/generations --out-dir results/paper/readings/dilemmas/zephyr-7b-beta/base
    # a fine-tuned condition adds --adapter models/paper/adapters/dilemmas/zephyr-7b-beta/soft/seed-0 and
    # --base-quantization 4bit; an API model (backend openai) takes --cache-dir cache/openai and no --base
"""

from pathlib import Path

from moralign import cli
from moralign.steps import read


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--condition", required=True)
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument(
        "--cache-dir", type=Path, help="generation (local) or response (API) cache, outside the declared outputs"
    )
    p.add_argument("--base", type=Path, help="folder of the base model (local models)")
    p.add_argument("--adapter", type=Path, help="adapter folder (fine-tuned conditions)")
    p.add_argument(
        "--base-quantization",
        choices=["none", "4bit"],
        help="the base weights an adapter was trained on, as planned (an adapter trained otherwise is an error)",
    )
    args = p.parse_args(argv)
    read.run(
        cli.start(args),
        args.model,
        args.dataset,
        args.condition,
        args.data_dir,
        args.out_dir,
        args.cache_dir,
        args.base,
        args.adapter,
        args.base_quantization,
    )


if __name__ == "__main__":
    cli.run(main)
