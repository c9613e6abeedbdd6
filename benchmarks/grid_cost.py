"""What the paper grid costs in GPU-hours on one H100-class GPU, from throughput rates and the split sizes.

    python benchmarks/grid_cost.py                   # the grid table, rates from the latest GPU JSON in results/
    python benchmarks/grid_cost.py --config params.yaml other.yaml

docs/performance.md shows this table with the rates it used (benchmarks/cost_table.py writes that block). Each
rate is measured, read from the latest JSON benchmarks/gpu_suite.py wrote on a GPU into benchmarks/results/
(:func:`latest_result`, :func:`measured_rates`), or projected (:data:`PROJECTED`, each saying from what) where no
such JSON holds it.

The grid is the configuration's (LoRA-tuned models x datasets x {base conditions + recipes x seeds}; API models
cost no GPU time and the encoder baselines are left out), with its `finetune` settings (epochs, batch_size,
max_length, eval_steps, max_dev_items, votes_per_item, quantization) and `extract` settings (splits, debias,
engine). Everything else is stated below:

* Split sizes: Scruples v1.0 anecdotes 27,766 / 2,500 / 2,500 (train / dev / test); dilemmas about 10,000 in
  all with 2,340 in dev and in test, so 5,320 in train.
* Prompt lengths with the chat template (tokens): anecdotes lognormal, median 420, sigma 0.45, the distribution
  benchmarks/common.py's ANECDOTE_LENGTHS states (a Reddit post in a Llama 3.1 template; clipped to 2,048 for extraction
  and shortened to finetune.max_length for training); dilemmas median 105, sigma 0.15 (two actions of a dozen
  words each in the same template). Every prompt opens with the same 50-token chat header (Llama 3.1's system
  turn with its date lines and the system text), which the trainer computes once per micro-batch.
* "old loop": the fine-tuning step measured on one H200 at the exact Llama-3.1-8B shape at commit 7e99624 (4
  rows x 512 tokens, gradient checkpointing, the `votes` recipe as votes_per_item rows per item, fixed batches
  of rows): QLoRA 2,942 tokens/s, bf16 LoRA 4,477. A record of what the present loop replaced.
* "this loop": the present trainer. Its rates count every token a micro-batch computes, padding included (the
  suite's ``padded_tokens_per_s``); the padding of length-sorted micro-batches under the rate's token budget and
  the tokens the shared header saves are simulated here with the trainer's own batching
  (moralign.extraction.make_batches) on the lengths above. Projected (no GPU JSON yet): the 7e99624 measurements
  without gradient checkpointing (same LoRA wrapper and loss): QLoRA 7,053 tokens/s at 16 x 512 tokens, taken at
  97 % for the 4,096-token micro-batches `memory_plan` picks on an H200 (8,192 would need ~134 GiB; 97 % is the
  ratio bf16 LoRA showed between 8 x 512 and 16 x 512), bf16 LoRA 9,168 at 16 x 512 (8,192-token
  micro-batches). An H100 has the H200's dense bf16 peak (989 TFLOP/s) and 80 GB: QLoRA fits there as planned.
* Extraction (and dev evaluation, a forward pass) at the configured engine's rate on prompts without a shared
  prefix, the shared header computed once per split as the engine does; dev evaluation of a QLoRA model at that
  rate times the QLoRA / bf16 LoRA training ratio. Projected: 28,894 tokens/s (the padded engine on an H200 at
  7e99624, 2,500 prompts, budget 65,536).
* Readings (docs/readings.md, "Cost per item"), below the total: per item of the eval split (at most
  readings.max_items), the prompt pass extraction costs, plus `sample`'s N completions of at most max_new_tokens
  and a stop token and `verbal`'s K JSON objects of at most max_json_tokens, each completion taken at its longest,
  at the batched-sampling rate. N, K, max_new_tokens, the models read and the readings drawn are the
  configuration's `readings` section and `experiment.readings`; the prompt pass is one per item whatever
  extract.debias says (a reading draws from the prompt as written); the format-following draws (a few hundred
  items per model) are left out. Projected rate: 10,000 generated tokens/s, the low end of
  docs/readings.md's 10,000-20,000 for an 8B model decoding a few hundred rows at once in this eager loop.
"""

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moralign.config import load_config
from moralign.extraction import make_batches
from moralign.readings import verbal

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SPLITS = {
    "anecdotes": {"train": 27766, "dev": 2500, "test": 2500},
    "dilemmas": {"train": 5320, "dev": 2340, "test": 2340},
}
LENGTHS = {"anecdotes": (420, 0.45), "dilemmas": (105, 0.15)}
SHARED_HEADER = 50
EXTRACT_CLIP = 2048
OLD_LOOP = {"4bit": 2942, "none": 4477}  # tokens/s, H200, commit 7e99624: the loop this one replaced
H200_7E99624 = 'on an H200 at commit 7e99624 ("Measured on a GPU" below)'


