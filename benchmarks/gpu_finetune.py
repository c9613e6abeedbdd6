"""Fine-tuning throughput of the project's own training path, at the Llama-3.1-8B shape with random weights.

On a GPU (the figures to report; QLoRA needs bitsandbytes, the `gpu` extra):
    python benchmarks/gpu_finetune.py
On a CPU, a small shape and plain LoRA (what the tests run):
    python benchmarks/gpu_finetune.py --tiny --steps 2

What runs is what `finetune` runs: params.yaml's `finetune` settings, `moralign.training.wrap_lora` (QLoRA: NF4
base after `prepare_model_for_kbit_training`), `memory_plan` (gradient checkpointing only when a micro-batch's
activations do not fit), `build_trainer` (the trl SFTTrainer subclass: `batch_size` items per optimiser step in
length-sorted micro-batches under `token_budget`, a prompt prefix shared by a micro-batch computed once, the
`soft` or one-pass `votes` loss at the answer position) and `trainer.train()`. Rows are random tokens with the
lengths of the paper's prompts: anecdotes (lognormal, median 420 tokens, capped at `max_length`) and dilemmas
(median 105), each opening with the same 50-token chat header as the real templates do (Llama 3.1's system turn
with its date lines and the system text). Steps are timed from the end of the warm-up steps to the end of the
last one by a Trainer callback (dev evaluation and checkpoints come after it).

Printed per variant: optimiser steps/s; prompt tokens/s (the tokens of the training prompts, what sets the
wall time of a run); MFU = 6·N·(tokens the model computed: the shared prefix once per micro-batch) / time / peak,
N = 7.50e9 (every weight matrix but the input embedding; the head runs on one position per row, so this
overstates the work by 7 %), the convention of the GPU figures in docs/performance.md. Backward through a frozen
base computes activation gradients but no weight gradients (~4·N per token of real work), and recomputation
under gradient checkpointing (~2·N more) is NOT counted: MFU counts model FLOPs, not hardware FLOPs. Peak GPU
memory is torch's max allocated.
"""

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import LLAMA_31_8B, TINY, peak_flops, random_llama, stub_tokenizer
from grid_cost import LENGTHS, SHARED_HEADER
from transformers import TrainerCallback

from moralign import training
from moralign.config import load_config
from moralign.extraction import AnswerTokens
from moralign.trainer import build_trainer, plan_for

ROOT = Path(__file__).resolve().parents[1]
MIN_ROW = 64  # tokens of the shortest training row drawn (before ``scale``)
ANSWERS = AnswerTokens(("Yes", "No"), ((9,), (11,)), (("Yes",), ("No",)))


