"""One GPU call measures everything the cost table needs, each part under a time budget (all of it < 8 min, H100).

    python benchmarks/gpu_suite.py                                   # writes benchmarks/results/<gpu>-<date>.json
    python benchmarks/gpu_suite.py --commit "$(git rev-parse HEAD)"  # where the tree has no .git (a lent machine)
    python benchmarks/gpu_suite.py --tiny --out /tmp/suite.json      # the same code on a CPU, tiny shapes, seconds
    python benchmarks/gpu_suite.py --parts gemm extraction --compile --budget extraction=300

The parts, in this order; each is a function returning its settings and figures, built from the other benchmarks'
pieces (common.py, gpu_finetune.py, gpu_encoder.py) and the project's own engines:

* ``gemm``: a bf16 8192^3 matrix product, the rate the card really reaches. Every MFU is given against it
  (``mfu_gemm``) beside the spec sheet's dense bf16 peak (``mfu_spec``).
* ``extraction``: the Llama-3.1-8B shape, random bf16 weights, prompts with the Scruples anecdotes lengths; both
  engines (``padded``, the reference, and ``packed``; with ``--compile`` both again under ``torch.compile``, the
  compile time being the warm-up call's excess over its steady-state time), each with its padding efficiency (real
  tokens / computed tokens) and the bare forward pass over the same inputs (``vs_bare_forward``: the engine's
  throughput over the bare pass's).
* ``finetune``: the project's trainer as gpu_finetune.py runs it (params.yaml's ``finetune`` settings, the
  ``soft`` recipe, anecdote-length rows), QLoRA and bf16 LoRA, gradient checkpointing off (at the micro-batch
  ``memory_plan`` picks without it) and on (at the configured ``token_budget``).
* ``encoder``: the roberta-large shape, training steps and prediction as gpu_encoder.py runs them.
* ``generation``: batched seeded sampling through moralign.readings.sample.Sampler at the 8B shape, as the
  ``sample`` reading draws: N completions of at most max_new_tokens per anecdote-length prompt (params.yaml's
  `readings`: 30 and 32).

Each part stops starting new work once its budget is spent (the run in progress finishes) and says what it left
out and why, as it does for what cannot run here (QLoRA needs CUDA and bitsandbytes). A part that fails records
its error and the others still run. Every part carries the provenance (commit, device, torch, transformers, peft,
trl, bitsandbytes, CUDA, threads) and its settings beside its figures. ``measurement`` is true only for a full-size
run on a GPU: benchmarks/cost_table.py reads only those, so a ``--tiny`` JSON is never taken for a measurement (and
``--tiny`` writes to a temporary folder unless ``--out`` says otherwise). A Markdown summary is written beside the
JSON and printed.
"""

import argparse
import gc
import importlib.metadata
import json
import platform
import re
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    ANECDOTE_LENGTHS,
    LLAMA_31_8B,
    TINY,
    Timer,
    anecdote_lengths,
    bare_forward,
    bare_forward_inputs,
    forward_flops,
    padding_efficiency,
    peak_flops,
    random_llama,
)
from gpu_encoder import LENGTHS as ENCODER_LENGTHS
from gpu_encoder import ROBERTA_LARGE, non_embedding_params, random_encoder, synthetic_data, warm_trainer
from gpu_encoder import TINY as ENCODER_TINY
from gpu_finetune import (
    ANSWERS,
    finetune_settings,
    non_embedding_params_from_shape,
    planned_model,
    row_lengths,
    train_timed,
)
from grid_cost import RESULTS, ROOT, SHARED_HEADER
from transformers import TrainerCallback

from moralign.io import atomic_path

# Seconds per part on a GPU: 420 in all, which leaves a minute of the 8 for imports, model builds and the writing
BUDGET_S = {"gemm": 15, "extraction": 120, "finetune": 165, "encoder": 55, "generation": 65}


@dataclass
class Budget:
    """Seconds a part may spend; a part asks before it starts each piece of work."""

    seconds: float

    def __post_init__(self) -> None:
        self.t0 = time.perf_counter()

    def left(self) -> float:
        """Seconds not yet spent."""
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, estimate: float) -> bool:
        """Whether a piece of work expected to take ``estimate`` seconds still fits."""
        return self.left() >= estimate

    def refusal(self, estimate: float) -> dict[str, str]:
        """The record of a piece of work left out for lack of time."""
        return {
            "skipped": f"time budget: {max(self.left(), 0):.0f} s of {self.seconds:g} left, ~{estimate:.0f} s needed"
        }


