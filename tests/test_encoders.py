"""Encoder baselines: Scruples' losses, inputs and heads, the training loop, the predictor, resume, the demo rows."""

import json
import math
import re
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import special, stats

from moralign import encoder_heads, encoder_inputs, encoder_losses, encoder_model, encoder_training, metrics
from moralign.config import ConfigError, load_config, validate
from moralign.data import ANECDOTE_LABELS, counts_matrix
from moralign.errors import DataError
from moralign.inputs import check_predictions
from moralign.modeling import load_tokenizer
from moralign.predictors import CellInputs
from moralign.predictors.encoder import EncoderPredictor
from moralign.scoring import score_cell
from moralign.steps import extract, fetch_model, train_encoder
from moralign.tinyencoders import train_texts
from tests.conftest import ROOT, run

SPEC = {"vocab_size": 600, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4}


def demo_raw():
    return yaml.safe_load((ROOT / "config/demo.yaml").read_text())


def small_config(**encoder):
    """The demo config with small tiny encoders and a quick training schedule."""
    raw = demo_raw()
    for name, arch, seed in (("tiny-bert", "bert", 3), ("tiny-roberta", "roberta", 4)):
        raw["models"][name]["build"] = {"architecture": arch, "seed": seed, **SPEC}
    raw["experiment"]["models"] = ["tiny-bert", "tiny-roberta"]
    raw["encoder"].update({"epochs": 2, "batch_size": 16, **encoder})
    return raw


@pytest.fixture(scope="module")
def bases(raw_dir, tmp_path_factory):
    """Tiny BERT and RoBERTa base folders, built by fetch_model as the workflow does."""
    out = tmp_path_factory.mktemp("encoders")
    cfg = validate(small_config())
    archives = [raw_dir / "anecdotes.tar.gz", raw_dir / "dilemmas.tar.gz"]
    for name in ("tiny-bert", "tiny-roberta"):
        fetch_model.run(cfg, name, archives, out / name)
    return {"bert": out / "tiny-bert", "roberta": out / "tiny-roberta"}


# --------------------------------------------------------------------------------------------------- losses


def test_dirichlet_multinomial_loss_matches_scipy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 5)) * 2
    counts = rng.integers(0, 30, size=(50, 5))
    counts[counts.sum(1) == 0, 0] = 1
    got = encoder_losses.dirichlet_multinomial_nll(
        torch.tensor(logits), torch.tensor(counts, dtype=torch.float64)
    ).numpy()
    for i in range(len(counts)):
        n = counts[i].sum()
        logpmf = stats.dirichlet_multinomial.logpmf(counts[i], np.exp(logits[i]), n)
        # scipy's pmf includes the multinomial coefficient N! / prod y_j!, which Scruples' loss leaves out
        coefficient = math.lgamma(n + 1) - sum(math.lgamma(y + 1) for y in counts[i])
        assert got[i] == pytest.approx(-(logpmf - coefficient), rel=1e-10, abs=1e-10)


