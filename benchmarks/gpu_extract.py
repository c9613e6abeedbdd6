"""Extraction throughput at paper scale: the exact Llama-3.1-8B shape, random bf16 weights, 2,500 prompts.

On a GPU (the figure to report):
    python benchmarks/gpu_extract.py
On a CPU, a small shape (what the tests run):
    python benchmarks/gpu_extract.py --tiny --items 64

Prompt lengths follow Scruples anecdotes rendered in a chat template (lognormal, median ~420 tokens, capped at
2,048). Prints prompts/s, tokens/s and model-FLOPs utilisation against the GPU's dense bf16 peak.
"""

import argparse

import numpy as np
import torch
from common import LLAMA_31_8B, TINY, Timer, anecdote_lengths, forward_flops, peak_flops, random_llama

from moralign.extraction import AnswerTokens, Scorer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shape on CPU")
    p.add_argument("--items", type=int, default=2500)
    p.add_argument("--token-budget", type=int, default=65536)
    p.add_argument("--max-batch-size", type=int, default=128)
    args = p.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shape = TINY if args.tiny else LLAMA_31_8B
    model = random_llama(shape, device, dtype)
    rng = np.random.default_rng(0)
    lengths = anecdote_lengths(args.items, rng, scale=4 if args.tiny else 1)
    prompts = [rng.integers(10, shape["vocab_size"], size=n).tolist() for n in lengths]
    answers = AnswerTokens(("Yes", "No"), ((9, 10), (11,)), (("Yes", " Yes"), (" No",)))
    scorer = Scorer(model, pad_id=0, token_budget=args.token_budget, max_batch_size=args.max_batch_size)
    scorer.score_tokens(prompts[: min(16, len(prompts))], answers)  # warm-up (kernels, allocator)
    with Timer(device) as t:
        scorer.score_tokens(prompts, answers)
    tokens = int(lengths.sum())
    flops = forward_flops(model, lengths.tolist())
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; shape: {'tiny' if args.tiny else 'Llama-3.1-8B'}; dtype: {dtype}")
    print(f"prompts: {args.items}, tokens: {tokens:,} (mean {tokens / args.items:.0f}/prompt)")
    print(f"time: {t.seconds:.2f} s; prompts/s: {args.items / t.seconds:.1f}; tokens/s: {tokens / t.seconds:,.0f}")
    print(
        f"achieved: {flops / t.seconds / 1e12:.1f} TFLOP/s; "
        + (f"MFU: {flops / t.seconds / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else "MFU: n/a (no GPU peak)")
    )
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