@dataclass
class Suite:
    """What every part needs: the device, the shapes, the options, and the GEMM rate once measured."""

    device: torch.device
    tiny: bool
    args: argparse.Namespace
    gemm_flops: float | None = None

    @property
    def dtype(self) -> torch.dtype:
        """bfloat16 on a GPU; float32 on a CPU (tiny shapes)."""
        return torch.float32 if self.device.type == "cpu" else torch.bfloat16

    @property
    def scale(self) -> int:
        """Prompt lengths are divided by this for tiny shapes."""
        return 4 if self.tiny else 1

    def mfu(self, flops: float, seconds: float) -> dict[str, float | None]:
        """Achieved TFLOP/s and MFU against the spec sheet's peak and against the measured GEMM rate."""
        rate = flops / seconds
        peak = peak_flops(self.device)
        return {
            "tflops": rate / 1e12,
            "mfu_spec": rate / peak if peak else None,
            "mfu_gemm": rate / self.gemm_flops if self.gemm_flops else None,
        }

    def peak_memory_gib(self) -> float | None:
        """torch's max allocated GPU memory since the last reset (None on a CPU)."""
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None

    def reset_memory(self) -> None:
        """Free what the last run left and restart the peak-memory count."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)


def gemm(suite: Suite, budget: Budget) -> dict[str, Any]:
    """The n^3 matrix-product rate in the suite's dtype: what the card really does, the second MFU reference."""
    n = 512 if suite.tiny else 8192
    a, b = (torch.randn(n, n, device=suite.device, dtype=suite.dtype) for _ in range(2))
    for _ in range(3):  # warm-up: cuBLAS picks its kernel
        a @ b
    products, seconds = 0, 0.0
    target = min(0.2 if suite.tiny else 3.0, budget.left() / 2)
    while products < 10 or seconds < target:
        with Timer(suite.device) as t:
            for _ in range(10):
                a @ b
        products, seconds = products + 10, seconds + t.seconds
    rate = 2 * n**3 * products / seconds
    suite.gemm_flops = rate
    peak = peak_flops(suite.device)
    return {
        "settings": {"n": n, "dtype": str(suite.dtype), "products": products},
        "figures": {
            "gemm": {
                "tflops": rate / 1e12,
                "spec_tflops": peak / 1e12 if peak else None,
                "mfu_spec": rate / peak if peak else None,  # the product's own share of the spec sheet's peak
                "seconds": seconds,
            }
        },
    }


def extraction(suite: Suite, budget: Budget) -> dict[str, Any]:
    """Both extraction engines (and compiled, with --compile) at the 8B shape on the anecdotes length distribution."""
    from moralign.extraction_packed import make_scorer

    args = suite.args
    shape = TINY if suite.tiny else LLAMA_31_8B
    model = random_llama(shape, suite.device, suite.dtype)
    n = args.extract_items or (48 if suite.tiny else 1000)
    lengths = anecdote_lengths(n, seed=0, scale=suite.scale).tolist()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(10, shape["vocab_size"], size=k).tolist() for k in lengths]
    settings = {
        "shape": "tiny" if suite.tiny else "Llama-3.1-8B",
        "dtype": str(suite.dtype),
        "prompts": n,
        "tokens": int(sum(lengths)),
        "lengths": {**ANECDOTE_LENGTHS, "scale": suite.scale},
        "shared_prefix": 0,
        "token_budget": args.token_budget,
        "max_batch_size": args.max_batch_size,
    }
    engines = [(e, c) for c in ([False, True] if args.compile else [False]) for e in ("padded", "packed")]
    flops = forward_flops(model, lengths)
    figures: dict[str, Any] = {}
    last = 0.0
    for engine, compiled in engines:
        label = engine + (" + torch.compile" if compiled else "")
        if not budget.allows(last):
            figures[label] = budget.refusal(last)
            continue
        t0 = time.perf_counter()
        model.set_attn_implementation("sdpa")  # make_scorer switches the packed engine to FlexAttention on CUDA
        settings_e = {
            "engine": engine,
            "compile": compiled,
            "token_budget": args.token_budget,
            "max_batch_size": args.max_batch_size,
        }
        scorer = make_scorer(model, 0, settings_e)
        figures[label] = measure_engine(suite, scorer, prompts, flops, compiled)
        del scorer
        suite.reset_memory()
        last = time.perf_counter() - t0
    return {"settings": settings, "figures": figures}