def test_losses_reproduce_scruples_check_values():
    # allenai/scruples tests/baselines/test_loss.py (design.md §5): the model outputs log-alphas directly
    dm = encoder_losses.dirichlet_multinomial_nll
    assert float(dm(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([[0.5, 0.5]], dtype=torch.float64))) == (
        pytest.approx(0.9347116558304358, abs=1e-12)
    )
    logits = torch.tensor([[0.0, 0.0], [math.log(0.5), math.log(2.0)]], dtype=torch.float64)
    votes = torch.tensor([[0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)
    assert float(dm(logits, votes).mean()) == pytest.approx(1.1093992405423625, abs=1e-12)
    xent = encoder_losses.soft_xentropy(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([[0.5, 0.5]]))
    assert float(xent) == pytest.approx(0.6931471805599453, abs=1e-12)


def test_soft_cross_entropy_by_hand():
    logits = [[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]
    counts = [[3, 1, 0], [0, 2, 2]]
    got = encoder_losses.soft_xentropy(
        torch.tensor(logits, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)
    )
    for row, (z, y) in enumerate(zip(logits, counts, strict=True)):
        log_norm = math.log(sum(math.exp(v) for v in z))
        want = -sum(c / sum(y) * (v - log_norm) for v, c in zip(z, y, strict=True))
        assert float(got[row]) == pytest.approx(want, abs=1e-12)
    assert encoder_losses.xentropy(np.array(logits), np.array(counts)) == pytest.approx(float(got.mean()), abs=1e-12)


# ---------------------------------------------------------------------------------------------------- inputs


def test_pair_truncation_follows_scruples():
    assert encoder_inputs.pair_room(10, 1000, 509) == (10, 499)  # a short title whole, the text cut
    assert encoder_inputs.pair_room(1000, 5, 509) == (504, 5)
    assert encoder_inputs.pair_room(400, 400, 509) == (254, 254)  # both long: half each (room // 2)
    assert encoder_inputs.pair_room(3, 4, 509) == (3, 4)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_anecdote_inputs_keep_the_beginning_and_match_the_tokenizer(arch, bases, processed):
    tokenizer = load_tokenizer(str(bases[arch]))
    frame = pd.read_parquet(processed["anecdotes"] / "dev.parquet").head(5)
    units = encoder_inputs.InputEncoder(tokenizer, "anecdotes", 512).encode(frame)
    for (unit,), (_, row) in zip(units, frame.iterrows(), strict=True):
        ids, types = unit
        assert ids == tokenizer(row["title"], row["text"])["input_ids"]  # no truncation: the tokenizer's own pair
        if arch == "bert":
            assert types == tokenizer(row["title"], row["text"], return_token_type_ids=True)["token_type_ids"]
    long = frame.head(1).copy()
    long["text"] = long["text"] + " " + " ".join(["everyone was upset about it"] * 200)
    (((ids, _),),) = encoder_inputs.InputEncoder(tokenizer, "anecdotes", 64).encode(long)
    title = tokenizer(long["title"].iloc[0], add_special_tokens=False)["input_ids"]
    text = tokenizer(long["text"].iloc[0], add_special_tokens=False)["input_ids"]
    specials = 3 if arch == "bert" else 4
    kept = 64 - specials - len(title)
    expected = tokenizer.decode(title + text[:kept])  # the title whole, then the text's beginning
    assert len(ids) == 64 and ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == expected.replace(" ", "")
    empty = frame.head(1).assign(text="")
    (((ids, _),),) = encoder_inputs.InputEncoder(tokenizer, "anecdotes", 512).encode(empty)
    assert ids == tokenizer(empty["title"].iloc[0])["input_ids"]  # the title alone, as Scruples


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_dilemma_actions_are_encoded_alone(arch, bases, processed):
    tokenizer = load_tokenizer(str(bases[arch]))
    frame = pd.read_parquet(processed["dilemmas"] / "dev.parquet").head(4)
    units = encoder_inputs.InputEncoder(tokenizer, "dilemmas", 96).encode(frame)
    for pair, (_, row) in zip(units, frame.iterrows(), strict=True):
        assert [ids for ids, _ in pair] == [tokenizer(row[f])["input_ids"] for f in ("action1", "action2")]
    (((ids, _), _),) = encoder_inputs.InputEncoder(tokenizer, "dilemmas", 8).encode(
        frame.head(1).assign(action1="a " * 50)
    )
    assert len(ids) == 8 and ids[-1] == tokenizer.sep_token_id


CONTROL = "[SEP] </s> <s> [CLS] <pad> [MASK] <mask> [PAD]"


def plain_ids(tokenizer, text):
    """Reference: the tokenizer's normalizer, pre-tokenizer and model run by hand, so no special token is ever
    matched in the text: what the vendors' own tokenizers do with content (plain text)."""
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    return [t.id for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text) for t in backend.model.tokenize(piece)]


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_item_text_is_never_a_control_token(arch, bases, processed):
    """An item that writes [SEP], </s>, <s> or [CLS] gets those characters; only the post-processor adds specials."""
    tokenizer = load_tokenizer(str(bases[arch]))
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    specials = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}  # text may have unknown characters
    frame = pd.read_parquet(processed["anecdotes"] / "dev.parquet").head(3)
    frame = frame.assign(title=frame["title"] + " " + CONTROL, text=CONTROL + " " + frame["text"] + " " + CONTROL)
    # the trap is real: the tokenizer's default path reads these as control tokens
    assert sep in tokenizer(frame["title"].iloc[0], add_special_tokens=False)["input_ids"]
    middle = [sep] if arch == "bert" else [sep, sep]
    encoder = encoder_inputs.InputEncoder(tokenizer, "anecdotes", 512)
    units = encoder.encode(frame)  # what training (Split) and prediction (EncoderPredictor) both read
    for ((ids, types),), (_, row) in zip(units, frame.iterrows(), strict=True):
        title, text = plain_ids(tokenizer, row["title"]), plain_ids(tokenizer, row["text"])
        assert ids == [cls, *title, *middle, *text, sep]
        assert sum(i in specials for i in ids) == 2 + len(middle)
        if arch == "bert":
            assert types == [0] * (len(title) + 2) + [1] * (len(text) + 1)
    dilemmas = pd.read_parquet(processed["dilemmas"] / "dev.parquet").head(3)
    dilemmas = dilemmas.assign(action1=CONTROL + " " + dilemmas["action1"], action2=dilemmas["action2"] + " </s>")
    pairs = encoder_inputs.InputEncoder(tokenizer, "dilemmas", 96).encode(dilemmas)
    for pair, (_, row) in zip(pairs, dilemmas.iterrows(), strict=True):
        assert [ids for ids, _ in pair] == [[cls, *plain_ids(tokenizer, row[f]), sep] for f in ("action1", "action2")]
    model = encoder_model.load_model(bases[arch], "anecdotes", torch.device("cpu"))
    predicted = EncoderPredictor(model, encoder, tokenizer, 4096).predict(frame)
    assert predicted["n_prompt_tokens"].tolist() == [len(u[0][0]) for u in units]


def test_tiny_tokenizers_learn_from_the_train_split_only(raw_dir):
    texts = list(train_texts([raw_dir / "anecdotes.tar.gz", raw_dir / "dilemmas.tar.gz"]))
    assert len(texts) == 2 * 160 + 2 * 160  # title + text per anecdote, two actions per dilemma, train only


def test_tiny_tokenizers_are_the_same_in_every_process(raw_dir):
    """A rebuilt tiny encoder must be the same model: its tokenizer may not depend on hash order (see
    moralign.tinyencoders.wordpiece_vocab), so two fresh interpreters build identical tokenizers."""
    import subprocess
    import sys

    code = (
        "import sys; from moralign.tinyencoders import train_texts, train_tokenizer; "
        f"texts = list(train_texts([{str(raw_dir / 'anecdotes.tar.gz')!r}, {str(raw_dir / 'dilemmas.tar.gz')!r}])); "
        "print('|'.join(train_tokenizer(texts, a, 600).backend_tokenizer.to_str() for a in ('bert', 'roberta')))"
    )
    builds = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert builds[0] == builds[1] and len(builds[0]) > 1000


# ------------------------------------------------------------------------------------------------------ heads


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_dilemma_head_scores_actions_independently(arch, bases, processed):
    torch.manual_seed(0)
    model = encoder_model.load_model(bases[arch], "dilemmas", torch.device("cpu"))
    tokenizer = load_tokenizer(str(bases[arch]))
    frame = pd.read_parquet(processed["dilemmas"] / "dev.parquet")
    swapped = frame.assign(action1=frame["action2"], action2=frame["action1"])
    encoder = encoder_inputs.InputEncoder(tokenizer, "dilemmas", 96)
    logits = model.predict(encoder.encode(frame), token_budget=256)
    logits_swapped = model.predict(encoder.encode(swapped), token_budget=256)
    assert np.array_equal(logits, logits_swapped[:, ::-1])  # exactly: each action is scored on its own
    assert not np.allclose(logits[:, 0], logits[:, 1])
    # the items' order does not matter either, nor the batch size
    reordered = model.predict(encoder.encode(frame.iloc[::-1]), token_budget=10_000)[::-1]
    np.testing.assert_allclose(reordered, logits, rtol=0, atol=1e-5)


def test_both_anecdote_datasets_get_scruples_five_way_head(bases, processed):
    tokenizer = load_tokenizer(str(bases["bert"]))
    for dataset in ("anecdotes", "anecdotes-5way"):
        model = encoder_model.load_model(bases["bert"], dataset, torch.device("cpu"))
        assert model.net.config.id2label == dict(enumerate(ANECDOTE_LABELS))
        frame = pd.read_parquet(processed[dataset] / "dev.parquet").head(7)
        logits = model.predict(encoder_inputs.InputEncoder(tokenizer, dataset, 512).encode(frame), token_budget=512)
        assert logits.shape == (7, 5) and np.isfinite(logits).all()


def test_binary_anecdotes_collapse_the_five_way_head():
    """WRONG = AUTHOR + EVERYBODY, RIGHT = OTHER + NOBODY, INFO dropped, renormalised; Σα without INFO's α."""
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(40, 5)) * 3
    s = special.softmax(logits, axis=1)  # AUTHOR, OTHER, EVERYBODY, NOBODY, INFO
    wrong = (s[:, 0] + s[:, 2]) / (s[:, 0] + s[:, 1] + s[:, 2] + s[:, 3])
    p = np.exp(encoder_heads.task_log_probs(logits, "anecdotes"))
    np.testing.assert_allclose(p, np.stack([wrong, 1 - wrong], axis=1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.exp(encoder_heads.task_log_probs(logits, "anecdotes-5way")), s, rtol=1e-12)
    alpha = np.exp(logits)
    np.testing.assert_allclose(encoder_heads.task_concentration(logits, "anecdotes"), alpha[:, :4].sum(1), rtol=1e-12)
    np.testing.assert_allclose(encoder_heads.task_concentration(logits, "anecdotes-5way"), alpha.sum(1), rtol=1e-12)
    # the binary row's α (Σα · p) is the five-way α summed as the binarisation sums the votes
    own = encoder_heads.task_concentration(logits, "anecdotes")[:, None] * p
    np.testing.assert_allclose(own, np.stack([alpha[:, 0] + alpha[:, 2], alpha[:, 1] + alpha[:, 3]], 1), rtol=1e-12)


def test_the_anecdotes_head_trains_on_the_five_way_votes(processed):
    binary = pd.read_parquet(processed["anecdotes"] / "train.parquet")
    five = pd.read_parquet(processed["anecdotes-5way"] / "train.parquet").set_index("id")
    got = encoder_heads.head_counts(binary, "anecdotes")
    want = np.stack(five.loc[binary["id"], "counts"].to_numpy())
    assert got.shape == (len(binary), 5) and np.array_equal(got, want)
    # the same votes the binary counts were made from
    assert np.array_equal(got[:, [0, 2]].sum(1), counts_matrix(binary)[:, 0])
    assert np.array_equal(got[:, [1, 3]].sum(1), counts_matrix(binary)[:, 1])
    with pytest.raises(DataError, match=r"no column 'label_counts'.*run prepare again"):
        encoder_heads.head_counts(binary.drop(columns="label_counts"), "anecdotes")


# --------------------------------------------------------------------------------------------------- training


def test_batches_are_length_sorted_pools_and_fit_the_budget():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 500, size=1000).tolist()
    batches = encoder_training.epoch_batches(lengths, 16, seed=0, epoch=3)
    assert sorted(i for b in batches for i in b) == list(range(1000)) and len(batches) == math.ceil(1000 / 16)
    assert batches == encoder_training.epoch_batches(lengths, 16, seed=0, epoch=3)  # a function of (seed, epoch) only
    assert batches != encoder_training.epoch_batches(lengths, 16, seed=0, epoch=4)
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread < 0.2 * (max(lengths) - min(lengths))  # little padding inside a batch
    widths = [2] * 1000
    for group in encoder_model.pack(lengths, widths, 2000):
        longest = max(lengths[i] for i in group)
        assert len(group) == 1 or 2 * len(group) * longest <= 2000