@dataclass(frozen=True)
class Rate:
    """A throughput the grid is computed from, and where it comes from."""

    value: float
    source: str
    measured: bool = False
    token_budget: int | None = None  # fine-tuning: the micro-batch the rate was reached at
    mfu: float | None = None  # against the spec sheet's dense bf16 peak, where the source gives it


PROJECTED = {
    "finetune 4bit": Rate(
        7053 * 0.97,
        f"projected: QLoRA 7,053 tokens/s at 16 x 512 without checkpointing {H200_7E99624}, at 97 % for 4,096",
        token_budget=4096,
        mfu=0.321 * 0.97,
    ),
    "finetune none": Rate(
        9168, f"projected: bf16 LoRA at 16 x 512 without checkpointing {H200_7E99624}", token_budget=8192, mfu=0.417
    ),
    "extract": Rate(28894, f"projected: the padded engine, 2,500 prompts, budget 65,536, {H200_7E99624}", mfu=0.412),
    "eval 4bit": Rate(7053 / 8884, f"projected: QLoRA / bf16 LoRA training throughput {H200_7E99624}"),
    "generate": Rate(10000, "projected: low end of docs/readings.md's 10,000-20,000 for an 8B model, eager loop"),
}


def lengths(dataset: str, n: int, cap: int, seed: int = 0) -> np.ndarray:
    """Prompt lengths drawn from the stated distribution, at most ``cap`` tokens."""
    median, sigma = LENGTHS[dataset]
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, size=n).astype(int), 32, cap)


def latest_result(folder: Path = RESULTS) -> tuple[Path, dict[str, Any]] | None:
    """The newest GPU measurement in ``folder`` (``measurement`` true; tiny or CPU runs never count), or None."""
    found = []
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        if result.get("measurement") is True:
            found.append((result["provenance"]["date"], path.name, path, result))
    return max(found)[2:] if found else None


def _figure(result: dict[str, Any], part: str, run: str, key: str) -> float | None:
    """A figure of a part's run, or None where the part failed or the run was skipped."""
    record = result["parts"].get(part, {})
    if record.get("status") != "ok":
        return None
    return record["figures"].get(run, {}).get(key)


