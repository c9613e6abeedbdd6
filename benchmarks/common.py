"""Shared pieces of the benchmarks: the Llama-3.1-8B shape, random models, FLOP counts."""

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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
