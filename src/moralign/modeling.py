"""Load tokenizers, models and adapters the same way for real and tiny models."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def configure_torch(threads: int, device: torch.device) -> dict[str, Any]:
    """Make this process's numbers depend on the configuration only; returns what determines them (provenance).

    The thread count is set here from the config, never inherited from the orchestrator or the machine: on a CPU,
    reductions split over threads round differently, so the count is part of the result (docs/reproducibility.md).
    Deterministic algorithms are required on the CPU; on CUDA, cuBLAS needs a fixed workspace
    for them and a few kernels have no deterministic version (those warn instead of failing).
    """
    import os

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only settable before the first parallel region; the intra-op count is what matters
        pass
    cuda = device.type == "cuda"
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    _use_deterministic_algorithms(warn_only=cuda)
    return {
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "deterministic_algorithms": "warn-only" if cuda else True,
    }


def _use_deterministic_algorithms(warn_only: bool) -> None:
    """``torch.use_deterministic_algorithms(True)`` for eager code, without importing torch's compiler.

    The public function also sets ``torch._inductor``'s config, which imports the compiler stack (~2.4 s per
    process, and the demo starts dozens); moralign never compiles, so setting the eager flag is the same.
    """
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:  # a torch without the private setter: the public one does the same, slower
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
    else:
        setter(True, warn_only=warn_only)


def resolve_device(preference: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is an error, not a silent CPU run."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but no CUDA device is available")
    return torch.device(preference)


def resolve_dtype(preference: str, device: torch.device) -> torch.dtype:
    """``auto`` = bfloat16 on CUDA (what the 7-8B models ship in), float32 on CPU (exact, and fast there)."""
    if preference == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[preference]


def load_tokenizer(source: str, revision: str | None = None) -> Any:
    """Load a tokenizer; a missing pad token falls back to EOS (padding is always masked)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, revision=revision)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def bnb_config() -> Any:
    """QLoRA's 4-bit NF4 with double quantisation and bf16 compute (Dettmers et al., 2023)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_model(
    source: str,
    revision: str | None,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str = "none",
    adapter: str | Path | None = None,
) -> Any:
    """Load a causal LM (optionally 4-bit, optionally with a LoRA adapter) in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"revision": revision, "dtype": dtype}
    if quantization == "4bit":
        if device.type != "cuda":
            raise RuntimeError("quantization: 4bit needs a CUDA device (bitsandbytes); use 'none' on CPU")
        kwargs["quantization_config"] = bnb_config()
        kwargs["device_map"] = {"": device.index or 0}
    if device.type == "cuda":
        kwargs["attn_implementation"] = "sdpa"
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quantization != "4bit":
        model.to(device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model
