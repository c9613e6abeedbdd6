"""Shared pieces of the benchmarks: the Llama-3.1-8B shape, random models, prompt lengths, FLOP counts, and what
an extraction engine computes (its padding efficiency and the bare forward pass over the same inputs)."""

import time
from typing import Any

import numpy as np
import torch
from grid_cost import LENGTHS
from transformers import LlamaConfig, LlamaForCausalLM

from moralign.extraction import Scorer, make_batches, pad_batch
from moralign.extraction_packed import PackedScorer

# Llama-3.1-8B (meta-llama/Llama-3.1-8B-Instruct config.json), weights random: nothing is downloaded.
LLAMA_31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
# A small shape of the same architecture, for running the benchmarks on a CPU (tests).
TINY = dict(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, SXM parts
# Scruples anecdotes rendered in a Llama 3.1 chat template, in tokens: lognormal (grid_cost's stated median and
# sigma), clipped
ANECDOTE_LENGTHS = dict(zip(("median", "sigma"), LENGTHS["anecdotes"], strict=True)) | {"min": 64, "max": 2048}


def anecdote_lengths(n: int, seed: int | np.random.Generator = 0, scale: int = 1) -> np.ndarray:
    """``n`` prompt lengths of the anecdotes distribution; ``scale`` > 1 divides them for tiny shapes (16..512).

    The distribution the GPU extraction figures were measured on (gpu_extract.py). A Generator as ``seed`` is drawn
    from (and advanced), for a caller that draws the prompts' tokens from the same stream.
    """
    d = ANECDOTE_LENGTHS
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(d["median"]), d["sigma"], size=n).astype(int), d["min"], d["max"])
    return lengths if scale == 1 else np.clip(lengths // scale, 16, 512)


def random_llama(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """A LlamaForCausalLM of ``shape`` with random weights, built directly on ``device``."""
    torch.manual_seed(seed)
    config = LlamaConfig(**shape)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def stub_tokenizer():
    """A word-level tokenizer with pad and EOS only: the trainer needs one; benchmark rows are token ids already."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def non_embedding_params(model) -> int:
    """Parameters that cost FLOPs per token (everything but the input embedding)."""
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


def forward_flops(model, lengths: list[int], logits_positions: int = 1) -> float:
    """Approximate forward FLOPs: 2·N per token for the matrices, plus attention scores (causal: ~L²/2·2·2·d)."""
    cfg = model.config
    n = non_embedding_params(model) - cfg.vocab_size * cfg.hidden_size  # the head runs on few positions only
    tokens = sum(lengths)
    matmul = 2 * n * tokens + 2 * cfg.vocab_size * cfg.hidden_size * logits_positions * len(lengths)
    attention = sum(2 * cfg.num_hidden_layers * cfg.hidden_size * length * length for length in lengths)
    return matmul + attention


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU, or None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        synchronize(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0


def engine_passes(scorer: Scorer, lengths: list[int]) -> list[list[list[int]]]:
    """The forward passes ``scorer`` runs on prompts of ``lengths`` (no shared prefix): per pass its rows, per row
    its prompt indices (the padded engine puts one prompt in a row, the packed engine several)."""
    if isinstance(scorer, PackedScorer):
        return scorer.layout([[0] * n for n in lengths])
    return [[[i] for i in batch] for batch in make_batches(lengths, scorer.token_budget, scorer.max_batch_size)]


def padding_efficiency(scorer: Scorer, lengths: list[int]) -> dict[str, Any]:
    """Real tokens over the tokens the engine's forward passes compute (rows x widest row, padding included)."""
    passes = engine_passes(scorer, lengths)
    computed = sum(len(rows) * max(sum(lengths[i] for i in row) for row in rows) for rows in passes)
    real = int(sum(lengths))
    return {
        "real_tokens": real,
        "computed_tokens": computed,
        "padding_efficiency": real / computed,
        "forward_passes": len(passes),
    }


def bare_forward_inputs(scorer: Scorer, prompts: list[list[int]]) -> list[dict[str, Any]]:
    """The model inputs of the engine's forward passes over ``prompts``, built ahead of time.

    Timing :func:`bare_forward` over them gives the ceiling the engine is compared with: the same tokens in the
    same passes (padded rows, or packed rows with their document mask), logits at the positions read, nothing else.
    """
    lengths = [len(p) for p in prompts]
    device = scorer.device
    out = []
    for rows in engine_passes(scorer, lengths):
        if isinstance(scorer, PackedScorer):
            batch, document, ends = scorer.inputs([[prompts[i] for i in row] for row in rows], 0)
            inputs = {k: v.to(device) for k, v in batch.items()}
            inputs["attention_mask"] = scorer.mask(document.to(device), 0, next(scorer.model.parameters()).dtype)
            inputs["logits_to_keep"] = torch.tensor(sorted(set((ends - 1).tolist())), device=device)
        else:
            batch = pad_batch([prompts[i] for row in rows for i in row], scorer.pad_id)
            inputs = {k: v.to(device) for k, v in batch.items()}
            inputs["logits_to_keep"] = 1
        out.append(inputs)
    return out


def bare_forward(model, inputs: list[dict[str, Any]]) -> None:
    """The forward passes of :func:`bare_forward_inputs`, with nothing else."""
    with torch.inference_mode():
        for batch in inputs:
            model(**batch, use_cache=False)
