"""The packed (padding-free) extraction engine gives the padded reference's results on both tiny architectures."""

import numpy as np
import pandas as pd
import pytest
import torch

from moralign import extraction as ex
from moralign import extraction_packed as xp
from moralign.data import TASKS
from moralign.modeling import load_model, load_tokenizer
from moralign.prompts import PromptBuilder, select_shots
from tests.conftest import ROOT
from tests.test_extraction import naive_logp, naive_sequence

SPECS = {
    "dilemmas": {
        "system": "Judge like a typical reader.",
        "template": "A: {action1}\nB: {action2}\n\nWhich is less ethical?",
        "answers": ["A", "B"],
        "shot_seed": 0,
    },
    "anecdotes": {
        "system": "Judge like a typical reader.",
        "template": "{title}\n\n{text}\n\nWas the author in the wrong?",
        "answers": ["Yes", "No"],
        "shot_seed": 0,
    },
}


@pytest.fixture(scope="module", params=["llama", "mistral"])
def model(request, tiny_models):
    path = tiny_models[request.param]
    return load_tokenizer(str(path)), load_model(str(path), None, torch.device("cpu"), torch.float32)


def prompts(tok, processed, dataset: str, shots: int, n: int = 20) -> tuple[PromptBuilder, list[list[int]]]:
    train = pd.read_parquet(processed[dataset] / "train.parquet")
    dev = pd.read_parquet(processed[dataset] / "dev.parquet").head(n)
    spec = {**SPECS[dataset], "n_shots": shots}
    builder = PromptBuilder(TASKS[dataset], spec, chat=True, shots=select_shots(train, shots, 0))
    return builder, [builder.encode(tok, r).ids for _, r in dev.iterrows()]


