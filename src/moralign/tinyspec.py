"""The shape of a tiny model, in one place for moralign.tinymodels and moralign.tinyencoders.

Every tiny architecture (causal LM or encoder) takes these transformer sizes from its ``build`` spec
(``models.<name>.build`` in the config).
"""

from __future__ import annotations

from typing import Any


def shape(spec: dict[str, Any], vocab_size: int, pad_token_id: int | None) -> dict[str, Any]:
    """The config keys of a tiny model's size: vocabulary, widths, layers, heads, padding token."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": spec["hidden_size"],
        "intermediate_size": spec["intermediate_size"],
        "num_hidden_layers": spec["num_layers"],
        "num_attention_heads": spec["num_heads"],
        "pad_token_id": pad_token_id,
    }
