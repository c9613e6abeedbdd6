import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from moralign import extraction as ex
from moralign import training
from moralign.config import validate
from moralign.data import TASKS, counts_matrix
from moralign.modeling import load_model, load_tokenizer
from moralign.predictors import CellInputs
from moralign.predictors import hf as hf_predictor
from moralign.prompts import PromptBuilder
from tests.conftest import ROOT
from tests.test_extraction import long_items


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
    ids = [p.ids for p in training.encode_items(builder, tok, frame, None)]
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


def demo_config(**extract):
    raw = yaml.safe_load((ROOT / "config/demo.yaml").read_text())
    raw["extract"].update(extract)
    return raw


def model_dir(tmp_path, tiny_models, name):
    base = tmp_path / name
    shutil.copytree(tiny_models[name], base)
    (base / "moralign-source.json").write_text('{"built": {}, "hf_id": null, "revision": null}')
    return base


# (dilemmas' actions are a few words: shortening them is never needed)
@pytest.mark.parametrize(("dataset", "shorten"), [("anecdotes", False), ("anecdotes", True), ("dilemmas", False)])
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_training_and_extraction_see_identical_ids(tmp_path, tiny_models, processed, name, dataset, shorten):
    """Every item of every split (and long items), with the demo's prompts: the same ids in both paths."""
    model = f"tiny-{name}"
    base = model_dir(tmp_path, tiny_models, name)
    max_length = None
    if shorten:  # a budget a tenth of the items exceed
        cfg = validate(demo_config())
        builder = PromptBuilder.from_config(cfg, model, dataset, pd.read_parquet(processed[dataset] / "train.parquet"))
        tok = load_tokenizer(str(base))
        dev = pd.read_parquet(processed[dataset] / "dev.parquet")
        max_length = int(np.percentile([len(builder.encode(tok, r).ids) for _, r in dev.iterrows()], 90))
    cfg = validate(demo_config(max_length=max_length))
    predictor = hf_predictor.build(cfg, model, dataset, "base", CellInputs(processed[dataset], base))
    tok = predictor.tokenizer
    builder = PromptBuilder.from_config(cfg, model, dataset, pd.read_parquet(processed[dataset] / "train.parquet"))
    answers = ex.answer_variants(tok, builder.answers)
    settings = {**cfg.finetune("votes"), "max_length": max_length}
    frames = [pd.read_parquet(processed[dataset] / f"{split}.parquet") for split in ("train", "dev", "test")]
    if dataset == "anecdotes":
        frames.append(long_items(frames[1].head(8), 20))
    shortened = 0
    for frame in frames:
        extraction = predictor.encode(frame)
        prompts = training.encode_items(builder, tok, frame, max_length)
        assert [p.ids for p in prompts] == [e.ids for e in extraction]
        counts = counts_matrix(frame)
        soft = training.training_rows("soft", tok, builder, frame, prompts, counts, answers, settings)
        assert [r["input_ids"] for r in soft] == [e.ids for e in extraction]
        votes = training.training_rows("votes", tok, builder, frame, prompts, counts, answers, settings)
        pairs = training.vote_examples(counts, settings["votes_per_item"], settings["seed"])
        assert all(r["input_ids"][:-1] == extraction[i].ids for r, (i, _) in zip(votes, pairs, strict=True))
        assert all(p.ids[0] == tok.bos_token_id and p.ids.count(tok.bos_token_id) == 1 for p in prompts)
        shortened += sum(p.shortened for p in prompts)
        if max_length:
            assert max(len(p.ids) for p in prompts) <= max_length
    assert (shortened > 0) == shorten


def test_finetune_records_shortened_items(tmp_path, tiny_models, processed):
    """The adapter's metadata.json counts the items shortened to fit finetune.max_length, per split."""
    from moralign.steps import finetune

    raw = demo_config()
    raw["finetune"].update(max_steps=1, eval_steps=1, batch_size=2, max_train_items=6, max_dev_items=4)
    data = tmp_path / "data"
    shutil.copytree(processed["anecdotes"], data)
    for split, n in (("train", 2), ("dev", 1)):
        frame = pd.read_parquet(data / f"{split}.parquet")
        frame.iloc[:n] = long_items(frame.iloc[:n], 20)
        frame.to_parquet(data / f"{split}.parquet")
    base = model_dir(tmp_path, tiny_models, "llama")
    tok = load_tokenizer(str(base))
    cfg = validate(raw)
    builder = PromptBuilder.from_config(cfg, "tiny-llama", "anecdotes", pd.read_parquet(data / "train.parquet"))
    lengths = [
        len(p.ids) for p in training.encode_items(builder, tok, pd.read_parquet(data / "train.parquet").head(6), None)
    ]
    raw["finetune"]["max_length"] = max(sorted(lengths)[-3], 64)
    finetune.run(validate(raw), "tiny-llama", "anecdotes", "soft", data, base, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "metadata.json").read_text())
    assert meta["shortened_items"] == {"train": 2, "dev": 1}


def test_votes_rows_with_multi_token_answers(tiny_models, processed):
    """Answers without a single-token variant: the prompt's ids, then the answer as extraction scores it."""
    tok = load_tokenizer(str(tiny_models["mistral"]))
    spec = {"system": None, "template": "A: {action1}\nB: {action2}", "n_shots": 0, "shot_seed": 0}
    spec["answers"] = ["the first action", "the second action"]
    frame = pd.read_parquet(processed["dilemmas"] / "dev.parquet").head(4)
    builder = PromptBuilder(TASKS["dilemmas"], spec, chat=True)
    answers = ex.answer_variants(tok, spec["answers"])
    assert not answers.single_token
    prompts = training.encode_items(builder, tok, frame, None)
    counts = counts_matrix(frame)
    rows = training.training_rows(
        "votes", tok, builder, frame, prompts, counts, answers, {"votes_per_item": 3, "seed": 0}
    )
    for row, (i, j) in zip(rows, training.vote_examples(counts, 3, 0), strict=True):
        n = len(prompts[i].ids)
        assert row["input_ids"][:n] == prompts[i].ids and row["completion_mask"] == [0] * n + [1] * (
            len(row["input_ids"]) - n
        )
        assert tok.decode(row["input_ids"][n:]).strip() == spec["answers"][j]
