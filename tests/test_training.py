import numpy as np
import pandas as pd
import pytest
import torch

from moralign import extraction as ex
from moralign import training
from moralign.data import TASKS, counts_matrix
from moralign.modeling import load_model, load_tokenizer
from moralign.prompts import PromptBuilder


def test_vote_examples_follow_the_votes():
    counts = np.array([[3, 2], [0, 5], [1, 4], [700, 2798]])
    pairs = training.vote_examples(counts[:3], per_item=5, seed=0)
    # with K = N every item's answers are exactly its votes
    for i in range(3):
        got = np.bincount([c for j, c in pairs if j == i], minlength=2)
        np.testing.assert_array_equal(got, counts[i])
    # items with thousands of votes stay bounded, and answers match the shares in expectation
    draws = np.array(
        [np.bincount([c for _, c in training.vote_examples(counts[3:], 8, s)], minlength=2) for s in range(400)]
    )
    assert draws.sum(1).max() == 8
    assert draws.mean(0) / 8 == pytest.approx(counts[3] / counts[3].sum(), abs=0.02)


def test_soft_objective_is_the_metric(tiny_models, processed):
    """The soft loss's choice distribution is exactly extraction's p (same tokens, same normalisation)."""
    tok = load_tokenizer(str(tiny_models["llama"]))
    model = load_model(str(tiny_models["llama"]), None, torch.device("cpu"), torch.float32)
    spec = {
        "system": None,
        "template": "A: {action1}\nB: {action2}\nWhich is less ethical?",
        "answers": ["A", "B"],
        "n_shots": 0,
        "shot_seed": 0,
    }
    frame = pd.read_parquet(processed["dilemmas"] / "dev.parquet").head(12)
    builder = PromptBuilder(TASKS["dilemmas"], spec, chat=True)
    ids = ex.encode_prompts(tok, [builder.render(tok, r) for _, r in frame.iterrows()], chat=True)
    answers = ex.answer_variants(tok, spec["answers"])
    index, valid = training.choice_index(answers, torch.device("cpu"))
    batch = ex.pad_batch(ids, tok.pad_token_id)
    with torch.no_grad():
        logits = model(**batch, logits_to_keep=1).logits[:, -1]
    p_train = training.choice_logprobs(logits, index, valid).exp().numpy()
    _, p_extract = ex.normalise(ex.Scorer(model, tok.pad_token_id).score_tokens(ids, answers))
    np.testing.assert_allclose(p_train, p_extract, atol=1e-5)
    human = counts_matrix(frame) / 5
    assert training.dev_xentropy(model, tok.pad_token_id, ids, answers, human) == pytest.approx(
        float(-(human * np.log(p_extract)).sum(1).mean()), abs=1e-5
    )
