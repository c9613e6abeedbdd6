"""Extraction speed on this CPU: the engine against the naive reference, lm-evaluation-harness and the ceiling.

lm-evaluation-harness lives in the benchmark's own environment (its pins differ from the project's):

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0 "lm_eval[hf]==0.4.13" "transformers==5.24.*" \\
        jsonschema pyyaml scipy pyarrow matplotlib
    .venv-bench/bin/pip install --no-deps -e .
    .venv-bench/bin/python benchmarks/extract_bench.py

Same tiny Llama (locally built, real architecture, its own tokenizer and Llama-3 chat template), same rendered
prompts (dilemmas from the synthetic sample, chat template, system text), zero-shot and 3-shot:

- engine: moralign's Scorer (length-sorted batches under a token budget, shared-prefix key/value reuse), and
  the same without prefix reuse (the same tokens as the ceiling);
- naive: one prompt at a time, no padding, full logits (the tests' reference);
- lm-eval: lm-evaluation-harness's HF backend (HFLM.loglikelihood) on the same (context, answer) pairs, with a
  fixed batch size (its `auto` probing costs more than the run here);
- ceiling: the bare batched forward pass over the same tokens and batches (left padded, last position only).

Without lm-evaluation-harness installed its rows are left out and the rest runs (the project's own environment).

First, on the Scruples anecdotes length distribution (random tokens, no shared prefix; benchmarks/common.py), both
engines' padding efficiency (real tokens / tokens the forward passes compute) and their throughput against the
bare forward pass over the same inputs (the same padded batches, or the same packed rows with their document mask;
the target is at least 0.9x): on --anecdotes prompts here, and the padding efficiency at the GPU settings of
benchmarks/gpu_extract.py (2,500 prompts, token budget 65,536; packed rows as long as the budget, as FlexAttention
runs them). A small setting, under a minute and a half on one core (docs/performance.md shows its output):

    python benchmarks/extract_bench.py --items 40 --anecdotes 48 --repeats 3 --threads 1

Every figure is the median of --repeats runs after a warm-up.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import anecdote_lengths, bare_forward, bare_forward_inputs, padding_efficiency

from moralign import extraction as ex
from moralign import extraction_packed as xp
from moralign.data import TASKS, prepare
from moralign.modeling import load_model, load_tokenizer
from moralign.prompts import PromptBuilder, select_shots
from moralign.sources import fetch_archive
from moralign.tinymodels import build_tiny_model

SPEC = {
    "system": "You judge everyday moral situations the way a typical online community member would.",
    "template": "A: {action1}\nB: {action2}\n\nWhich action is less ethical? Answer A or B.",
    "answers": ["A", "B"],
    "shot_seed": 0,
}
MODEL = {
    "architecture": "llama",
    "chat_format": "llama3",
    "seed": 0,
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_layers": 4,
    "num_heads": 8,
    "num_kv_heads": 2,
}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceiling(model, rows: list[list[int]], budget: int, max_batch: int) -> None:
    """The bare forward passes the engine's batches need, with nothing else."""
    for batch in ex.make_batches([len(r) for r in rows], budget, max_batch):
        with torch.inference_mode():
            model(**ex.pad_batch([rows[i] for i in batch], 0), logits_to_keep=1, use_cache=False)


def padding(model, args) -> None:
    """Padding efficiency of both engines on the anecdotes length distribution, and each against the bare forward."""
    lengths = anecdote_lengths(args.anecdotes, seed=0).tolist()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(10, model.config.vocab_size, size=n).tolist() for n in lengths]
    answers = ex.AnswerTokens(("Yes", "No"), ((9,), (11,)), (("Yes",), ("No",)))
    tokens = sum(lengths)
    print(
        f"\n== anecdotes length distribution: {len(prompts)} prompts of {tokens / len(prompts):.0f} tokens on average "
        f"(lognormal, median 420), random tokens, no shared prefix; token budget {args.token_budget}"
    )
    engines = {
        "padded": ex.Scorer(model, 0, args.token_budget, args.batch_size),
        "packed": xp.PackedScorer(model, 0, args.token_budget, args.batch_size),
    }
    for name, scorer in engines.items():
        eff = padding_efficiency(scorer, lengths)
        inputs = bare_forward_inputs(scorer, prompts)
        engine_s = timed(lambda s=scorer: s.score_tokens(prompts, answers), args.repeats)
        bare_s = timed(lambda i=inputs: bare_forward(model, i), args.repeats)
        print(
            f"  {name:<7} padding efficiency {eff['padding_efficiency']:.3f} ({eff['real_tokens']:,} real / "
            f"{eff['computed_tokens']:,} computed tokens, {eff['forward_passes']} forward passes); engine "
            f"{tokens / engine_s:,.0f} tokens/s, bare forward {tokens / bare_s:,.0f} tokens/s: "
            f"engine / bare forward = {bare_s / engine_s:.2f}x"
        )
    gpu = anecdote_lengths(2500, seed=0).tolist()
    at_gpu = {
        "padded": ex.Scorer(model, 0, 65536, 128),
        "packed (rows of 65,536, FlexAttention)": xp.PackedScorer(model, 0, 65536, 128, pack_length=65536),
        f"packed (rows of {xp.DENSE_PACK_LENGTH:,}, dense mask)": xp.PackedScorer(
            model, 0, 65536, 128, pack_length=xp.DENSE_PACK_LENGTH
        ),
    }
    print("  at the GPU settings (2,500 prompts, token budget 65,536, 128 rows; layout only):")
    for name, scorer in at_gpu.items():
        eff = padding_efficiency(scorer, gpu)
        print(
            f"    {name:<38} padding efficiency {eff['padding_efficiency']:.3f} ({eff['real_tokens']:,} real / "
            f"{eff['computed_tokens']:,} computed tokens, {eff['forward_passes']} forward passes)"
        )