def measured_rates(path: Path, result: dict[str, Any], engine: str) -> dict[str, Rate]:
    """The rates the JSON at ``path`` measured (extraction with ``engine``); the others are missing from it."""
    p = result["provenance"]
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    where = f"measured: {name} ({p['device']}, commit {p['commit'][:7]})"
    rates: dict[str, Rate] = {}
    finetune = {}
    for quant, variant in (("4bit", "qlora"), ("none", "lora")):
        for checkpointing in ("off", "on"):  # what `gradient_checkpointing: auto` runs: off where it fits
            run = f"{variant}, checkpointing {checkpointing}"
            value = _figure(result, "finetune", run, "padded_tokens_per_s")
            if value is not None:
                budget = int(_figure(result, "finetune", run, "token_budget"))
                mfu = _figure(result, "finetune", run, "mfu_spec")
                finetune[quant] = value
                rates[f"finetune {quant}"] = Rate(value, f"{where}, {run}", True, budget, mfu)
                break
    if len(finetune) == 2:
        rates["eval 4bit"] = Rate(finetune["4bit"] / finetune["none"], f"{where}, QLoRA / bf16 LoRA training", True)
    value = _figure(result, "extraction", engine, "tokens_per_s")
    if value is not None:
        mfu = _figure(result, "extraction", engine, "mfu_spec")
        rates["extract"] = Rate(value, f"{where}, the {engine} engine", True, mfu=mfu)
    value = _figure(result, "generation", "sample", "tokens_per_s")
    if value is not None:
        rates["generate"] = Rate(value, f"{where}, batched sampling", True)
    for run in ("train", "predict anecdotes"):  # not in the grid (encoder cells are minutes); shown beside it
        value = _figure(result, "encoder", run, "tokens_per_s")
        if value is not None:
            rates[f"encoder {run}"] = Rate(value, f"{where}, roberta-large {run}", True)
    return rates


def current_rates(cfg, folder: Path = RESULTS) -> tuple[dict[str, Rate], Path | None]:
    """The projections, with what the latest GPU JSON in ``folder`` measured in their place; and that JSON."""
    latest = latest_result(folder)
    if latest is None:
        return dict(PROJECTED), None
    path, result = latest
    return {**PROJECTED, **measured_rates(path, result, cfg["extract"].get("engine", "padded"))}, path


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


def finetune_hours(dataset: str, recipe: dict, loop: str, rates: dict[str, Rate]) -> tuple[float, float]:
    """(training, dev evaluation) GPU-hours of one fine-tuning cell with ``loop`` = old or new."""
    items = SPLITS[dataset]["train"]
    cap = recipe["max_length"]
    quant = recipe["quantization"]
    mean = float(lengths(dataset, 200_000, cap).mean())
    rows = items * (recipe["votes_per_item"] if loop == "old" and recipe["objective"] == "votes" else 1)
    steps = math.ceil(rows / recipe["batch_size"]) * recipe["epochs"]  # old loop: 4 rows x 4 accumulated = 16
    tokens = rows * mean * recipe["epochs"]
    if loop == "new":
        rate = rates[f"finetune {quant}"]
        tokens *= computed_per_prompt_token(dataset, cap, recipe["batch_size"], rate.token_budget)
        train = tokens / rate.value
    else:
        train = tokens / OLD_LOOP[quant]
    evals = math.ceil(steps / recipe["eval_steps"])  # every eval_steps and at the last step
    dev_items = min(recipe["max_dev_items"] or SPLITS[dataset]["dev"], SPLITS[dataset]["dev"])
    eval_rate = rates["extract"].value * (rates["eval 4bit"].value if quant == "4bit" else 1)
    # the extraction engine computes the shared header once per call (Scorer's reuse_prefix)
    dev = evals * dev_items * (mean - SHARED_HEADER) / eval_rate
    return train / 3600, dev / 3600


def extract_hours(dataset: str, extract: dict, rates: dict[str, Rate], sizes: dict[str, int] | None = None) -> float:
    """GPU-hours of one extraction cell (its splits; twice with debias: swap), the shared header computed once."""
    mean = float(lengths(dataset, 200_000, EXTRACT_CLIP).mean())
    items = sum((sizes or SPLITS[dataset])[s] for s in extract["splits"])
    passes = 2 if extract["debias"] == "swap" else 1
    return passes * items * (mean - SHARED_HEADER) / rates["extract"].value / 3600


