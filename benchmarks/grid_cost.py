"""What the paper grid costs in GPU-hours on one H100-class GPU, from measured throughput and the split sizes.

    python benchmarks/grid_cost.py                   # the table of docs/performance.md, "What the paper grid costs"
    python benchmarks/grid_cost.py --config params.yaml other.yaml

The grid is the configuration's (LoRA-tuned models x datasets x {base conditions + recipes x seeds}; API models
cost no GPU time and the encoder baselines are left out), with
its `finetune` settings (epochs, batch_size, token_budget, max_length, eval_steps, max_dev_items,
votes_per_item, quantization) and `extract` settings (splits, debias). Everything else is stated below:

* Split sizes: Scruples v1.0 anecdotes 27,766 / 2,500 / 2,500 (train / dev / test); dilemmas about 10,000 in
  all with 2,340 in dev and in test, so 5,320 in train.
* Prompt lengths with the chat template (tokens): anecdotes lognormal, median 420, sigma 0.45, as
  benchmarks/gpu_extract.py draws them (a Reddit post in a Llama 3.1 template; clipped to 2,048 for extraction
  and shortened to finetune.max_length for training); dilemmas median 105, sigma 0.15 (two actions of a dozen
  words each in the same template). Every prompt opens with the same 50-token chat header (Llama 3.1's system
  turn with its date lines and the system text), which the trainer computes once per micro-batch.
* Throughput: measured on one H200 at the exact Llama-3.1-8B shape at commit 7e99624 (docs/performance.md).
  "old loop": the fine-tuning step then (4 rows x 512 tokens, gradient checkpointing, the `votes` recipe as
  votes_per_item rows per item, fixed batches of rows): QLoRA 2,942 tokens/s, bf16 LoRA 4,477. "this loop":
  what the present trainer is expected to run at, taken from the same measurements without gradient
  checkpointing (same LoRA wrapper and loss): QLoRA 7,053 tokens/s at 16 x 512 tokens, bf16 LoRA 8,884 at 8 x 512
  and 9,168 at 16 x 512. On an H200 `memory_plan` keeps checkpointing off, at 8,192-token micro-batches for bf16
  LoRA and 4,096 for QLoRA (8,192 would need ~134 GiB); at 4,096 tokens QLoRA is taken at 97 % of its 8,192
  figure, the ratio bf16 LoRA showed between 8 x 512 and 16 x 512. These rates count every token a micro-batch
  computes, padding included: the padding of length-sorted micro-batches and the tokens the shared header saves
  are simulated here with the trainer's own batching (moralign.extraction.make_batches) on the lengths above.
  Extraction (and dev evaluation, a forward pass): 28,894 tokens/s (bf16, 2,500 prompts without a shared
  prefix, budget 65,536), the shared header computed once per split as the engine does; dev evaluation of a
  QLoRA model is taken at that rate times the QLoRA / bf16 training ratio (7,053 / 8,884).
  Not yet measured with this loop on a GPU: benchmarks/gpu_finetune.py prints these figures when one is lent.
* An H100 has the H200's dense bf16 peak (989 TFLOP/s) and 80 GB: QLoRA fits there as planned here; bf16 LoRA
  would run at 4,096-token micro-batches.
"""

import argparse
import math
from pathlib import Path

import numpy as np

from moralign.config import load_config
from moralign.extraction import make_batches

ROOT = Path(__file__).resolve().parents[1]
SPLITS = {
    "anecdotes": {"train": 27766, "dev": 2500, "test": 2500},
    "dilemmas": {"train": 5320, "dev": 2340, "test": 2340},
}
LENGTHS = {"anecdotes": (420, 0.45), "dilemmas": (105, 0.15)}
SHARED_HEADER = 50
EXTRACT_CLIP = 2048
MEASURED = {  # tokens/s on one H200, Llama-3.1-8B shape, commit 7e99624 (docs/performance.md)
    "old": {"4bit": 2942, "none": 4477},
    "new": {"4bit": 7053 * 0.97, "none": 9168},
    "extract": 28894,
}
NEW_BUDGET = {"4bit": 4096, "none": 8192}  # memory_plan's micro-batch on an H200 (see above)


def lengths(dataset: str, n: int, cap: int, seed: int = 0) -> np.ndarray:
    """Prompt lengths drawn from the stated distribution, at most ``cap`` tokens."""
    median, sigma = LENGTHS[dataset]
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, size=n).astype(int), 32, cap)


