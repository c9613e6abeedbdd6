"""Fine-tuning throughput at paper scale: the exact Llama-3.1-8B shape, random weights, anecdote-length rows.

On a GPU (the figures to report; QLoRA needs bitsandbytes, the `gpu` extra):
    python benchmarks/gpu_finetune.py
On a CPU, a small shape and plain LoRA (what the tests run):
    python benchmarks/gpu_finetune.py --tiny --steps 3

Runs the `soft` objective's training step (forward, loss over the answer tokens, backward, AdamW on the LoRA
weights) with gradient checkpointing, for QLoRA (4-bit NF4 base, bf16 compute) and for bf16 LoRA. Prints
tokens/s, MFU and peak GPU memory. MFU counts 6·N FLOPs per token (forward 2N, backward 4N: activation
gradients flow through the frozen base even though its weights get none), the usual convention.
"""

import argparse

import numpy as np
import torch
from common import LLAMA_31_8B, TINY, Timer, peak_flops, random_llama

from moralign.extraction import AnswerTokens, pad_batch
from moralign.training import choice_index, choice_logprobs, wrap_lora


def run(variant: str, args, device: torch.device) -> None:
    shape = TINY if args.tiny else LLAMA_31_8B
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = random_llama(shape, device, dtype)
    quantized = variant == "qlora"
    if quantized:
        model = quantize_nf4(model, device)
    settings = {
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
        "modules_to_save": [],
        "gradient_checkpointing": device.type == "cuda",
    }
    model = wrap_lora(model, settings, quantized)
    if device.type == "cuda":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    answers = AnswerTokens(("Yes", "No"), ((9,), (11,)), (("Yes",), ("No",)))
    index, valid = choice_index(answers, device)
    rng = np.random.default_rng(0)
    length = args.length // (4 if args.tiny else 1)
    batches = [
        pad_batch([rng.integers(10, shape["vocab_size"], size=length).tolist() for _ in range(args.batch_size)], 0)
        for _ in range(args.steps + 1)
    ]
    target = torch.tensor([[0.7, 0.3]] * args.batch_size, device=device)

    def step(batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch, logits_to_keep=1, use_cache=False)
        loss = -(target * choice_logprobs(out.logits[:, -1], index, valid)).sum(-1).mean()
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss

    step(batches[0])  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with Timer(device) as t:
        for batch in batches[1:]:
            step(batch)
    tokens = args.steps * args.batch_size * length
    n = non_embedding_params_from_shape(shape)
    flops = 6 * n * tokens
    peak = peak_flops(device)
    mem = (
        f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    )
    mfu = f"MFU {flops / t.seconds / peak:.1%}" if peak else "MFU n/a (no GPU peak)"
    print(
        f"{variant:>9}: {args.steps} steps x {args.batch_size} x {length} tokens in {t.seconds:.2f} s; "
        f"tokens/s {tokens / t.seconds:,.0f}; {flops / t.seconds / 1e12:.1f} TFLOP/s; {mfu}{mem}"
    )


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
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=512, help="tokens per row (anecdote-length prompts)")
    args = p.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; shape: {'tiny' if args.tiny else 'Llama-3.1-8B'}")
    variants = ["lora"] if device.type == "cpu" else ["qlora", "lora-bf16"]
    if device.type == "cpu":
        print("     qlora: skipped (4-bit NF4 needs CUDA and bitsandbytes)")
    for variant in variants:
        run(variant, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