@pytest.mark.parametrize("dataset", ["anecdotes", "dilemmas"])
@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_packed_equals_padded(model, processed, dataset, shots, reuse_prefix):
    """Same p to 1e-5, shared prefix (chat header, system text, shots) reused or not, mixed lengths."""
    tok, net = model
    builder, ids = prompts(tok, processed, dataset, shots)
    answers = ex.answer_variants(tok, builder.answers)
    prefix = ex.common_prefix_length(ids)
    assert prefix >= 16 and len({len(i) for i in ids}) > 5  # min_prefix=8 below: the prefix is reused
    # rows of ~3 prompts, several rows per forward pass
    skip = prefix if reuse_prefix else 0
    suffixes = sorted(len(i) - skip for i in ids)
    pack_length = 3 * suffixes[len(suffixes) // 2]
    padded = ex.Scorer(net, tok.pad_token_id, 600, 8, reuse_prefix=reuse_prefix, min_prefix=8)
    packed = xp.PackedScorer(
        net, tok.pad_token_id, 4 * pack_length, 8, reuse_prefix=reuse_prefix, min_prefix=8, pack_length=pack_length
    )
    want, got = padded.score_tokens(ids, answers), packed.score_tokens(ids, answers)
    np.testing.assert_allclose(ex.normalise(got)[1], ex.normalise(want)[1], atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-5)
    layout = packed.layout([i[skip:] for i in ids])
    assert max(len(row) for group in layout for row in group) >= 3, "prompts must share rows"
    assert max(len(group) for group in layout) >= 2, "rows must share forward passes"
    assert packed.stats["real"] == sum(len(i) - skip for i in ids)


def test_prompt_longer_than_the_budget_and_the_sequence_route(model, processed):
    """A prompt longer than the token budget is a row and a pass of its own; multi-token answers score alike."""
    tok, net = model
    builder, ids = prompts(tok, processed, "anecdotes", 0, n=8)
    answers = ex.answer_variants(tok, builder.answers)
    budget = sorted(len(i) for i in ids)[4]  # half the prompts are longer than the whole budget
    packed = xp.PackedScorer(net, tok.pad_token_id, budget, 8, reuse_prefix=False)
    want = np.stack([naive_logp(net, i, answers.variants) for i in ids])
    np.testing.assert_allclose(packed.score_tokens(ids, answers), want, atol=1e-5)
    texts = [tok.decode(i, skip_special_tokens=False) for i in ids[:4]]
    pairs = [ex.continuation(tok, t, a) for t in texts for a in ("the first action", "the second")]
    assert any(len(c) > 1 for _, c in pairs)
    got = xp.PackedScorer(net, tok.pad_token_id, budget, 8).score_sequences(pairs)
    np.testing.assert_allclose(got, [naive_sequence(net, c, n) for c, n in pairs], atol=1e-4)
    np.testing.assert_allclose(got, ex.Scorer(net, tok.pad_token_id, budget, 8).score_sequences(pairs), atol=1e-5)


def test_the_document_mask_keeps_packed_prompts_apart(model, processed):
    """Each packed prompt scores as it does alone; changing its row neighbours changes nothing.

    Without the mask (a plain causal mask over the row) the later prompts of a row would read the earlier ones.
    """
    tok, net = model
    builder, ids = prompts(tok, processed, "dilemmas", 2, n=12)
    answers = ex.answer_variants(tok, builder.answers)
    packed = xp.PackedScorer(net, tok.pad_token_id, 10**5, 64, pack_length=10**5)  # every prompt in one row
    assert len(packed.layout(ids)) == 1 and len(packed.layout(ids)[0]) == 1
    got = packed.score_tokens(ids, answers)
    alone = np.stack([naive_logp(net, i, answers.variants) for i in ids])
    np.testing.assert_allclose(got, alone, atol=1e-5)
    neighbours = [ids[0]] + [list(reversed(i[:40])) + i[40:] for i in ids[1:]]  # same prefix length, new words
    np.testing.assert_allclose(packed.score_tokens(neighbours, answers)[0], got[0], atol=1e-6)

    class Causal(xp.PackedScorer):  # the same packing with the mask leaking across prompts
        def mask(self, document, prefix_len, dtype):
            return super().mask(torch.zeros_like(document), prefix_len, dtype)

    leaky = Causal(net, tok.pad_token_id, 10**5, 64, pack_length=10**5).score_tokens(ids, answers)
    assert np.abs(leaky[1:] - alone[1:]).max() > 1e-3, "the test must see a leaking mask"


def test_flex_block_mask_is_the_dense_mask():
    """The BlockMask a GPU (FlexAttention) reads allows exactly what the CPU's dense additive mask allows."""
    from torch.nn.attention.flex_attention import create_mask

    document = torch.tensor([[0, 0, 0, 1, 1, 2, -7, -8], [0, 0, 0, 0, 0, 1, 1, 1]])
    for prefix in (0, 5):
        dense = xp.additive_mask(document, prefix, torch.float32) == 0
        flex = create_mask(xp.document_mask_mod(document, prefix), 2, 1, 8, 8 + prefix, device="cpu")
        assert torch.equal(dense, flex)
        # row 0, prompt 1 (columns 3-4) sees the prefix and itself, causally; padding only itself
        assert dense[0, 0, 4].tolist() == [True] * prefix + [False] * 3 + [True, True, False, False, False]
        assert dense[0, 0, 6].tolist() == [True] * prefix + [False] * 6 + [True, False]


def test_pack_first_fit_decreasing():
    lengths = [7, 3, 5, 5, 2, 9, 12, 1]
    rows = xp.pack(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert [[lengths[i] for i in row] for row in rows] == [[12], [9, 1], [7, 3], [5, 5], [2]]


def test_engine_is_chosen_by_the_config(model, tmp_path):
    """extract.engine picks the engine; extract.compile wraps the model in torch.compile; a wrong name fails."""
    from moralign.config import load_config

    _tok, net = model
    settings = {"token_budget": 512, "max_batch_size": 8}
    assert type(xp.make_scorer(net, 0, settings)) is ex.Scorer
    packed = xp.make_scorer(net, 0, {**settings, "engine": "packed", "compile": True})
    assert isinstance(packed, xp.PackedScorer) and isinstance(packed.model, torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(ValueError, match=r"extract.engine must be one of padded, packed, not 'flat'"):
        xp.make_scorer(net, 0, {**settings, "engine": "flat"})
    cfg = load_config([ROOT / "params.yaml"])
    assert cfg["extract"]["engine"] == "padded" and cfg["extract"]["compile"] is False
    bad = tmp_path / "bad.yaml"
    bad.write_text("extract:\n  engine: flat\n")
    with pytest.raises(Exception, match="engine"):
        load_config([ROOT / "params.yaml", bad])