def computed_per_prompt_token(dataset: str, cap: int, batch: int, budget: int, steps: int = 400) -> float:
    """Tokens the trainer computes (padding in, the shared header once per micro-batch) per prompt token.

    The trainer's own accounting (MoralignTrainer.tokens) over simulated optimiser steps of ``batch`` items.
    """
    prompt = computed = 0
    for s in range(steps):
        step = lengths(dataset, batch, cap, seed=1000 + s)
        for chunk in make_batches(step.tolist(), budget, batch):
            rows = step[chunk]
            prompt += int(rows.sum())
            shared = SHARED_HEADER if len(rows) > 1 else 0
            computed += shared + len(rows) * (int(rows.max()) - shared)
    return computed / prompt


def finetune_hours(dataset: str, recipe: dict, loop: str) -> tuple[float, float]:
    """(training, dev evaluation) GPU-hours of one fine-tuning cell with ``loop`` = old or new."""
    items = SPLITS[dataset]["train"]
    cap = recipe["max_length"]
    mean = float(lengths(dataset, 200_000, cap).mean())
    rows = items * (recipe["votes_per_item"] if loop == "old" and recipe["objective"] == "votes" else 1)
    steps = math.ceil(rows / recipe["batch_size"]) * recipe["epochs"]  # old loop: 4 rows x 4 accumulated = 16
    tokens = rows * mean * recipe["epochs"]
    if loop == "new":
        tokens *= computed_per_prompt_token(dataset, cap, recipe["batch_size"], NEW_BUDGET[recipe["quantization"]])
    train = tokens / MEASURED[loop][recipe["quantization"]]
    evals = math.ceil(steps / recipe["eval_steps"])  # every eval_steps and at the last step
    dev_items = min(recipe["max_dev_items"] or SPLITS[dataset]["dev"], SPLITS[dataset]["dev"])
    eval_rate = MEASURED["extract"] * (7053 / 8884 if recipe["quantization"] == "4bit" else 1)
    # the extraction engine computes the shared header once per call (Scorer's reuse_prefix)
    dev = evals * dev_items * (mean - SHARED_HEADER) / eval_rate
    return train / 3600, dev / 3600


def extract_hours(dataset: str, extract: dict) -> float:
    """GPU-hours of one extraction cell (its splits; twice with debias: swap), the shared header computed once."""
    mean = float(lengths(dataset, 200_000, EXTRACT_CLIP).mean())
    items = sum(SPLITS[dataset][s] for s in extract["splits"])
    passes = 2 if extract["debias"] == "swap" else 1
    return passes * items * (mean - SHARED_HEADER) / MEASURED["extract"] / 3600


def table(cfg) -> str:
    """The table of docs/performance.md: GPU-hours per cell and in total, old loop and this one."""
    # LoRA-tuned chat models; API models cost no GPU time, and the encoder baselines (minutes per cell; see
    # benchmarks/gpu_encoder.py) are not in this table.
    local = [m for m in cfg.models if cfg.backend(m) == "hf"]
    datasets, recipes = cfg.datasets, cfg.recipes
    extract = cfg.data["extract"]
    out = [
        "| cell | per cell: old loop | per cell: this loop | cells | grid: old loop | grid: this loop |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    totals = {"old": 0.0, "new": 0.0}
    for dataset in datasets:
        if dataset not in SPLITS:
            continue
        for name in recipes:
            recipe = cfg.finetune(name)
            old = sum(finetune_hours(dataset, recipe, "old"))
            train, dev = finetune_hours(dataset, recipe, "new")
            new = train + dev
            n = len(local) * len(recipe["seeds"])  # one adapter per model and training seed
            totals["old"] += n * old
            totals["new"] += n * new
            kind = "QLoRA" if recipe["quantization"] == "4bit" else "bf16 LoRA"
            out.append(
                f"| fine-tune {dataset}, {name} ({kind}; "
                f"dev evaluation {dev / train:.1%} of training) | {old:.2f} | {new:.2f} | {n} | "
                f"{n * old:.2f} | {n * new:.2f} |"
            )
        hours = extract_hours(dataset, extract)
        # per model: its base conditions (base, and base-4bit beside QLoRA recipes) and one cell per recipe and seed
        n = sum(len(cfg.conditions_of(m)) - len(recipes) for m in local)
        n += len(local) * sum(len(cfg.finetune(r)["seeds"]) for r in recipes)
        totals["old"] += n * hours
        totals["new"] += n * hours
        out.append(
            f"| extract {dataset} ({' + '.join(extract['splits'])}) | {hours:.3f} | {hours:.3f} | {n} | "
            f"{n * hours:.2f} | {n * hours:.2f} |"
        )
    out.append(f"| **total** | | | | **{totals['old']:.1f}** | **{totals['new']:.1f}** |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", type=Path, default=[ROOT / "params.yaml"])
    print(table(load_config(p.parse_args().config)))


if __name__ == "__main__":
    main()
