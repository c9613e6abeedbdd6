"""Padding-free extraction: prompts packed end to end into rows, a document mask keeping them apart.

The padded engine (moralign.extraction.Scorer, the reference) pads every prompt of a batch to the longest one; on
the Scruples anecdotes length distribution that computes ~1.2x the real tokens, and on a GPU the padding is the
largest share of the gap to the bare forward pass of equal-length batches. Here prompts are packed first-fit
decreasing into rows of at most ``pack_length`` tokens, so a forward pass computes (almost) only real tokens:

* each prompt attends to itself (causally) and to the shared prefix, never to the other prompts of its row
  (a block-diagonal document mask);
* its position ids restart after the shared prefix, exactly the positions it has when scored alone;
* logits are computed only at the positions read (``logits_to_keep`` as an index tensor): the answer position
  of each prompt, or the continuation's positions on the sequence route.

The shared prefix (chat header, system text, few-shot examples) is computed once per call and its key/value cache
is reused by every forward pass, as the padded engine does; the mask lets every packed prompt see all of it.

The mask takes the form the model's attention implementation reads: a FlexAttention ``BlockMask`` when the model
runs ``flex_attention`` (what a GPU uses: only the blocks a prompt can see are computed, so rows can be as long as
the token budget), else a 4D additive mask for ``sdpa``/``eager`` (CPU, and any GPU without flex). A dense mask
makes attention cost ``row x (prefix + row)`` whatever the packing, so rows are kept short there
(:data:`DENSE_PACK_LENGTH`); several rows then share one forward pass under the token budget.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

from moralign.extraction import Scorer, make_batches

ENGINES = ("padded", "packed")

# Longest packed row with a dense (sdpa/eager) mask. Attention then costs row x (prefix + row) per row whatever
# the prompts, so the share of wasted attention grows with the row; 1,024 tokens hold two to three anecdote prompts
# and keep the dense attention of a 7-8B model under ~5 % of its matrix products.
DENSE_PACK_LENGTH = 1024


def make_scorer(model: Any, pad_id: int, settings: dict[str, Any]) -> Scorer:
    """The engine ``extract.engine`` names, under ``extract.token_budget`` and ``max_batch_size``.

    ``padded`` (moralign.extraction.Scorer) is the reference; ``packed`` (:class:`PackedScorer`) gives the same
    ``p`` to float rounding, and on CUDA switches the model to FlexAttention. ``extract.compile`` wraps the model
    in ``torch.compile`` first (dynamic shapes: every batch has its own). The choice lives here rather than in
    moralign.extraction so that only the steps that extract with a local model depend on this module: fine-tuning
    and the API backend import moralign.extraction too, and an edit here must not rerun them.
    """
    engine = settings.get("engine", "padded")
    if engine not in ENGINES:
        raise ValueError(f"extract.engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "packed" and next(model.parameters()).device.type == "cuda":
        # the packed rows' document mask as a FlexAttention BlockMask: only the blocks a prompt sees are computed
        model.set_attn_implementation("flex_attention")
    if settings.get("compile", False):
        model = torch.compile(model, dynamic=True)
    cls = PackedScorer if engine == "packed" else Scorer
    return cls(model, pad_id, settings["token_budget"], settings["max_batch_size"])


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices packed first-fit decreasing into rows of at most ``capacity`` tokens (a longer prompt: a row alone).

    First-fit decreasing leaves at most ~22 % of the rows' room empty in the worst case and a few percent on
    lognormal prompt lengths; the empty room is never computed (rows are only as wide as the batch's fullest).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(capacity - n, 0))
    return rows


def uses_flex(model: Any) -> bool:
    """Whether the model's attention is FlexAttention (it then reads a BlockMask, never a dense mask)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == "flex_attention"