def naive(model, rows: list[list[int]]) -> None:
    for r in rows:
        with torch.inference_mode():
            torch.log_softmax(model(torch.tensor([r])).logits[0, -1].float(), -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--token-budget", type=int, default=8192)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--anecdotes", type=int, default=64, help="prompts of the padding-efficiency comparison")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="moralign-bench-"))
    for archive in ("anecdotes", "dilemmas"):
        fetch_archive(
            "sample",
            archive,
            work / f"{archive}.tar.gz",
            sample={"seed": 0, "train": 400, "dev": args.items, "test": 10},
        )
    prepare("dilemmas", work / "dilemmas.tar.gz", work / "dilemmas")
    build_tiny_model(MODEL, [work / "anecdotes.tar.gz", work / "dilemmas.tar.gz"], work / "model")
    tok = load_tokenizer(str(work / "model"))
    model = load_model(str(work / "model"), None, torch.device("cpu"), torch.float32)
    train = pd.read_parquet(work / "dilemmas/train.parquet")
    dev = pd.read_parquet(work / "dilemmas/dev.parquet")
    answers = ex.answer_variants(tok, SPEC["answers"])
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        HFLM = None
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device="cpu") if HFLM else None
    print(
        f"CPU threads: {torch.get_num_threads()}; model: tiny Llama, {sum(p.numel() for p in model.parameters()):,}"
        f" parameters, vocabulary {len(tok)}; {len(dev)} dilemmas; batch size {args.batch_size}, "
        f"token budget {args.token_budget}"
        + ("" if lm else "; lm-evaluation-harness not installed: its rows are left out (see the docstring)")
    )
    padding(model, args)
    for shots in (0, 3):
        case(shots, model, tok, lm, train, dev, answers, args)


def case(shots: int, model, tok, lm, train: pd.DataFrame, dev: pd.DataFrame, answers, args) -> None:
    """Time every method on the dev prompts with ``shots`` few-shot examples and print the figures (lm-eval's
    only where ``lm`` is given)."""
    spec = {**SPEC, "n_shots": shots}
    builder = PromptBuilder(TASKS["dilemmas"], spec, chat=True, shots=select_shots(train, shots, 0))
    prompts = [builder.encode(tok, r) for _, r in dev.iterrows()]
    texts, rows = [p.text for p in prompts], [p.ids for p in prompts]
    tokens = sum(len(r) for r in rows)
    engine = ex.Scorer(model, tok.pad_token_id, args.token_budget, args.batch_size)
    no_reuse = ex.Scorer(model, tok.pad_token_id, args.token_budget, args.batch_size, reuse_prefix=False)
    secs = {
        "engine": timed(lambda: engine.score_tokens(rows, answers), args.repeats),
        "engine, no prefix reuse": timed(lambda: no_reuse.score_tokens(rows, answers), args.repeats),
        "naive": timed(lambda: naive(model, rows), max(1, args.repeats // 2)),
        "ceiling": timed(lambda: ceiling(model, rows, args.token_budget, args.batch_size), args.repeats),
    }
    agreement = ""
    if lm is not None:
        from lm_eval.api.instance import Instance

        requests = [Instance("loglikelihood", {}, (t, a), idx=k) for t in texts for k, a in enumerate(spec["answers"])]
        # agreement first. lm-eval moves the prompt's trailing whitespace ("\n\n" after the Llama-3 header) into
        # the continuation and scores "\n\nA" as a whole; the engine's continuation route scores the same pairs.
        lm_scores = np.array([ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)])
        pairs = [ex.continuation(tok, t.rstrip(), t[len(t.rstrip()) :] + a) for t in texts for a in spec["answers"]]
        ours = engine.score_sequences(pairs)
        agreement = f"; max |engine - lm-eval| log-prob {np.abs(ours - lm_scores).max():.2e}"
        secs["lm-eval"] = timed(lambda: lm.loglikelihood(requests, disable_tqdm=True), args.repeats)
    print(
        f"\n== {shots}-shot prompts: {tokens / len(rows):.0f} tokens each on average, "
        f"shared prefix {ex.common_prefix_length(rows)} tokens{agreement}"
    )
    for name, s in secs.items():
        print(f"  {name:<24} {len(rows) / s:8.1f} items/s  {tokens / s:10,.0f} tokens/s  ({s:.3f} s)")
    versus_lm = f"engine / lm-eval = {secs['lm-eval'] / secs['engine']:.2f}x; " if "lm-eval" in secs else ""
    print(
        f"  engine without prefix reuse / ceiling (same tokens) = "
        f"{secs['ceiling'] / secs['engine, no prefix reuse']:.2f}x; "
        f"engine / ceiling = {secs['ceiling'] / secs['engine']:.2f}x speed; {versus_lm}"
        f"engine / naive = {secs['naive'] / secs['engine']:.2f}x"
    )


if __name__ == "__main__":
    main()