def measure_engine(suite: Suite, scorer: Any, prompts: list[list[int]], flops: float, compiled: bool) -> dict[str, Any]:
    """Tokens/s, MFU, padding efficiency and the ratio to the bare forward pass of one engine."""
    lengths = [len(p) for p in prompts]
    warm = prompts[:16]
    with Timer(suite.device) as first:
        scorer.score_tokens(warm, ANSWERS)  # warm-up: kernels, allocator; compilation under torch.compile
    with Timer(suite.device) as again:
        scorer.score_tokens(warm, ANSWERS)
    with Timer(suite.device) as t:
        scorer.score_tokens(prompts, ANSWERS)
    inputs = bare_forward_inputs(scorer, prompts)
    bare_forward(scorer.model, inputs[:1])  # warm-up of the bare pass's own shapes
    with Timer(suite.device) as bare:
        bare_forward(scorer.model, inputs)
    tokens = sum(lengths)
    return {
        "seconds": t.seconds,
        "tokens_per_s": tokens / t.seconds,
        "prompts_per_s": len(prompts) / t.seconds,
        **suite.mfu(flops, t.seconds),
        **padding_efficiency(scorer, lengths),
        "bare_forward_tokens_per_s": tokens / bare.seconds,
        "vs_bare_forward": bare.seconds / t.seconds,
        "first_call_s": first.seconds,
        "compile_s": max(first.seconds - again.seconds, 0.0) if compiled else None,
        "peak_memory_gib": suite.peak_memory_gib(),
        "attention": getattr(scorer.model.config, "_attn_implementation", None),
    }


class BudgetStop(TrainerCallback):
    """Ends training at the first step end past the part's budget; remembers the last step run."""

    def __init__(self, budget: Budget) -> None:
        self.budget, self.last_step = budget, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step = state.global_step
        if self.budget.left() <= 0:
            control.should_training_stop = True


def qlora_unavailable(device: torch.device) -> str | None:
    """Why QLoRA cannot run here, or None."""
    if device.type != "cuda":
        return "4-bit NF4 needs CUDA (and bitsandbytes)"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed (the `gpu` extra)"
    return None


def finetune(suite: Suite, budget: Budget) -> dict[str, Any]:
    """The project's fine-tuning step: QLoRA and bf16 LoRA, gradient checkpointing off and on."""
    args = suite.args
    figures: dict[str, Any] = {}
    last = 0.0
    for variant in ("qlora", "lora"):
        for checkpointing in ("off", "on"):
            label = f"{variant}, checkpointing {checkpointing}"
            reason = qlora_unavailable(suite.device) if variant == "qlora" else None
            if reason:
                figures[label] = {"skipped": reason}
                continue
            if not budget.allows(last):
                figures[label] = budget.refusal(last)
                continue
            t0 = time.perf_counter()
            suite.reset_memory()
            figures[label] = finetune_run(suite, variant, checkpointing, budget)
            suite.reset_memory()
            last = time.perf_counter() - t0
    settings = {
        "shape": "tiny" if suite.tiny else "Llama-3.1-8B",
        "recipe": "soft",
        "rows": "anecdotes",
        "lengths": row_lengths("anecdotes", finetune_settings("soft", False, 1, suite.tiny)["max_length"], suite.scale),
        "shared_header": SHARED_HEADER // suite.scale,
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "config": "params.yaml finetune, the soft recipe",
    }
    return {"settings": settings, "figures": figures}


def finetune_run(suite: Suite, variant: str, checkpointing: str, budget: Budget) -> dict[str, Any]:
    """One variant through build_trainer and trainer.train(), timed from the end of the warm-up steps."""
    args, device = suite.args, suite.device
    shape = TINY if suite.tiny else LLAMA_31_8B
    settings = finetune_settings(
        "soft",
        variant == "qlora",
        args.warmup + args.steps,
        suite.tiny,
        gradient_checkpointing="auto" if checkpointing == "off" else True,
    )
    model, plan = planned_model(shape, settings, device, suite.dtype)
    if checkpointing == "off" and plan["gradient_checkpointing"]:
        return {"skipped": f"no micro-batch fits without gradient checkpointing ({plan['reason']})"}
    stop = BudgetStop(budget)
    clock, recomputed = train_timed(model, plan, settings, "soft", "anecdotes", suite.scale, args.warmup, device, stop)
    steps = stop.last_step - args.warmup
    if steps <= 0:
        return {"skipped": "time budget: spent before the warm-up steps ended"}
    seconds, tokens = clock.seconds, clock.tokens
    n = non_embedding_params_from_shape(shape)
    return {
        "steps": steps,
        "items_per_step": settings["batch_size"],
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "prompt_tokens_per_s": tokens["prompt"] / seconds,
        "computed_tokens_per_s": tokens["computed"] / seconds,
        "padded_tokens_per_s": tokens["padded"] / seconds,
        "padding_efficiency": tokens["computed"] / tokens["padded"],
        **suite.mfu(6 * n * tokens["computed"], seconds),
        "peak_memory_gib": suite.peak_memory_gib(),
        "gradient_checkpointing": recomputed,
        "token_budget": plan["token_budget"],
        "plan": plan["reason"],
        **(
            {"note": "checkpointing asked for, not run: the trainer recomputes on CUDA only"}
            if plan["gradient_checkpointing"] and not recomputed
            else {}
        ),
        "dtype": str(suite.dtype),
        "quantization": settings["quantization"],
    }