def test_no_weight_decay_on_biases_and_layer_norms(bases):
    model = encoder_model.load_model(bases["roberta"], "anecdotes", torch.device("cpu"))
    exempt, decayed = encoder_training.parameter_groups(model.net, 0.01)
    names = {id(p): n for n, p in model.net.named_parameters()}
    assert exempt["weight_decay"] == 0 and decayed["weight_decay"] == 0.01
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in exempt["params"])
    assert any("LayerNorm.weight" in names[id(p)] for p in exempt["params"])
    assert all("LayerNorm" not in names[id(p)] and not names[id(p)].endswith("bias") for p in decayed["params"])
    assert len(exempt["params"]) + len(decayed["params"]) == len(names)


def test_linear_warmup_then_decay():
    factor = encoder_training.linear_schedule(10, 110)
    assert [factor(s) for s in (0, 5, 10, 60, 110, 120)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]


@pytest.mark.parametrize("loss", encoder_losses.LOSSES)
def test_a_step_does_not_depend_on_the_micro_batches(loss, bases, processed, tmp_path):
    """Gradient accumulation under a token budget gives the gradient of the whole batch."""
    tokenizer = load_tokenizer(str(bases["bert"]))
    frame = pd.read_parquet(processed["dilemmas"] / "train.parquet").head(24)
    split = encoder_training.Split(
        encoder_inputs.InputEncoder(tokenizer, "dilemmas", 96).encode(frame), counts_matrix(frame)
    )
    settings = {"loss": loss, "learning_rate": 1.0, "weight_decay": 0.0, "warmup_proportion": 0.0}
    weights = []
    for budget in (64, 100_000):
        torch.manual_seed(0)
        model = encoder_model.load_model(bases["bert"], "dilemmas", torch.device("cpu"))
        model.net.eval()  # no dropout: the two runs differ only in how the batch is split
        trainer = encoder_training.Trainer(model, {**settings, "token_budget": budget}, tmp_path, "test")
        # plain SGD with lr 1: the update is the gradient itself (AdamW would amplify float noise in the gradient
        # of the choice head's bias, which is exactly 0 in theory: a softmax ignores a shift of both scores)
        trainer.optimizer = torch.optim.SGD(model.net.parameters(), lr=1.0)
        trainer.schedule(10)
        trainer.step(split, list(range(24)))
        weights.append(torch.cat([p.detach().flatten() for p in model.net.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=1e-6)


def test_calibrated_xentropy_against_a_grid_search():
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 9, size=(30, 5))
    counts[counts.sum(1) == 0, 1] = 1
    h = counts / counts.sum(1, keepdims=True)
    logits = 4 * np.log(h + 0.1) + rng.normal(size=(30, 5))  # informative and over-confident: T inside (1, e^3)
    value, temperature = encoder_losses.calibrated_xentropy(logits, counts)
    grid = np.exp(np.linspace(-3, 3, 60001))
    scaled = logits[None] / grid[:, None, None]
    curve = -(h * special.log_softmax(scaled, axis=-1)).sum(-1).mean(-1)
    assert value == pytest.approx(curve.min(), abs=1e-7)
    assert temperature == pytest.approx(grid[curve.argmin()], rel=1e-3)
    assert 1.5 < temperature < 20 and value < encoder_losses.xentropy(logits, counts)


def test_the_epoch_kept_is_the_best_calibrated_one(bases, processed, tmp_path, monkeypatch):
    """Scruples' criterion: an over-confident epoch that ranks the items right beats a timid one that does not,
    although its raw xentropy is far worse."""
    tokenizer = load_tokenizer(str(bases["bert"]))
    encoder = encoder_inputs.InputEncoder(tokenizer, "dilemmas", 32)
    frames = {s: pd.read_parquet(processed["dilemmas"] / f"{s}.parquet").head(16) for s in ("train", "dev")}
    train, dev = (encoder_training.Split(encoder.encode(f), counts_matrix(f)) for f in frames.values())
    h = dev.counts / dev.counts.sum(1, keepdims=True)
    rng = np.random.default_rng(0)
    timid = 0.01 * rng.normal(size=h.shape)  # about uniform, and its ranking is noise
    sure = 20 * np.log(np.clip(h, 0.05, 0.95))  # the right ranking, far too sharp
    scripted = iter([timid, sure])
    model = encoder_model.load_model(bases["bert"], "dilemmas", torch.device("cpu"))
    monkeypatch.setattr(model, "predict", lambda items, budget: next(scripted))
    settings = {**validate(small_config(epochs=2))["encoder"], "checkpoint_steps": 0, "seed": 0}
    result = encoder_training.Trainer(model, settings, tmp_path / "ck", "test").train(train, dev)
    first, second = result["history"]
    assert first["dev_xentropy"] < second["dev_xentropy"]  # raw xentropy would keep epoch 1
    assert second["dev_calibrated_xentropy"] < first["dev_calibrated_xentropy"]
    assert result["best_epoch"] == 2 and result["selection"] == "dev_calibrated_xentropy"
    assert result["best_dev_calibrated_xentropy"] == second["dev_calibrated_xentropy"]
    calibrated = encoder_losses.calibrated_xentropy(sure, dev.counts)
    assert (second["dev_calibrated_xentropy"], second["dev_temperature"]) == calibrated


def test_prediction_autocast_follows_training():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert encoder_model.prediction_autocast(True, cuda) is True  # as training evaluated dev
    assert encoder_model.prediction_autocast(False, cuda) is False  # trained in float32: predicted in float32
    assert encoder_model.prediction_autocast(True, cpu) is False  # bfloat16 autocast is CUDA's: float32 here


def test_dirichlet_with_the_models_own_concentration_reproduces_scruples_check_values():
    """The score of a Dirichlet-multinomial model (α = Σα · p) equals its training loss: Scruples' check values."""
    logits = np.array([[0.0, 0.0], [math.log(0.5), math.log(2.0)]])  # Scruples' log-alphas
    votes = np.array([[0.3, 0.7], [0.6, 0.4]])
    logp = encoder_heads.task_log_probs(logits, "dilemmas")
    own = encoder_heads.task_concentration(logits, "dilemmas")
    np.testing.assert_allclose(own, [2.0, 2.5], rtol=1e-12)
    items = metrics.per_item_metrics(votes, logp, np.ones(2), 1.0, 1.0, own_concentration=own)
    assert items["dirichlet"].mean() == pytest.approx(1.1093992405423625, abs=1e-12)
    loss = encoder_losses.dirichlet_multinomial_nll(torch.tensor(logits), torch.tensor(votes)).numpy()
    np.testing.assert_allclose(items["dirichlet"], loss, rtol=1e-12)
    half = np.array([[0.5, 0.5]])
    one = metrics.per_item_metrics(half, np.log(half), np.ones(1), 1.0, 1.0, own_concentration=np.array([2.0]))
    assert one["dirichlet"][0] == pytest.approx(0.9347116558304358, abs=1e-12)
    # without a concentration of its own, dirichlet stays c = 1
    plain = metrics.per_item_metrics(votes, logp, np.ones(2), 1.0, 1.0)
    np.testing.assert_array_equal(plain["dirichlet"], metrics.dirichlet(votes, logp, 1.0))
    with pytest.raises(ValueError, match=r"1 item\(s\) have a concentration .*'b'"):
        metrics.per_item_metrics(votes, logp, np.ones(2), 1.0, 1.0, ["a", "b"], np.array([2.0, np.nan]))


def test_configs_of_encoder_models():
    raw = demo_raw()
    cfg = validate(raw)
    assert cfg.conditions_of("tiny-bert") == ["trained"] and cfg.conditions_of("tiny-llama")[0] == "base"
    paper = load_config(ROOT / "params.yaml")
    assert paper.backend("roberta-large") == "encoder" and paper.conditions_of("roberta-large") == ["trained"]
    bad = yaml.safe_load(yaml.safe_dump(raw))
    bad["models"]["tiny-bert"]["chat_template"] = True
    with pytest.raises(ConfigError, match="chat_template: false"):
        validate(bad)
    bad = yaml.safe_load(yaml.safe_dump(raw))
    bad["models"]["tiny-bert"]["backend"] = "hf"
    with pytest.raises(ConfigError, match="'bert', which needs backend: encoder"):
        validate(bad)
    bad = yaml.safe_load(yaml.safe_dump(raw))
    bad["recipes"]["trained"] = {"objective": "soft"}
    bad["experiment"]["recipes"] = ["trained"]
    with pytest.raises(ConfigError, match="condition of its own"):
        validate(bad)
    bad = yaml.safe_load(yaml.safe_dump(raw))
    bad["encoder"]["loss"] = "hinge"
    with pytest.raises(ConfigError, match=r"encoder\.loss"):
        validate(bad)


@pytest.mark.parametrize(("arch", "dataset"), [("bert", "anecdotes"), ("roberta", "dilemmas")])
def test_train_then_extract_then_score(arch, dataset, bases, processed, tmp_path):
    """The step trains (seconds), the extract step writes the usual predictions, score reads them unchanged."""
    raw = small_config()
    cfg = validate(raw)
    model = f"tiny-{arch}"
    data = processed[dataset]
    out = tmp_path / "encoder"
    train_encoder.run(cfg.restrict(["encoder", f"models.{model}"]), model, dataset, data, bases[arch], out)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["best_epoch"] in (1, 2) and len(meta["history"]) == 2 and meta["resumed_from"] is None
    assert meta["head"] == ("choice" if dataset == "dilemmas" else "sequence")
    assert meta["head_labels"] == list(encoder_heads.head_labels(dataset))
    calibrated = [h["dev_calibrated_xentropy"] for h in meta["history"]]
    assert meta["best_epoch"] == 1 + int(np.argmin(calibrated)) and meta["selection"] == "dev_calibrated_xentropy"
    assert not out.with_name("encoder.checkpoints").exists()
    pred = tmp_path / "pred"
    extract.run(
        cfg.restrict(["extract", f"models.{model}"]),
        model,
        dataset,
        "trained",
        CellInputs(data, bases[arch], out),
        pred,
    )
    check_predictions(pred, data, dataset, ["dev", "test"], model=model, condition="trained")
    frame = pd.read_parquet(pred / "test.parquet")
    assert (frame["coverage"] == 1).all()
    p = np.stack(frame["p"].to_numpy())
    np.testing.assert_allclose(np.exp(np.stack(frame["logp_choice"].to_numpy())), p, rtol=1e-12)
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["provenance"]["base"]["built"]["architecture"] == arch
    assert summary["provenance"]["condition"] == "trained"
    assert "concentration" not in frame.columns  # trained with xentropy-soft: no Σα of its own
    if dataset == "dilemmas":  # the head is the task: the dev predictions are the selected epoch's, same numbers
        dev_logp = np.log(np.stack(pd.read_parquet(pred / "dev.parquet")["p"].to_numpy()))
        dev_counts = counts_matrix(pd.read_parquet(data / "dev.parquet"))
        assert encoder_losses.xentropy(dev_logp, dev_counts) == pytest.approx(meta["best_dev_xentropy"], abs=1e-5)
    result, _ = score_cell(pred, data, "test", cfg["score"])
    assert result["metrics"]["coverage"]["value"] == 1.0
    assert result["dirichlet_alpha"] == "c=1"


def test_prediction_keeps_float32_weights_whatever_extract_dtype(bases, processed, tmp_path):
    """extract.dtype (the causal LMs' weights) does not make the encoder bfloat16: it runs as its epoch was chosen."""
    from moralign import predictors

    raw = small_config(epochs=1)
    raw["extract"]["dtype"] = "bfloat16"
    cfg = validate(raw)
    out = tmp_path / "encoder"
    train_encoder.run(cfg, "tiny-bert", "dilemmas", processed["dilemmas"], bases["bert"], out)
    inputs = predictors.CellInputs(processed["dilemmas"], bases["bert"], out)
    predictor = predictors.build(cfg, "tiny-bert", "dilemmas", "trained", inputs)
    assert {p.dtype for p in predictor.model.net.parameters()} == {torch.float32}
    assert predictor.provenance["dtype"] == "float32" and predictor.provenance["autocast"] is None
    assert predictor.provenance["trained_bf16_autocast"] is False


@pytest.mark.parametrize("dataset", ["anecdotes", "dilemmas"])
def test_dirichlet_multinomial_model_is_scored_with_its_own_alpha(dataset, bases, processed, tmp_path):
    """Σα is written beside p and the score's dirichlet is the model's own Dirichlet-multinomial NLL."""
    from transformers import AutoModelForMultipleChoice, AutoModelForSequenceClassification

    cfg = validate(small_config(epochs=1, loss="dirichlet-multinomial"))
    data, out, pred = processed[dataset], tmp_path / "encoder", tmp_path / "pred"
    train_encoder.run(cfg, "tiny-bert", dataset, data, bases["bert"], out)
    extract.run(cfg, "tiny-bert", dataset, "trained", CellInputs(data, bases["bert"], out), pred)
    frame = pd.read_parquet(pred / "test.parquet")
    gold = pd.read_parquet(data / "test.parquet").set_index("id").loc[frame["id"]]
    # reference: the saved model run by transformers itself, one item at a time, on the tokenizer's own inputs
    tokenizer = load_tokenizer(str(out))
    auto = AutoModelForMultipleChoice if dataset == "dilemmas" else AutoModelForSequenceClassification
    net = auto.from_pretrained(str(out)).eval()
    want = []
    with torch.no_grad():
        for _, row in gold.iterrows():
            if dataset == "dilemmas":
                enc = tokenizer([row["action1"], row["action2"]], padding=True, return_tensors="pt")
                logits = net(**{k: v[None] for k, v in enc.items()}).logits[0]
                want.append(float(torch.exp(logits.double()).sum()))
            else:
                logits = net(**tokenizer(row["title"], row["text"], return_tensors="pt")).logits[0].double()
                want.append(float(torch.exp(logits[:4]).sum()))  # AUTHOR, OTHER, EVERYBODY, NOBODY: INFO left out
    np.testing.assert_allclose(frame["concentration"], want, rtol=1e-4)
    result, per_item = score_cell(pred, data, "test", cfg["score"])
    assert result["dirichlet_alpha"] == "model"
    p = np.stack(frame["p"].to_numpy())
    counts = counts_matrix(gold)
    nll = []
    for c, alpha in zip(counts, frame["concentration"].to_numpy()[:, None] * p, strict=True):
        n = int(c.sum())
        coefficient = math.lgamma(n + 1) - sum(math.lgamma(y + 1) for y in c)  # Scruples' score leaves it out
        nll.append(-(stats.dirichlet_multinomial.logpmf(c, alpha, n) - coefficient))
    np.testing.assert_allclose(per_item["dirichlet"], nll, rtol=1e-9)
    assert result["metrics"]["dirichlet"]["value"] == pytest.approx(np.mean(nll), rel=1e-9)
    c1 = metrics.dirichlet(counts, np.log(p), 1.0)  # what the cell would get with c = 1: not this
    assert not np.allclose(per_item["dirichlet"], c1)


def test_trained_folder_is_checked_against_its_base(bases, processed, tmp_path):
    cfg = validate(small_config(epochs=1))
    out = tmp_path / "bert"
    train_encoder.run(cfg, "tiny-bert", "dilemmas", processed["dilemmas"], bases["bert"], out)
    with pytest.raises(DataError, match="pass the base model it was trained from"):
        encoder_model.check_trained(out, bases["roberta"], "dilemmas")
    with pytest.raises(DataError, match="trained on 'dilemmas', not 'anecdotes'"):
        encoder_model.check_trained(out, bases["bert"], "anecdotes")


def test_encoder_benchmark_runs_on_cpu():
    out = run(["python", "gpu_encoder.py", "--tiny", "--steps", "2", "--items", "24"], ROOT / "benchmarks").stdout
    assert re.search(r"training tokens/s [\d,]+", out), out
    assert len(re.findall(r"inference items/s [\d,.]+", out)) == 2, out


def test_figures_place_a_trained_only_model_beside_the_chat_models(tmp_path, monkeypatch):
    from moralign import figures

    rows = [("lm", "base", 0.7), ("lm", "soft", 0.5), ("enc", "trained", 0.4), ("uniform", "reference", 0.69)]
    long = pd.DataFrame(
        [
            {
                "dataset": "d",
                "kind": "reference" if c == "reference" else "model",
                "model": m,
                "condition": c,
                "metric": "xentropy",
                "value": v,
                "low": v,
                "high": v,
            }
            for m, c, v in rows
        ]
    )
    seen = {}
    monkeypatch.setattr(figures, "save_figure", lambda fig, stem: seen.setdefault("fig", []).append(fig) or [])
    figures.bar_figure(long, "d", "xentropy", tmp_path / "bars")
    ax = seen["fig"][0].axes[0]
    bars = [c for c in ax.containers if hasattr(c, "patches")]
    centres = {c.get_label(): [p.get_x() + p.get_width() / 2 for p in c.patches] for c in bars}
    assert centres["trained"][0] == pytest.approx(0.0)  # "enc" (tick 0): its one bar on its tick
    assert centres["base"][1] < 1.0 < centres["soft"][1]  # "lm" (tick 1): two bars around it
    cells = {k: (np.full((3, 2), 0.5), np.full((3, 2), 0.5), np.ones(3)) for k in ("enc / trained", "lm / base")}
    figures.scatter_figure(cells, "A", "d", tmp_path / "scatter", ["base", "votes", "trained"])
    titles = [ax.get_title() for ax in seen["fig"][1].axes[:2]]
    assert titles == ["base", "trained"]  # the run's order; a condition without cells is left out


def test_trained_encoders_beat_the_train_prior_on_every_dataset(bases, processed, tmp_path):
    """Both tiny encoders, trained as Scruples trained them, beat the train prior's test xentropy on dilemmas and on
    both anecdote datasets. The anecdotes model is Scruples' five-way head: ONE model gives the anecdotes-5way row
    (the head itself) and the binary row (the head collapsed), so it is trained once per encoder here."""
    from moralign.references import mean_distribution

    cfg = validate(
        small_config(epochs=10, learning_rate=3e-3, batch_size=8, max_length={"anecdotes": 64, "dilemmas": 32})
    )
    beaten = {}
    for arch in ("bert", "roberta"):
        model = f"tiny-{arch}"
        for trained_on, scored in (("anecdotes", ("anecdotes", "anecdotes-5way")), ("dilemmas", ("dilemmas",))):
            out = tmp_path / f"{arch}-{trained_on}"
            train_encoder.run(cfg, model, trained_on, processed[trained_on], bases[arch], out)
            meta = json.loads((out / "metadata.json").read_text())
            tokenizer = load_tokenizer(str(out))
            net = encoder_model.load_model(out, trained_on, torch.device("cpu"))
            for dataset in scored:
                test = pd.read_parquet(processed[dataset] / "test.parquet")
                units = encoder_inputs.InputEncoder(tokenizer, dataset, meta["max_length"]).encode(test)
                logp = encoder_heads.task_log_probs(net.predict(units, 4096), dataset)
                counts = counts_matrix(test)
                h = counts / counts.sum(1, keepdims=True)
                prior = mean_distribution(counts_matrix(pd.read_parquet(processed[dataset] / "train.parquet")))
                beaten[model, dataset] = (
                    float(metrics.xentropy(h, logp).mean()),
                    float(metrics.xentropy(h, np.log(prior)[None].repeat(len(h), 0)).mean()),
                )
    assert all(model < prior for model, prior in beaten.values()), beaten


# ----------------------------------------------------------------------------------------------------- resume


def script(*args):
    return [sys.executable, str(ROOT / "workflow/scripts/train_encoder.py"), *map(str, args)]


@pytest.mark.slow
def test_training_resumes_after_sigkill_with_the_same_predictions(raw_dir, processed, tmp_path):
    from tests.test_resume import kill_when

    raw = small_config(epochs=2, batch_size=8, checkpoint_steps=3)
    # big enough that a step takes a while, so the job can be killed in the middle of its second epoch
    raw["models"]["tiny-roberta"]["build"].update(hidden_size=128, intermediate_size=256, num_layers=2)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = validate(raw)
    base = tmp_path / "base"
    fetch_model.run(cfg, "tiny-roberta", [raw_dir / "anecdotes.tar.gz", raw_dir / "dilemmas.tar.gz"], base)
    data = processed["anecdotes"]

    def train(out, log):
        args = ["--config", config, "--model", "tiny-roberta", "--dataset", "anecdotes", "--data-dir", data]
        return script(*args, "--base", base, "--out", out, "--log", log)

    run(train(tmp_path / "whole", tmp_path / "whole.log"), tmp_path)
    checkpoint = tmp_path / "killed.checkpoints" / "last.pt"

    def mid_second_epoch():
        if not checkpoint.exists():
            return None
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        except Exception:  # being replaced this very moment
            return None
        return state if state["epoch"] == 1 and state["batch"] > 0 else None

    seen = kill_when(train(tmp_path / "killed", tmp_path / "killed.log"), tmp_path, mid_second_epoch, "killed.log")
    assert not (tmp_path / "killed").exists()
    run(train(tmp_path / "killed", tmp_path / "resumed.log"), tmp_path)
    assert "resuming from the checkpoint taken after 1 epoch(s)" in (tmp_path / "resumed.log").read_text()
    whole = json.loads((tmp_path / "whole" / "metadata.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "metadata.json").read_text())
    assert resumed["resumed_from"]["epoch"] == 1 and resumed["resumed_from"]["batch"] >= seen["batch"]
    assert [h["dev_xentropy"] for h in resumed["history"]] == [h["dev_xentropy"] for h in whole["history"]]
    for name in ("whole", "killed"):
        extract.run(
            cfg,
            "tiny-roberta",
            "anecdotes",
            "trained",
            CellInputs(data, base, tmp_path / name),
            tmp_path / f"pred-{name}",
        )
    for split in ("dev", "test"):
        a = pd.read_parquet(tmp_path / "pred-whole" / f"{split}.parquet")
        b = pd.read_parquet(tmp_path / "pred-killed" / f"{split}.parquet")
        pd.testing.assert_frame_equal(a, b, check_exact=True)


# ------------------------------------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_encoders_learn_the_planted_signal(demo_run):
    """Both tiny encoders beat the train prior's test xentropy on both datasets, beside the chat models."""
    table = pd.read_csv(demo_run / "reports/demo/results.csv")
    xent = table[table["metric"] == "xentropy"]
    for dataset in ("anecdotes", "dilemmas"):
        rows = xent[xent["dataset"] == dataset].set_index(["model", "condition"])["value"]
        for model in ("tiny-bert", "tiny-roberta"):
            assert rows[model, "trained"] < rows["train_prior", "reference"], (dataset, model, rows.to_dict())
            assert (model, "base") not in rows.index
        assert ("tiny-llama", "soft") in rows.index  # the same table
    md = (demo_run / "reports/demo/results.md").read_text()
    assert "| tiny-bert | trained |" in md and "| tiny-roberta | trained |" in md