class PackedScorer(Scorer):
    """The padded engine's interface (``score_tokens``, ``score_sequences``) over packed rows; see the module doc.

    ``pack_length`` is the longest packed row: ``None`` = the token budget with FlexAttention (one row per
    forward pass, the varlen layout), :data:`DENSE_PACK_LENGTH` with a dense mask.
    """

    def __init__(self, *args: Any, pack_length: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flex = uses_flex(self.model)
        self.pack_length = pack_length
        self.stats = {"real": 0, "computed": 0, "forwards": 0}  # tokens of the prompts / of the forward passes

    def capacity(self) -> int:
        """Tokens per packed row (never more than the token budget)."""
        if self.pack_length is not None:
            return min(self.pack_length, self.token_budget)
        return self.token_budget if self.flex else min(DENSE_PACK_LENGTH, self.token_budget)

    def layout(self, rows: list[list[int]]) -> list[list[list[int]]]:
        """Forward passes, each a list of packed rows, each a list of prompt indices (what :meth:`_run` computes)."""
        packed = pack([len(r) for r in rows], self.capacity())
        widths = [sum(len(rows[i]) for i in row) for row in packed]
        return [[packed[k] for k in group] for group in make_batches(widths, self.token_budget, self.max_batch_size)]

    def inputs(
        self, docs: list[list[list[int]]], prefix_len: int
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Packed ids, position ids and document ids of rows of prompts (right padded to the widest row).

        Returns the model inputs, the document id of every position (``-1 - column`` on padding, so a padding
        position only sees itself and no query row is fully masked) and every prompt's end column.
        """
        width = max(sum(len(d) for d in row) for row in docs)
        ids = torch.full((len(docs), width), self.pad_id, dtype=torch.long)
        positions = torch.full((len(docs), width), prefix_len, dtype=torch.long)
        document = -1 - torch.arange(width).repeat(len(docs), 1)
        ends = []
        for b, row in enumerate(docs):
            start = 0
            for d, toks in enumerate(row):
                n = len(toks)
                ids[b, start : start + n] = torch.tensor(toks)
                positions[b, start : start + n] = prefix_len + torch.arange(n)
                document[b, start : start + n] = d
                start += n
                ends.append(start)
        return {"input_ids": ids, "position_ids": positions}, document, torch.tensor(ends)

    def mask(self, document: torch.Tensor, prefix_len: int, dtype: torch.dtype) -> Any:
        """The document mask over (prefix + row) keys: a BlockMask under FlexAttention, else a 4D additive mask."""
        batch, width = document.shape
        if self.flex:
            from torch.nn.attention.flex_attention import create_block_mask

            mask_mod = document_mask_mod(document, prefix_len)
            return create_block_mask(mask_mod, batch, None, width, prefix_len + width, device=document.device)
        return additive_mask(document, prefix_len, dtype)

    def _forward_packed(
        self, docs: list[list[list[int]]], keeps: list[list[int]], prefix: tuple[int, Any] | None
    ) -> list[torch.Tensor]:
        """Log-softmax over the vocabulary at the last ``keep`` positions of every prompt, in row order."""
        prefix_len, cache = prefix if prefix else (0, None)
        batch, document, ends = self.inputs(docs, prefix_len)
        flat_keeps = [k for row in keeps for k in row]
        rows_of = [b for b, row in enumerate(docs) for _ in row]
        # the columns read: each prompt's last `keep` positions; one index tensor for every row of the pass
        wanted = [(b, e - k + j) for b, e, k in zip(rows_of, ends.tolist(), flat_keeps, strict=True) for j in range(k)]
        columns = sorted({c for _, c in wanted})
        where = {c: n for n, c in enumerate(columns)}
        dtype = next(self.model.parameters()).dtype
        kwargs: dict[str, Any] = {"use_cache": False}
        if cache is not None:
            cache = copy.deepcopy(cache)
            if len(docs) > 1:
                cache.batch_repeat_interleave(len(docs))
            kwargs = {"cache": cache, "use_cache": True}
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        attention = self.mask(document.to(self.device), prefix_len, dtype)
        out = self.model(
            **inputs,
            attention_mask=attention,
            logits_to_keep=torch.tensor(columns, device=self.device),
            **kwargs,
        )
        self.stats["computed"] += document.numel()
        self.stats["real"] += int((document >= 0).sum())
        self.stats["forwards"] += 1
        logits = out.logits
        result, at = [], 0
        for b, k in zip(rows_of, flat_keeps, strict=True):
            picked = [where[c] for _, c in wanted[at : at + k]]
            at += k
            result.append(torch.log_softmax(logits[b, picked].float(), dim=-1))
        return result

    def _run(self, rows: list[list[int]], keep_of: Callable[[int], int], reduce: Callable, desc: str):
        """Packed counterpart of :meth:`Scorer._run` (the shared prefix split off and cached the same way)."""
        rows, prefix = self._prefix(rows, [keep_of(i) for i in range(len(rows))])
        results: list[Any] = [None] * len(rows)
        queue = list(reversed(self.layout(rows)))
        while queue:
            group = queue.pop()
            try:
                with torch.inference_mode():
                    logprobs = self._forward_packed(
                        [[rows[i] for i in row] for row in group], [[keep_of(i) for i in row] for row in group], prefix
                    )
            except torch.OutOfMemoryError:
                if len(group) == 1 and len(group[0]) == 1:
                    raise
                # as the padded engine: halve the budget (and so the rows) and redo this pass in smaller pieces
                self.token_budget //= 2
                torch.cuda.empty_cache()
                items = [i for row in group for i in row]
                sub = self.layout([rows[i] for i in items])
                queue += [[[items[j] for j in row] for row in g] for g in reversed(sub)]
                continue
            for i, lp in zip([i for row in group for i in row], logprobs, strict=True):
                results[i] = reduce(i, lp)
        return results


def document_mask_mod(document: torch.Tensor, prefix_len: int) -> Callable:
    """FlexAttention mask_mod of the document mask: key ``kv`` is the prefix, or an earlier token of q's prompt."""

    def mask_mod(b, h, q, kv):
        local = kv - prefix_len
        same = document[b, local.clamp(min=0)] == document[b, q]
        return (kv < prefix_len) | ((local >= 0) & (local <= q) & same)

    return mask_mod


def additive_mask(document: torch.Tensor, prefix_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, 1, width, prefix + width) additive mask: 0 where a query sees a key, the dtype's minimum elsewhere.

    Additive rather than boolean because eager attention adds the mask to the scores (sdpa takes either).
    """
    batch, width = document.shape
    causal = torch.ones(width, width, dtype=torch.bool, device=document.device).tril()
    allowed = (document[:, :, None] == document[:, None, :]) & causal
    allowed = torch.cat([torch.ones(batch, width, prefix_len, dtype=torch.bool, device=document.device), allowed], -1)
    zero = torch.zeros((), dtype=dtype, device=document.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]