def encoder(suite: Suite, budget: Budget) -> dict[str, Any]:
    """roberta-large shape: training steps of the anecdotes head, then prediction of anecdotes and dilemmas."""
    from moralign.encoder_heads import HEAD_CHOICE, HEAD_SEQUENCE

    shape = ENCODER_TINY if suite.tiny else ROBERTA_LARGE
    steps, batch_size = (2, 8) if suite.tiny else (10, 32)
    n_items = 32 if suite.tiny else 2500
    token_budget, infer_budget = 16384, 32768
    train, anecdotes, dilemmas = synthetic_data(shape, suite.tiny, steps, batch_size, n_items)
    model, trainer, batches = warm_trainer(shape, suite.device, train, batch_size, token_budget, steps)
    n = non_embedding_params(model.net)
    suite.reset_memory()
    tokens, done, seconds = 0, 0, 0.0
    for batch in batches:
        if not budget.allows(0):
            break
        with Timer(suite.device) as t:
            tokens += trainer.step(train, batch)[1]
        done, seconds = done + 1, seconds + t.seconds
    figures: dict[str, Any] = {
        "train": {
            "steps": done,
            "items_per_step": batch_size,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            **suite.mfu(6 * n * tokens, seconds),
            "peak_memory_gib": suite.peak_memory_gib(),
            "dtype": "float32 weights" + (", bfloat16 autocast" if suite.device.type == "cuda" else ""),
        }
    }
    del trainer, model
    suite.reset_memory()
    dtype = torch.bfloat16 if suite.device.type == "cuda" else torch.float32
    for label, head, data in (
        ("predict anecdotes", HEAD_SEQUENCE, anecdotes),
        ("predict dilemmas", HEAD_CHOICE, dilemmas),
    ):
        if not budget.allows(0):
            figures[label] = budget.refusal(0)
            continue
        model = random_encoder(shape, head, suite.device, dtype)
        model.predict(data[:16], infer_budget)  # warm-up
        with Timer(suite.device) as t:
            model.predict(data, infer_budget)
        tokens = sum(len(ids) for units in data for ids, _ in units)
        figures[label] = {
            "items": len(data),
            "seconds": t.seconds,
            "items_per_s": len(data) / t.seconds,
            "tokens_per_s": tokens / t.seconds,
            **suite.mfu(2 * n * tokens, t.seconds),
            "peak_memory_gib": suite.peak_memory_gib(),
            "dtype": str(dtype),
        }
        del model
        suite.reset_memory()
    settings = {
        "shape": "tiny" if suite.tiny else "roberta-large",
        "train_steps": steps,
        "batch_size": batch_size,
        "token_budget": token_budget,
        "infer_budget": infer_budget,
        "items": n_items,
        "lengths": ENCODER_LENGTHS,
    }
    return {"settings": settings, "figures": figures}


