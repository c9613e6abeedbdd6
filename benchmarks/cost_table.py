"""Writes docs/performance.md's cost table: the rates, each measured or projected, and the grid's GPU-hours.

    python benchmarks/cost_table.py            # rewrite the block between the grid-cost markers of the doc
    python benchmarks/cost_table.py --check    # exit 1 where the committed block is not what this computes
    python benchmarks/cost_table.py --print --results /some/folder

The rates come from the latest JSON benchmarks/gpu_suite.py wrote on a GPU into benchmarks/results/ (a ``--tiny``
or CPU run never counts), and are projections where no such JSON holds them (benchmarks/grid_cost.py says from
what). After dropping a GPU JSON there, run this and commit both: the tests check the block is this output.
"""

import argparse
import re
import sys
from pathlib import Path

from grid_cost import RESULTS, ROOT, Rate, current_rates, table

from moralign.config import load_config
from moralign.io import atomic_path

DOC = ROOT / "docs" / "performance.md"
START, END = "<!-- grid-cost:start -->", "<!-- grid-cost:end -->"
RATES = {  # rate key -> (what it is, unit)
    "extract": ("extraction, {engine} engine, 8B shape, bf16", "tokens/s"),
    "finetune 4bit": ("fine-tuning step, this loop, QLoRA", "tokens/s, padding in"),
    "finetune none": ("fine-tuning step, this loop, bf16 LoRA", "tokens/s, padding in"),
    "eval 4bit": ("dev evaluation of a QLoRA model, relative to bf16", "x"),
    "generate": ("batched sampling (the readings), 8B shape", "generated tokens/s"),
    "encoder train": ("encoder training, roberta-large (not in the grid)", "tokens/s"),
    "encoder predict anecdotes": ("encoder prediction, roberta-large (not in the grid)", "tokens/s"),
}


def rate_row(key: str, rate: Rate | None, engine: str) -> str:
    """One row of the rates table: what, value, MFU, and measured or projected from what."""
    what, unit = RATES[key]
    what = what.format(engine=engine)
    if rate is None:
        return f"| {what} | | | not measured yet (`benchmarks/gpu_suite.py` measures it) |"
    if rate.token_budget:
        what += f" ({rate.token_budget:,}-token micro-batches)"
    value = f"{rate.value:.2f} {unit}" if unit == "x" else f"{rate.value:,.0f} {unit}"
    mfu = f"{rate.mfu:.1%}" if rate.mfu is not None else ""
    return f"| {what} | {value} | {mfu} | {rate.source} |"


def block(cfg, folder: Path = RESULTS) -> str:
    """The text between the markers: which JSON was read (or that none exists), the rates, the grid table."""
    rates, path = current_rates(cfg, folder)
    engine = cfg["extract"].get("engine", "padded")
    if path is None:
        head = (
            f"No GPU measurement in `{folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}/` yet: "
            "every rate of this loop is a projection, from the figures it names."
        )
    else:
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        head = f"Rates measured by `{name}`; those it lacks are projections, from the figures they name."
    rows = [rate_row(k, rates.get(k), engine) for k in RATES]
    return "\n".join(
        [
            head,
            "",
            "| rate | value | MFU | measured or projected |",
            "|---|---:|---:|---|",
            *rows,
            "| fine-tuning step, old loop, QLoRA / bf16 LoRA | 2,942 / 4,477 tokens/s | 13.4% / 20.4% | measured on an "
            "H200 at commit 7e99624: the loop this one replaced (4 x 512 tokens, gradient checkpointing) |",
            "",
            table(cfg, rates),
        ]
    )


def rewrite(text: str, new: str) -> str:
    """``text`` with the block between the markers replaced by ``new``."""
    if START not in text or END not in text:
        raise SystemExit(f"{DOC}: the markers {START} and {END} are missing")
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{new}\n{END}", text, flags=re.S)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the doc's block (default), print it, or check that the committed one is current."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", type=Path, default=[ROOT / "params.yaml"])
    p.add_argument("--results", type=Path, default=RESULTS, help="where the suite's JSON files are")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if docs/performance.md's block is stale")
    mode.add_argument("--print", action="store_true", help="print the block, write nothing")
    args = p.parse_args(argv)
    new = block(load_config(args.config), args.results)
    if args.print:
        print(new)
        return 0
    text = DOC.read_text()
    if args.check:
        current = rewrite(text, new) == text
        print("docs/performance.md's cost table is current" if current else "stale: run benchmarks/cost_table.py")
        return 0 if current else 1
    with atomic_path(DOC) as tmp:
        tmp.write_text(rewrite(text, new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
