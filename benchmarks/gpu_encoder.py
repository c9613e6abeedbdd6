"""Encoder-baseline throughput at paper scale: the exact roberta-large shape, random weights, real lengths.

On a GPU (the figures to report):
    python benchmarks/gpu_encoder.py
On a CPU, a small shape (what the tests run):
    python benchmarks/gpu_encoder.py --tiny --steps 2 --items 32

Runs moralign's own encoder code (moralign.encoder_model, moralign.encoder_training): training steps of the
anecdotes head (pairs of title and text, lognormal lengths, median ~380 tokens, capped at 512 as in training;
batches of 32 items, micro-batches under the token budget; bfloat16 autocast on CUDA, float32 weights and AdamW),
then inference (bfloat16 weights on CUDA) over 2,500 anecdotes (the dev split's size) and 2,340 dilemmas (two
actions each, median ~14 tokens, capped at 96). Prints training tokens/s, inference items/s, MFU (6·N FLOPs per
trained token, 2·N per inferred token) and peak GPU memory.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import Timer, peak_flops
from transformers import AutoModelForMultipleChoice, AutoModelForSequenceClassification, RobertaConfig

from moralign.encoder_heads import HEAD_CHOICE, HEAD_SEQUENCE
from moralign.encoder_model import EncoderModel, pack
from moralign.encoder_training import Split, Trainer, epoch_batches
from moralign.modeling import configure_torch

# roberta-large (FacebookAI/roberta-large config.json); weights random: nothing is downloaded.
ROBERTA_LARGE = dict(
    vocab_size=50265,
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    max_position_embeddings=514,
    type_vocab_size=1,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    layer_norm_eps=1e-5,
)
TINY = {**ROBERTA_LARGE, "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY["intermediate_size"] = 128


def random_encoder(shape: dict, head: str, device: torch.device, dtype: torch.dtype) -> EncoderModel:
    """A RoBERTa with the head of ``head``, random weights, built on ``device``."""
    torch.manual_seed(0)
    config = RobertaConfig(**shape, num_labels=2)
    cls = AutoModelForMultipleChoice if head == HEAD_CHOICE else AutoModelForSequenceClassification
    with torch.device(device):
        net = cls.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return EncoderModel(net, head, shape["pad_token_id"], autocast=device.type == "cuda" and dtype == torch.float32)


def items(rng: np.random.Generator, lengths: np.ndarray, per_item: int, vocab: int) -> list:
    """Random token ids of the given lengths, ``per_item`` sequences per item (type ids all 0, as RoBERTa's)."""
    rows = [[0, *rng.integers(3, vocab, size=n - 2).tolist(), 2] for n in lengths]
    return [[(r, [0] * len(r)) for r in rows[k : k + per_item]] for k in range(0, len(rows), per_item)]


def non_embedding_params(net) -> int:
    """Parameters that cost FLOPs per token (everything but the embeddings)."""
    return sum(p.numel() for n, p in net.named_parameters() if "embeddings" not in n)


LENGTHS = "anecdotes lognormal median 380 capped 512; dilemma actions median 14 capped 96"  # what synthetic_data draws


def synthetic_data(shape: dict, tiny: bool, steps: int, batch_size: int, n_items: int) -> tuple[Split, list, list]:
    """The training split (anecdotes with random vote counts, ``batch_size`` for the warm-up step and for each of
    ``steps`` more), ``n_items`` anecdotes to predict and 0.936 x as many dilemmas (two actions each), with the
    lengths of :data:`LENGTHS` (anecdotes / 4, capped at 128, when tiny).

    One seeded generator draws them all, in this order: gpu_encoder.py and gpu_suite.py's ``encoder`` part run on the
    same items.
    """
    n_train = batch_size * (steps + 1)
    rng = np.random.default_rng(0)
    cap = 128 if tiny else 512
    lengths = np.clip(rng.lognormal(np.log(380), 0.45, size=n_train + n_items).astype(int), 16, 512)
    lengths = np.minimum(lengths // (4 if tiny else 1) + 4, cap)
    n_dilemmas = round(n_items * 0.936)
    action_lengths = np.clip(rng.lognormal(np.log(14), 0.4, size=2 * n_dilemmas).astype(int), 4, 96)
    anecdotes = items(rng, lengths, 1, shape["vocab_size"])
    dilemmas = items(rng, action_lengths, 2, shape["vocab_size"])
    train = Split(anecdotes[:n_train], rng.integers(0, 20, size=(n_train, 2)) + 1)
    return train, anecdotes[n_train:], dilemmas


def warm_trainer(
    shape: dict, device: torch.device, train: Split, batch_size: int, token_budget: int, steps: int
) -> tuple[EncoderModel, Trainer, list]:
    """The anecdotes head's Trainer (float32 weights, bfloat16 autocast on CUDA, AdamW, micro-batches under
    ``token_budget``) after one warm-up step (kernels, allocator), scheduled for ``steps`` more.

    Returns the model, the trainer and the batches left to time (length-sorted pools, as in training).
    """
    model = random_encoder(shape, HEAD_SEQUENCE, device, torch.float32)
    settings = {
        "loss": "xentropy-soft",
        "learning_rate": 1e-5,
        "weight_decay": 0.01,
        "warmup_proportion": 0.1,
        "token_budget": token_budget,
    }
    trainer = Trainer(model, settings, Path(tempfile.gettempdir()), "benchmark")  # step() writes no checkpoint
    trainer.schedule(steps + 1)
    model.net.train()
    batches = epoch_batches(train.lengths, batch_size, seed=0, epoch=0)
    trainer.step(train, batches[0])
    return model, trainer, batches[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shape on CPU")
    p.add_argument("--steps", type=int, default=10, help="training steps timed (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--token-budget", type=int, default=16384, help="encoder.token_budget (training)")
    p.add_argument("--infer-budget", type=int, default=32768, help="extract.token_budget (inference)")
    p.add_argument("--items", type=int, default=2500, help="anecdotes inferred (dilemmas: 0.936 x as many)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (encoder.threads / extract.threads)")
    args = p.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    configure_torch(args.threads, device)  # as the steps run: the config's threads, deterministic algorithms
    shape = TINY if args.tiny else ROBERTA_LARGE
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; shape: {'tiny' if args.tiny else 'roberta-large'}")
    train, anecdotes, dilemmas = synthetic_data(shape, args.tiny, args.steps, args.batch_size, args.items)
    peak = peak_flops(device)

    # training: the anecdotes head, float32 weights (bfloat16 autocast on CUDA), AdamW, micro-batches under budget
    model, trainer, batches = warm_trainer(shape, device, train, args.batch_size, args.token_budget, args.steps)
    n = non_embedding_params(model.net)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = 0
    with Timer(device) as t:
        for batch in batches:
            tokens += trainer.step(train, batch)[1]
    padded = 0
    for batch in batches:
        lengths = [train.lengths[i] for i in batch]
        padded += sum(lengths[g[0]] * len(g) for g in pack(lengths, [1] * len(batch), args.token_budget))
    mfu = f"MFU {6 * n * tokens / t.seconds / peak:.1%}" if peak else "MFU n/a (no GPU peak)"
    mem = f"; peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(
        f"train (anecdotes, {args.steps} steps x {args.batch_size} items, budget {args.token_budget}): "
        f"{tokens:,} tokens ({tokens / padded:.0%} of padded) in {t.seconds:.2f} s; "
        f"training tokens/s {tokens / t.seconds:,.0f}; {mfu}{mem}"
    )
    del trainer, model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # inference: bfloat16 weights on CUDA (extract.dtype auto), length-sorted batches under the budget
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for label, head, data in (("anecdotes", HEAD_SEQUENCE, anecdotes), ("dilemmas", HEAD_CHOICE, dilemmas)):
        model = random_encoder(shape, head, device, dtype)
        model.predict(data[:16], args.infer_budget)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with Timer(device) as t:
            model.predict(data, args.infer_budget)
        tokens = sum(len(ids) for units in data for ids, _ in units)
        mfu = f"MFU {2 * n * tokens / t.seconds / peak:.1%}" if peak else "MFU n/a (no GPU peak)"
        mem = f"; peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(
            f"infer {label} ({len(data)} items, {tokens:,} tokens, budget {args.infer_budget}): {t.seconds:.2f} s; "
            f"inference items/s {len(data) / t.seconds:,.1f}; tokens/s {tokens / t.seconds:,.0f}; {mfu}{mem}"
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