def generation(suite: Suite, budget: Budget) -> dict[str, Any]:
    """Batched seeded sampling (the ``sample`` reading's Sampler) at the 8B shape: generated tokens/s.

    N, max_new_tokens and the Sampler's batch limits are params.yaml's `readings` settings (--gen-token-budget and
    --gen-max-rows override the limits).
    """
    from moralign.config import load_config
    from moralign.readings.sample import Decoding, Sampler, uniforms

    args = suite.args
    readings = load_config([ROOT / "params.yaml"])["readings"]
    n_draws = readings["sample"]["n_draws"]
    decoding = Decoding(max_new_tokens=readings["sample"]["max_new_tokens"])
    limits = {
        "token_budget": args.gen_token_budget or readings["token_budget"],
        "max_rows": args.gen_max_rows or readings["max_rows"],
    }
    shape = TINY if suite.tiny else LLAMA_31_8B
    model = random_llama(shape, suite.device, suite.dtype)
    n_prompts = 6 if suite.tiny else 48
    lengths = anecdote_lengths(n_prompts, seed=2, scale=suite.scale)
    rng = np.random.default_rng(2)
    header = rng.integers(10, shape["vocab_size"], size=SHARED_HEADER // suite.scale).tolist()
    prompts = [header + rng.integers(10, shape["vocab_size"], size=k - len(header)).tolist() for k in lengths]
    streams = [uniforms(f"item-{i}", "sample", 0, n_draws, decoding.max_new_tokens) for i in range(n_prompts)]
    # stop token 1: random weights almost never draw it, so completions run to max_new_tokens (the costliest case)
    sampler = Sampler(model, 0, [1], **{k: v for k, v in limits.items() if v is not None})
    with Timer(suite.device) as warm:
        sampler.generate(prompts[:1], streams[:1], decoding)
    fit = max(1, int(budget.left() / max(warm.seconds, 1e-3)))  # one prompt alone: an upper bound on its time
    used = min(n_prompts, fit)
    with Timer(suite.device) as t:
        out = sampler.generate(prompts[:used], streams[:used], decoding)
    generated = sum(len(ids) + int(stopped) for draws in out for ids, stopped in draws)
    figures = {
        "sample": {
            "prompts": used,
            "draws": used * n_draws,
            "seconds": t.seconds,
            "generated_tokens": generated,
            "tokens_per_s": generated / t.seconds,
            "items_per_s": used / t.seconds,
            "peak_memory_gib": suite.peak_memory_gib(),
        }
    }
    settings = {
        "shape": "tiny" if suite.tiny else "Llama-3.1-8B",
        "dtype": str(suite.dtype),
        "n_draws": n_draws,
        **decoding.describe(),
        "token_budget": sampler.token_budget,
        "max_rows": sampler.max_rows,
        "prompt_lengths": {**ANECDOTE_LENGTHS, "scale": suite.scale},
        "shared_header": len(header),
        "prompts_planned": n_prompts,
    }
    return {"settings": settings, "figures": figures}


PARTS: dict[str, Callable[[Suite, Budget], dict[str, Any]]] = {
    "gemm": gemm,
    "extraction": extraction,
    "finetune": finetune,
    "encoder": encoder,
    "generation": generation,
}


def version(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> tuple[str, bool | None]:
    """HEAD's hash and whether tracked files differ from it; ("unknown", None) without a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None
    return head.stdout.strip(), bool(status.stdout.strip())


def provenance(device: torch.device, commit: str | None, runtime: dict[str, Any]) -> dict[str, Any]:
    """What every figure carries: commit, device, library versions, threads and determinism settings."""
    found, dirty = git_commit()
    cuda = device.type == "cuda"
    return {
        "commit": commit or found,
        "dirty": None if commit else dirty,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "device_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "trl": version("trl"),
        "bitsandbytes": version("bitsandbytes"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        **{k: v for k, v in runtime.items() if k != "device"},
    }


def run_part(name: str, suite: Suite, budget_s: float, prov: dict[str, Any]) -> dict[str, Any]:
    """One part under its budget; its failure is recorded, not raised (the other parts still run)."""
    t0 = time.perf_counter()
    record: dict[str, Any] = {"provenance": prov, "budget_s": budget_s}
    suite.reset_memory()
    try:
        record.update(status="ok", **PARTS[name](suite, Budget(budget_s)))
    except Exception as exc:  # an out-of-memory or a missing kernel must not cost the other parts' figures
        record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=-4))
    suite.reset_memory()
    record["seconds"] = time.perf_counter() - t0
    print(f"{name}: {record['status']} in {record['seconds']:.1f} s", flush=True)
    return record


COLUMNS = {  # figure key -> (Markdown column, format)
    "tokens_per_s": ("tokens/s", "{:,.0f}"),
    "prompt_tokens_per_s": ("prompt tokens/s", "{:,.0f}"),
    "tflops": ("TFLOP/s", "{:.1f}"),
    "mfu_spec": ("MFU (spec)", "{:.1%}"),
    "mfu_gemm": ("MFU (GEMM)", "{:.1%}"),
    "padding_efficiency": ("padding efficiency", "{:.3f}"),
    "vs_bare_forward": ("× bare forward", "{:.2f}"),
    "compile_s": ("compile s", "{:.1f}"),
    "peak_memory_gib": ("peak GiB", "{:.1f}"),
}


def summary(result: dict[str, Any]) -> str:
    """The Markdown summary: provenance, then one row per run of every part."""
    p = result["provenance"]
    lines = [
        f"# gpu_suite: {p['device']}, {p['date']}",
        "",
        f"commit {p['commit']}{' (uncommitted changes)' if p['dirty'] else ''}; torch {p['torch']}, transformers "
        f"{p['transformers']}, peft {p['peft']}, trl {p['trl']}, bitsandbytes {p['bitsandbytes']}, CUDA {p['cuda']}"
        f"; {'a measurement' if result['measurement'] else 'NOT a measurement (tiny shapes or no GPU)'}",
        "",
        "| part | run | " + " | ".join(c for c, _ in COLUMNS.values()) + " | note |",
        "|---|---|" + "---:|" * len(COLUMNS) + "---|",
    ]
    for name, part in result["parts"].items():
        if part["status"] == "error":
            lines.append(f"| {name} | | " + "| " * len(COLUMNS) + f"{part['error'][:200]} |")
            continue
        for run, fig in part["figures"].items():
            cells = [fmt.format(fig[k]) if fig.get(k) is not None else "" for k, (_, fmt) in COLUMNS.items()]
            lines.append(f"| {name} | {run} | " + " | ".join(cells) + f" | {fig.get('skipped', fig.get('note', ''))} |")
    return "\n".join(lines) + "\n"


def default_out(device_name: str, tiny: bool) -> Path:
    """benchmarks/results/<gpu-name>-<date>.json; a --tiny run goes to a temporary folder (it measures nothing)."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    folder = Path(tempfile.gettempdir()) / "moralign-gpu-suite" if tiny else RESULTS
    return folder / f"{slug}-{datetime.now(UTC).date().isoformat()}.json"


def parse_budget(items_: list[str]) -> dict[str, float]:
    """BUDGET_S with PART=SECONDS overrides."""
    budgets = dict(BUDGET_S)
    for item in items_:
        name, _, seconds = item.partition("=")
        if name not in PARTS or not seconds:
            raise SystemExit(f"--budget {item!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        budgets[name] = float(seconds)
    return budgets


def parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: the same code paths, in seconds")
    p.add_argument("--out", type=Path, help="the JSON to write (default: benchmarks/results/<gpu>-<date>.json)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS", help="a part's time budget")
    p.add_argument("--commit", help="the commit measured, where the working tree has no .git")
    p.add_argument("--compile", action="store_true", help="extraction also under torch.compile (compile time stated)")
    p.add_argument("--extract-items", type=int, help="prompts extracted (default 1,000; --tiny 48)")
    p.add_argument("--token-budget", type=int, default=65536, help="extraction token budget")
    p.add_argument("--max-batch-size", type=int, default=128, help="extraction rows per forward pass")
    p.add_argument("--steps", type=int, default=3, help="timed fine-tuning steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="fine-tuning steps before the timing starts")
    p.add_argument("--gen-token-budget", type=int, help="Sampler token_budget (default: params.yaml's readings)")
    p.add_argument("--gen-max-rows", type=int, help="Sampler max_rows, prompts x draws (default: params.yaml's)")
    p.add_argument("--threads", type=int, help="torch threads (default 1 with --tiny, else 4)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the parts, write the JSON and the Markdown summary beside it; returns the result."""
    from moralign.modeling import configure_torch

    args = parser().parse_args(argv)
    budgets = parse_budget(args.budget)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    # as the steps run: deterministic algorithms (warn-only on CUDA), the thread count set, not inherited
    runtime = configure_torch(args.threads or (1 if args.tiny else 4), device)
    torch.manual_seed(0)
    prov = provenance(device, args.commit, runtime)
    suite = Suite(device, args.tiny, args)
    parts = [p for p in PARTS if p in args.parts or p == "gemm"]  # every MFU needs the GEMM rate
    result = {
        "suite": "benchmarks/gpu_suite.py",
        "measurement": device.type == "cuda" and not args.tiny,
        "tiny": args.tiny,
        "provenance": prov,
        "parts": {name: run_part(name, suite, budgets[name], prov) for name in parts},
    }
    out = args.out or default_out(prov["device"], args.tiny)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = summary(result)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    print(text + f"\nwritten: {out} and {out.with_suffix('.md')}", flush=True)
    return result


if __name__ == "__main__":
    main()
