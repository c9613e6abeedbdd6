import copy
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
from moralign.trainer import MIN_SHARED_PREFIX, StepCollator, build_trainer, dev_xentropy, memory_plan
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
    assert dev_xentropy(model, tok.pad_token_id, ids, answers, human) == pytest.approx(
        float(-(human * np.log(p_extract)).sum(1).mean()), abs=1e-5
    )


def _soft_case(seed: int = 0, batch: int = 6, vocab: int = 40):
    """Random logits, an answer set with several variants per choice, random human shares."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, vocab, generator=g, dtype=torch.float64)
    answers = ex.AnswerTokens(("Yes", "No"), ((3, 7, 11), (5, 20)), (("Yes", " Yes", "yes"), ("No", " No")))
    index, valid = training.choice_index(answers, torch.device("cpu"))
    target = torch.rand(batch, 2, generator=g, dtype=torch.float64)
    return logits, index, valid, target / target.sum(1, keepdim=True)


def test_soft_loss_is_the_renormalised_cross_entropy_minus_log_coverage():
    for seed in range(5):
        logits, index, valid, target = _soft_case(seed)
        renormalised = -(target * training.choice_logprobs(logits, index, valid)).sum(-1)
        probs = torch.softmax(logits, -1)
        coverage = probs[:, [3, 7, 11, 5, 20]].sum(-1)
        torch.testing.assert_close(
            training.soft_losses(logits, target, index, valid), renormalised - torch.log(coverage), rtol=0, atol=1e-12
        )
        # and, independently: -sum_j h_j log(sum of choice j's variant probabilities)
        by_hand = -(target[:, 0] * probs[:, [3, 7, 11]].sum(-1).log() + target[:, 1] * probs[:, [5, 20]].sum(-1).log())
        torch.testing.assert_close(training.soft_losses(logits, target, index, valid), by_hand, rtol=0, atol=1e-12)


def test_soft_loss_pushes_mass_onto_the_answers():
    """A constant added to every answer logit changes the loss: d loss / d shift = -(1 - coverage) per item.

    The renormalised cross-entropy is blind to that shift (its gradient is 0): it never taught a model to answer.
    """
    logits, index, valid, target = _soft_case(1)
    on_answers = torch.zeros(logits.shape[1], dtype=torch.float64)
    on_answers[[3, 7, 11, 5, 20]] = 1.0
    shift = torch.zeros((), dtype=torch.float64, requires_grad=True)
    training.soft_losses(logits + shift * on_answers, target, index, valid).sum().backward()
    coverage = torch.softmax(logits, -1)[:, [3, 7, 11, 5, 20]].sum(-1)
    assert shift.grad.item() == pytest.approx(-(1 - coverage).sum().item(), abs=1e-10)
    assert abs(shift.grad.item()) > 0.1
    shift.grad = None
    (-(target * training.choice_logprobs(logits + shift * on_answers, index, valid)).sum()).backward()
    assert shift.grad.item() == pytest.approx(0.0, abs=1e-10)


class _Pieces:
    """A tokenizer stand-in that names token pieces (what ``training_variants`` asks of a tokenizer)."""

    def __init__(self, pieces: dict[int, str]) -> None:
        self.pieces = pieces

    def convert_ids_to_tokens(self, i: int) -> str:
        return self.pieces[i]


def test_training_variants_keep_plain_spellings_only():
    # token 3 is a byte-fallback piece: it decodes to "A" like token 1, its piece gives it away
    answers = ex.AnswerTokens(
        ("A", "Yes"),
        ((1, 2, 3, 4, 5), (6, 7, 8, 9)),
        (("A", " A", "A", "\xa0A", "\nA"), ("Yes", " yes", "YES", "\u2003Yes")),
    )
    tok = _Pieces({1: "A", 2: "▁A", 3: "<0x41>", 4: "Â łA", 5: "ĊA", 6: "Yes", 7: "Ġyes", 8: "YES", 9: "âĢĥYes"})
    assert training.training_variants(tok, answers).variants == ((1, 2, 5), (6, 7, 8))
    # a token the template writes as the answer is kept whatever its spelling
    assert training.training_variants(tok, answers, [[4, 9]]).variants == ((1, 2, 4, 5), (6, 7, 8, 9))


@pytest.mark.parametrize("name", ["llama-3.1", "mistral-v0.3"])
def test_training_variants_of_real_tokenizers(tmp_path, name):
    """Byte-fallback pieces (<0x41>) and no-break-space spellings get no training mass; plain twins do."""
    pytest.importorskip("mistral_common")
    pytest.importorskip("llama_models")
    from tests.test_real_tokenizers import CASES

    tok = CASES[name][1](tmp_path)
    letters = ex.answer_variants(tok, ["A", "B"])
    kept = training.training_variants(tok, letters)
    for j, letter in enumerate("AB"):
        dropped = set(letters.variants[j]) - set(kept.variants[j])
        assert dropped, (name, letters.variant_strings[j])
        assert all(tok.convert_ids_to_tokens(v).startswith("<0x") or "\xa0" in tok.decode([v]) for v in dropped)
        assert {s.strip(" ") for s in kept.variant_strings[j]} <= {letter, "\t" + letter}
    words = ex.answer_variants(tok, ["Yes", "No"])
    assert training.training_variants(tok, words).variant_strings == words.variant_strings


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
    settings = {**cfg.finetune("votes", seed=0), "max_length": max_length}
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
        assert [r["input_ids"] for r in votes] == [e.ids for e in extraction]  # one pass per item
        assert all(t in v for r in votes for t, v in zip(r["answer_ids"], answers.variants, strict=True))
        rows = training.training_rows("votes", tok, builder, frame, prompts, counts, answers, settings, one_pass=False)
        assert all(s[:-1] == e.ids for r, e in zip(rows, extraction, strict=True) for s in r["sequences"])
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
    """Answers without a single-token variant: per item, its sampled answers as rows (prompt ids, then the answer
    as extraction scores it), the loss on the answer tokens only."""
    tok = load_tokenizer(str(tiny_models["mistral"]))
    spec = {"system": None, "template": "A: {action1}\nB: {action2}", "n_shots": 0, "shot_seed": 0}
    spec["answers"] = ["the first action", "the second action"]
    frame = pd.read_parquet(processed["dilemmas"] / "dev.parquet").head(4)
    builder = PromptBuilder(TASKS["dilemmas"], spec, chat=True)
    answers = ex.answer_variants(tok, spec["answers"])
    assert not answers.single_token
    prompts = training.encode_items(builder, tok, frame, None)
    counts = counts_matrix(frame)
    settings = {"votes_per_item": 3, "seed": 0}
    rows = training.training_rows("votes", tok, builder, frame, prompts, counts, answers, settings)
    pairs = training.vote_examples(counts, 3, 0)
    flat = [(seq, lab) for row in rows for seq, lab in zip(row["sequences"], row["labels"], strict=True)]
    assert len(rows) == len(frame) and all(len(r["sequences"]) == 3 for r in rows)
    for (seq, labels), (i, j) in zip(flat, pairs, strict=True):
        n = len(prompts[i].ids)
        assert seq[:n] == prompts[i].ids and labels == [-100] * n + seq[n:]
        assert tok.decode(seq[n:]).strip() == spec["answers"][j]
    with pytest.raises(ValueError, match="single-token"):
        training.training_rows("votes", tok, builder, frame, prompts, counts, answers, settings, one_pass=True)


def test_vote_weights_are_the_sampled_answers():
    counts = np.array([[3, 2], [0, 5], [1, 4], [700, 2798], [1, 1]])
    for k, seed in ((5, 0), (8, 1), (3, 2)):
        weights = training.vote_weights(counts, k, seed)
        expected = np.zeros(counts.shape)
        for i, c in training.vote_examples(counts, k, seed):
            expected[i, c] += 1 / k
        np.testing.assert_allclose(weights, expected, atol=1e-15)
        np.testing.assert_allclose(weights.sum(1), 1.0)


def recipe_settings(objective, **overrides):
    return {
        **validate(demo_config()).finetune(objective, seed=0),
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,  # K rows get K dropout masks, one pass gets one: equal only without dropout
        "gradient_checkpointing": False,
        **overrides,
    }


def tiny_lora(tiny_models):
    """The tiny Llama with fresh LoRA adapters, in float64 (copy it for each trainer: LoRA's init is random)."""
    base = load_model(str(tiny_models["llama"]), None, torch.device("cpu"), torch.float32)
    return training.wrap_lora(base, recipe_settings("votes"), quantized=False).double()


def trainer_for(tmp_path, name, tok, lm, objective, rows, answers, **overrides):
    settings = recipe_settings(objective, **overrides)
    dev = ([rows[0].get("input_ids") or rows[0]["sequences"][0][:-1]], np.array([[0.5, 0.5]]))
    return build_trainer(
        objective, copy.deepcopy(lm), tok, rows, dev, answers, settings, tmp_path / name, torch.device("cpu")
    )


def step_gradients(trainer, rows):
    """Loss and gradients of one optimiser step over ``rows`` (the trainer's own training_step)."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.training_step(model, StepCollator()(rows))
    return float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def anecdote_rows(tiny_models, processed):
    """Tiny Llama, its tokenizer, and 10 anecdotes' votes rows both ways (one pass; one row per sampled answer)."""
    tok = load_tokenizer(str(tiny_models["llama"]))
    cfg = validate(demo_config())
    frame = pd.read_parquet(processed["anecdotes"] / "train.parquet").head(10)
    builder = PromptBuilder.from_config(cfg, "tiny-llama", "anecdotes", frame)
    answers = ex.answer_variants(tok, builder.answers)
    prompts = training.encode_items(builder, tok, frame, None)
    counts = counts_matrix(frame)
    settings = {"votes_per_item": 8, "seed": 3}
    one = training.training_rows("votes", tok, builder, frame, prompts, counts, answers, settings)
    rows = training.training_rows("votes", tok, builder, frame, prompts, counts, answers, settings, one_pass=False)
    soft = training.training_rows("soft", tok, builder, frame, prompts, counts, answers, settings)
    return tok, answers, one, rows, soft


def test_votes_in_one_pass_equal_one_row_per_sampled_answer(tmp_path, tiny_models, anecdote_rows):
    """The one-pass votes loss and gradients equal those of trl's SFT loss over the K rows, to 1e-6 (float64).

    The rows go through trl's own collator and loss (``SFTTrainer.compute_loss``, answer tokens only: the rows
    are tokenized by the project, so trl adds no EOS), split into several micro-batches; the one-pass items in one.
    """
    tok, answers, one, rows, _ = anecdote_rows
    lm = tiny_lora(tiny_models)
    assert all(sum(t != -100 for t in lab) == 1 for r in rows for lab in r["labels"])  # the answer token, no EOS
    one_pass = trainer_for(tmp_path, "one", tok, lm, "votes", one, answers, token_budget=1 << 20)
    per_row = trainer_for(tmp_path, "rows", tok, lm, "votes", rows, answers, token_budget=200)
    loss_one, grads_one = step_gradients(one_pass, one)
    loss_rows, grads_rows = step_gradients(per_row, rows)
    # trl's log-probability kernel accumulates in float32: the loss (~6.4 for a random model) agrees to 1e-6 of
    # itself; the gradients (largest entries ~2) to 1e-6 absolute (1e-8 seen)
    assert loss_one == pytest.approx(loss_rows, rel=1e-6)
    assert grads_one.keys() == grads_rows.keys() and len(grads_one) >= 5
    for name, grad in grads_one.items():
        torch.testing.assert_close(grad, grads_rows[name], atol=1e-6, rtol=0, msg=name)
    assert max(float(g.abs().max()) for g in grads_one.values()) > 1e-3  # not trivially zero


@pytest.mark.parametrize("objective", ["soft", "votes"])
def test_micro_batches_and_shared_prefix_do_not_change_the_step(tmp_path, tiny_models, anecdote_rows, objective):
    """A step's items in one micro-batch or in many (token budget), the shared prefix run once or in every row:
    the same loss and gradients (float64)."""
    tok, answers, one, _, soft = anecdote_rows
    rows = soft if objective == "soft" else one
    lm = tiny_lora(tiny_models)
    whole = trainer_for(tmp_path, "whole", tok, lm, objective, rows, answers, token_budget=1 << 20)
    plain = trainer_for(tmp_path, "plain", tok, lm, objective, rows, answers, token_budget=1 << 20)
    plain.reuse_prefix = False
    split = trainer_for(tmp_path, "split", tok, lm, objective, rows, answers, token_budget=450)
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(ex.make_batches(lengths, 450, len(rows))) >= 4
    assert ex.common_prefix_length([r["input_ids"] for r in rows]) >= MIN_SHARED_PREFIX
    loss_whole, grads_whole = step_gradients(whole, rows)
    for other in (plain, split):
        loss, grads = step_gradients(other, rows)
        assert loss == pytest.approx(loss_whole, abs=1e-9)
        for name, grad in grads_whole.items():
            torch.testing.assert_close(grad, grads[name], atol=1e-9, rtol=0, msg=name)


GIB = 2**30


def test_memory_plan():
    """Recompute activations only when memory requires it; shrink the micro-batch first, down to 4,096 tokens."""
    shape = {"n_layers": 32, "hidden_size": 4096}  # Llama-3.1-8B: 84 B x 32 x 4096 = 10.5 MiB per token (bf16)
    plan = memory_plan("auto", 8192, **shape, quantized=False, free_bytes=None)
    assert plan["gradient_checkpointing"] is False and "CPU" in plan["reason"]
    plan = memory_plan(True, 8192, **shape, quantized=False, free_bytes=None)
    assert plan == {"gradient_checkpointing": True, "token_budget": 8192, "reason": "as configured"}
    # an H200 after loading a bf16 8B model (~124 GiB free): 8,192 tokens need ~84 GiB
    plan = memory_plan("auto", 8192, **shape, quantized=False, free_bytes=124 * GIB)
    assert (plan["gradient_checkpointing"], plan["token_budget"]) == (False, 8192)
    # an H100 (~64 GiB free): halve to 4,096 tokens (~42 GiB)
    plan = memory_plan("auto", 8192, **shape, quantized=False, free_bytes=64 * GIB)
    assert (plan["gradient_checkpointing"], plan["token_budget"]) == (False, 4096)
    # QLoRA (128 B) on a 40 GiB card: 4,096 tokens need 64 GiB -> recompute, at the configured budget
    plan = memory_plan("auto", 8192, **shape, quantized=True, free_bytes=40 * GIB)
    assert (plan["gradient_checkpointing"], plan["token_budget"]) == (True, 8192) and "exceed" in plan["reason"]
    # a configured budget below 4,096 is never halved
    plan = memory_plan("auto", 2048, **shape, quantized=True, free_bytes=20 * GIB)
    assert (plan["gradient_checkpointing"], plan["token_budget"]) == (True, 2048)