def reading_tokens(cfg, dataset: str) -> dict[str, int]:
    """Generated tokens per item at most, for each reading drawn: ``sample`` N x (max_new_tokens + stop),
    ``verbal`` K x max_json_tokens."""
    settings = cfg["readings"]
    most = {
        "sample": settings["sample"]["n_draws"] * (settings["sample"]["max_new_tokens"] + 1),
        "verbal": settings["verbal"]["n_draws"] * verbal.max_json_tokens(cfg["prompts"][dataset]["answers"]),
    }
    return {r: most[r] for r in cfg.readings}


def reading_hours(dataset: str, cfg, tokens: dict[str, int], rates: dict[str, Rate]) -> dict[str, float]:
    """GPU-hours of each reading of one cell: a prompt pass over its items and their ``tokens`` generated."""
    items = SPLITS[dataset][cfg["experiment"]["eval_split"]]
    items = min(items, cfg["readings"]["max_items"] or items)
    # one pass per prompt as written: extract.debias does not apply to the readings
    prompt = extract_hours(dataset, {"splits": ["read"], "debias": "none"}, rates, {"read": items})
    return {r: prompt + items * n / rates["generate"].value / 3600 for r, n in tokens.items()}


def table(cfg, rates: dict[str, Rate]) -> str:
    """GPU-hours per cell and in total, old loop and this one; below the total, the readings."""
    # LoRA-tuned chat models; API models cost no GPU time, and the encoder baselines (minutes per cell; see
    # benchmarks/gpu_encoder.py) are not in this table.
    local = [m for m in cfg.models if cfg.backend(m) == "hf"]
    recipes = cfg.recipes
    extract = cfg.data["extract"]
    read = [m for m in cfg.read_models() if m in local]
    basis = "measured rate" if rates["generate"].measured else "projected rate"
    out = [
        "| cell | per cell: old loop | per cell: this loop | cells | grid: old loop | grid: this loop |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    read_rows = []
    totals = {"old": 0.0, "new": 0.0, "readings": 0.0}
    for dataset in [d for d in cfg.datasets if d in SPLITS]:
        for name in recipes:
            recipe = cfg.finetune(name)
            old = sum(finetune_hours(dataset, recipe, "old", rates))
            train, dev = finetune_hours(dataset, recipe, "new", rates)
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
        hours = extract_hours(dataset, extract, rates)
        n = cells(cfg, local)
        totals["old"] += n * hours
        totals["new"] += n * hours
        out.append(
            f"| extract {dataset} ({' + '.join(extract['splits'])}) | {hours:.3f} | {hours:.3f} | {n} | "
            f"{n * hours:.2f} | {n * hours:.2f} |"
        )
        n = cells(cfg, read)  # every condition of a model read, as extraction
        tokens = reading_tokens(cfg, dataset)
        for reading, h in reading_hours(dataset, cfg, tokens, rates).items():
            totals["readings"] += n * h
            read_rows.append(
                f"| read {dataset}, {reading} (≤ {tokens[reading]} tokens per item; {basis}) | | {h:.3f} | {n} | "
                f"| {n * h:.2f} |"
            )
    out.append(f"| **total** | | | | **{totals['old']:.1f}** | **{totals['new']:.1f}** |")
    if read_rows:
        out += read_rows
        out.append(f"| **total with the readings** | | | | | **{totals['new'] + totals['readings']:.1f}** |")
    return "\n".join(out)


def cells(cfg, models: list[str]) -> int:
    """Scored cells per dataset of ``models``: their base conditions (base, and base-4bit beside QLoRA recipes)
    and one cell per recipe and training seed."""
    return sum(len(cfg.seeds_of(m, c)) for m in models for c in cfg.conditions_of(m))


def main() -> None:
    """Print the grid table for ``--config``, with the rates of the latest GPU JSON where it has them."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", type=Path, default=[ROOT / "params.yaml"])
    p.add_argument("--results", type=Path, default=RESULTS, help="where the suite's JSON files are")
    args = p.parse_args()
    cfg = load_config(args.config)
    print(table(cfg, current_rates(cfg, args.results)[0]))


if __name__ == "__main__":
    main()