def synthetic_rows(recipe: str, kind: str, n: int, vocab: int, max_length: int, scale: int, seed: int = 0):
    """``n`` training rows of ``recipe`` with the length distribution of ``kind`` (divided by ``scale``)."""
    rng = np.random.default_rng(seed)
    median, sigma = LENGTHS[kind]
    lengths = np.clip(rng.lognormal(np.log(median), sigma, size=n).astype(int), MIN_ROW, max_length) // scale
    header = rng.integers(20, vocab, size=SHARED_HEADER // scale).tolist()
    prompts = [header + rng.integers(20, vocab, size=int(k) - len(header)).tolist() for k in lengths]
    shares = rng.dirichlet([1.0, 1.0], size=n)
    if recipe == "soft":
        return training.soft_rows(prompts, shares)
    first = np.round(shares[:, :1] * 8) / 8  # the shares of 8 sampled answers
    return training.vote_rows(prompts, np.hstack([first, 1 - first]), [[9, 11]] * n)


def row_lengths(kind: str, max_length: int, scale: int) -> dict:
    """The length distribution :func:`synthetic_rows` draws ``kind``'s rows from, as a run's settings record it."""
    median, sigma = LENGTHS[kind]
    return {"median": median, "sigma": sigma, "min": MIN_ROW, "max": max_length, "scale": scale}


def finetune_settings(
    recipe: str, quantized: bool, steps: int, tiny: bool, batch_size: int | None = None, **extra
) -> dict:
    """params.yaml's ``finetune`` settings of ``recipe`` for a run of ``steps`` optimiser steps (warm-up included)
    whose one dev evaluation comes after the last; ``extra`` adds or replaces settings. Tiny shapes take 4 items per
    step (or ``batch_size``) in micro-batches of 1,024 tokens."""
    cfg = load_config([ROOT / "params.yaml"])
    settings = {
        **cfg.finetune(recipe, seed=0),
        "quantization": "4bit" if quantized else "none",
        "max_steps": steps,
        "eval_steps": 10**6,  # one dev evaluation, after the last (timed) step
        **extra,
    }
    if tiny:
        settings.update(batch_size=batch_size or 4, token_budget=1024)
    elif batch_size:
        settings["batch_size"] = batch_size
    return settings


def planned_model(shape: dict, settings: dict, device: torch.device, dtype: torch.dtype) -> tuple:
    """A random Llama of ``shape`` (NF4 where ``settings`` quantize to 4 bits) and ``memory_plan``'s plan for it."""
    model = random_llama(shape, device, dtype)
    if settings["quantization"] == "4bit":
        model = quantize_nf4(model, device)
    return model, plan_for(model, settings, device)


def train_timed(
    model, plan: dict, settings: dict, recipe: str, kind: str, scale: int, warmup: int, device: torch.device, *callbacks
) -> tuple["StepClock", bool]:
    """LoRA on ``model`` at the plan's checkpointing and micro-batch (written into ``settings``), then what
    ``finetune`` runs: ``build_trainer`` and ``trainer.train()``, here on synthetic rows of ``kind`` (lengths divided
    by ``scale``), timed after ``warmup`` steps; ``callbacks`` are added after the clock.

    Returns the clock and whether the trainer recomputed activations (gradient checkpointing as run).
    """
    n_rows = settings["batch_size"] * settings["max_steps"]
    rows = synthetic_rows(recipe, kind, n_rows, model.config.vocab_size, settings["max_length"], scale)
    settings.update(gradient_checkpointing=plan["gradient_checkpointing"], token_budget=plan["token_budget"])
    model = training.wrap_lora(model, settings, settings["quantization"] == "4bit")
    dev = ([r["input_ids"] for r in rows[:8]], np.full((8, 2), 0.5))
    clock = StepClock(device, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(recipe, model, stub_tokenizer(), rows, dev, ANSWERS, settings, Path(tmp), device)
        for callback in (clock, *callbacks):
            trainer.add_callback(callback)
        clock.trainer = trainer
        trainer.train()
        recomputed = bool(trainer.args.activation_checkpointing)  # the trainer recomputes on CUDA only
    clock.trainer = None  # the trainer holds the clock among its callbacks: break the cycle
    return clock, recomputed


def run(variant: str, recipe: str, kind: str, args, device: torch.device) -> None:
    shape = TINY if args.tiny else LLAMA_31_8B
    settings = finetune_settings(recipe, variant == "qlora", args.warmup + args.steps, args.tiny, args.batch_size)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model, plan = planned_model(shape, settings, device, dtype)
    clock, _ = train_timed(model, plan, settings, recipe, kind, 4 if args.tiny else 1, args.warmup, device)
    seconds = clock.seconds
    prompt = clock.tokens["prompt"]
    computed = clock.tokens["computed"]
    peak = peak_flops(device)
    n = non_embedding_params_from_shape(shape)
    mfu = f"MFU {6 * n * computed / seconds / peak:.1%}" if peak else "MFU n/a (no GPU peak)"
    mem = (
        f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    )
    print(
        f"{variant:>9} {recipe:>5} {kind:>9}: {args.steps} steps x {settings['batch_size']} items "
        f"({prompt / args.steps / settings['batch_size']:.0f} tokens/item) in {seconds:.2f} s; "
        f"{args.steps / seconds:.2f} steps/s; prompt tokens/s {prompt / seconds:,.0f}; "
        f"computed {computed / prompt:.0%} of them, padded {clock.tokens['padded'] / computed:.2f}x; {mfu}{mem}; "
        f"checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}, micro-batch {plan['token_budget']} tokens",
        flush=True,
    )


class StepClock(TrainerCallback):
    """Times the optimiser steps after ``warmup`` of them, with the trainer's token counts."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup, self.trainer = device, warmup, None
        self.t0 = self.seconds = 0.0
        self.start_tokens: dict[str, int] = {}
        self.tokens: dict[str, int] = {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if state.global_step == self.warmup:
            self.t0, self.start_tokens = now, dict(self.trainer.tokens)
        elif state.global_step > self.warmup:
            self.seconds = now - self.t0
            self.tokens = {k: v - self.start_tokens[k] for k, v in self.trainer.tokens.items()}


def quantize_nf4(model, device: torch.device):
    """Swap every linear layer but the head for bitsandbytes' NF4 Linear4bit holding the same (random) weights.

    The settings are moralign.modeling.bnb_config's (NF4, double quantisation, bf16 compute); from_pretrained
    does the same when loading a checkpoint with that quantization_config. Params4bit quantises on the move to
    the GPU.
    """
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and not name.endswith("lm_head"):
            layer = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
            )
            layer.weight = bnb.nn.Params4bit(
                module.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
            )
            model.set_submodule(name, layer.to(device))
            del module
    model.is_loaded_in_4bit = True  # what from_pretrained sets; peft's k-bit preparation checks it
    torch.cuda.empty_cache()
    return model


def non_embedding_params_from_shape(shape: dict) -> int:
    """Parameter count of a Llama shape without the input embedding (4-bit weights hide their true count)."""
    d, f, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
    return layers * per_layer + d + v * d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shape on CPU, plain LoRA only")
    p.add_argument("--steps", type=int, default=8, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, default=2, help="optimiser steps before the timing starts")
    p.add_argument("--batch-size", type=int, help="items per optimiser step (default: params.yaml's)")
    p.add_argument("--recipes", nargs="+", default=["soft", "votes"], choices=["soft", "votes"])
    p.add_argument("--kinds", nargs="+", default=["anecdotes", "dilemmas"], choices=list(LENGTHS))
    p.add_argument("--variants", nargs="+", default=["qlora", "lora-bf16"], choices=["qlora", "lora-bf16"])
    args = p.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: more threads only contend (and the tests run jobs side by side)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; shape: {'tiny' if args.tiny else 'Llama-3.1-8B'}", flush=True)
    variants = args.variants
    if device.type == "cpu":
        print("    qlora: skipped (4-bit NF4 needs CUDA and bitsandbytes)")
        variants = ["lora"]
    for variant in variants:
        for kind in args.kinds:
            for recipe in args.recipes:
                run(variant, recipe, kind, args, device)
                gc.collect()  # the previous model must be gone before the next one is built and measured
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
