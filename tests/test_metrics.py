import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import log_softmax, softmax
from scipy.stats import dirichlet_multinomial

from moralign import metrics, references


def test_scruples_check_values():
    # allenai/scruples tests: the model outputs log-alphas directly
    nll = metrics.dirichlet_multinomial_nll(np.array([[0.5, 0.5]]), np.array([[0.0, 0.0]]))
    assert nll.mean() == pytest.approx(0.9347116558304358, abs=1e-12)
    nll = metrics.dirichlet_multinomial_nll(
        np.array([[0.3, 0.7], [0.6, 0.4]]), np.array([[0.0, 0.0], [math.log(0.5), math.log(2.0)]])
    )
    assert nll.mean() == pytest.approx(1.1093992405423625, abs=1e-12)
    assert metrics.xentropy(np.array([[0.5, 0.5]]), log_softmax(np.zeros((1, 2)), axis=1)).mean() == pytest.approx(
        0.6931471805599453, abs=1e-12
    )


def test_dirichlet_matches_scipy_up_to_the_multinomial_coefficient():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 9, size=(50, 5))
    counts[:, 0] += 1
    p = rng.dirichlet(np.ones(5), size=50)
    for c in (1.0, 3.7):
        ours = metrics.dirichlet(counts, np.log(p), c)
        n = counts.sum(1)
        # scipy's pmf includes log N! - sum log y_j!, which Scruples' form leaves out
        log_coef = np.array(
            [math.lgamma(k + 1) - sum(math.lgamma(y + 1) for y in row) for k, row in zip(n, counts, strict=False)]
        )
        theirs = np.array(
            [-dirichlet_multinomial.logpmf(row, c * pi, k) for row, pi, k in zip(counts, p, n, strict=False)]
        )
        np.testing.assert_allclose(ours, theirs + log_coef, rtol=1e-10)


def test_xentropy_against_a_direct_loop_and_zero_votes():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 5, size=(40, 3))
    counts[:, 1] += 1
    p = rng.dirichlet(np.ones(3), size=40)
    h = counts / counts.sum(1, keepdims=True)
    loop = [-sum(h[i, j] * math.log(p[i, j]) for j in range(3) if h[i, j] > 0) for i in range(40)]
    np.testing.assert_allclose(metrics.xentropy(h, np.log(p)), loop, rtol=1e-12)
    # a choice nobody voted for may get p = 0 without making the item infinite; a voted one may not
    assert metrics.xentropy(np.array([[1.0, 0.0]]), metrics.log_probs(np.array([[1.0, 0.0]])))[0] == 0.0
    assert np.isinf(metrics.xentropy(np.array([[0.5, 0.5]]), metrics.log_probs(np.array([[1.0, 0.0]])))[0])


def test_paper_xentropy_of_uniform_is_ln2_and_it_is_not_xentropy():
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 6, size=(100, 2)) + 1
    h = counts / counts.sum(1, keepdims=True)
    uniform = metrics.constant_prediction(np.array([0.5, 0.5]), 100)
    assert metrics.paper_xentropy(h, uniform).mean() == pytest.approx(math.log(2), abs=1e-12)
    confident = np.log(np.tile([0.99, 0.01], (100, 1)))
    # softmaxing probabilities squashes them toward uniform: the paper's metric cannot see overconfidence
    assert metrics.paper_xentropy(h, confident).mean() < 0.9 < metrics.xentropy(h, confident).mean()


def test_distances_and_invariances():
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 7, size=(60, 4)) + 1
    h = counts / counts.sum(1, keepdims=True)
    logp = np.log(rng.dirichlet(np.ones(4), size=60))
    assert np.allclose(metrics.total_variation(h, np.log(h)), 0) and np.allclose(
        metrics.jensen_shannon(h, np.log(h)), 0
    )
    assert (metrics.jensen_shannon(h, logp) <= 1 + 1e-12).all()
    order, perm = rng.permutation(60), rng.permutation(4)
    base = metrics.summarise(counts, logp, np.ones(60), None, resamples=0)
    shuffled = metrics.summarise(counts[order][:, perm], logp[order][:, perm], np.ones(60), None, resamples=0)
    for name, e in base["metrics"].items():
        assert shuffled["metrics"][name]["value"] == pytest.approx(e["value"], rel=1e-10), name


def test_accuracy_and_macro_f1_exclude_ties():
    counts = np.array([[3, 1], [1, 3], [2, 2], [5, 0]])
    logp = np.log(np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.6, 0.4]]))
    res = metrics.summarise(counts, logp, np.ones(4), None, resamples=0)
    assert res["n_ties"] == 1
    assert res["metrics"]["accuracy"]["value"] == pytest.approx(2 / 3)
    # class 0: tp 2, fp 1, fn 0 -> 0.8; class 1: tp 0, fn 1 -> 0
    assert res["metrics"]["macro_f1"]["value"] == pytest.approx(0.4)


def test_temperature_and_concentration_are_recovered():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(4000, 2)) * 2
    true = softmax(logits, axis=1)
    counts = np.array([rng.multinomial(50, p) for p in true])
    sharpened = log_softmax(logits * 2.0, axis=1)  # a model twice as confident as the truth
    h = counts / counts.sum(1, keepdims=True)
    assert metrics.fit_temperature(h, sharpened) == pytest.approx(2.0, rel=0.1)
    # votes drawn from Dirichlet(c * p) with c = 4: the MLE of c should find it
    c_true = 4.0
    p = np.tile([0.7, 0.3], (6000, 1))
    draws = np.array([rng.multinomial(20, rng.dirichlet(c_true * row)) for row in p])
    assert metrics.fit_concentration(draws, np.log(p)) == pytest.approx(c_true, rel=0.15)


BOOTSTRAP_CASE = """
import json, sys
import numpy as np
from moralign import metrics
rng = np.random.default_rng(5)
counts = rng.integers(0, 9, size=(2500, 2)) + 1
logp = np.log(rng.dirichlet(np.ones(2), size=2500))
res = metrics.summarise(counts, logp, np.ones(2500), None, resamples=1000, seed=int(sys.argv[1]))
print(json.dumps(res["metrics"]))
"""


def _bootstrap_case(seed):
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 9, size=(2500, 2)) + 1
    logp = np.log(rng.dirichlet(np.ones(2), size=2500))
    return metrics.summarise(counts, logp, np.ones(2500), None, resamples=1000, seed=seed)["metrics"]


def test_bootstrap_is_seeded_and_brackets_the_value():
    other = _bootstrap_case(seed=2)  # run first: what ran before must not matter
    here = _bootstrap_case(seed=1)
    # the same seed in a separate process, with nothing else run before it, gives the same intervals exactly
    proc = subprocess.run(
        [sys.executable, "-c", BOOTSTRAP_CASE, "1"], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(proc.stdout) == json.loads(json.dumps(here))
    # a different seed resamples different items: every interval moves, the point values do not
    for name, e in here.items():
        assert e["low"] <= e["value"] <= e["high"], name
        assert other[name]["value"] == e["value"], name
        if name != "coverage":  # constant per item: every resample gives the same mean
            assert (other[name]["low"], other[name]["high"]) != (e["low"], e["high"]), name
    diff = metrics.paired_difference(np.zeros(500), np.full(500, 0.1) + np.random.default_rng(5).normal(0, 0.01, 500))
    assert diff["low"] > 0.09 and diff["high"] < 0.11


def test_best_recovers_a_known_prior_and_beats_everything():
    rng = np.random.default_rng(6)
    alpha = np.array([0.5, 1.5, 0.2])
    n = rng.integers(3, 40, size=4000)
    counts = np.array([rng.multinomial(k, rng.dirichlet(alpha)) for k in n])
    fitted = references.fit_dirichlet_prior(counts)
    np.testing.assert_allclose(fitted, alpha, rtol=0.12)
    best = references.best_oracle(counts, fitted, samples=200, seed=0, resamples=0)
    assert max(best["mc_se"].values()) < 1e-3
    prior = metrics.constant_prediction(references.mean_distribution(counts), len(counts))
    h = counts / counts.sum(1, keepdims=True)
    assert best["metrics"]["xentropy"]["value"] < metrics.xentropy(h, prior).mean()


def test_paired_macro_f1_difference():
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 6, size=(400, 2)) + 1
    h = counts / counts.sum(1, keepdims=True)
    noisy = np.log(rng.dirichlet(np.ones(2), size=400))
    same = metrics.paired_set_difference("macro_f1", counts, noisy, noisy, resamples=200)
    assert same == {"value": 0.0, "low": 0.0, "high": 0.0}
    better = metrics.paired_set_difference("macro_f1", counts, noisy, np.log(np.clip(h, 1e-3, 1)), resamples=200)
    assert better["low"] > 0


def test_a_predicted_tie_splits_the_credit_whatever_the_choice_order():
    # human majorities 0, 1, 0 and a tied human majority (excluded); every prediction a 2-way tie
    counts = np.array([[3, 1], [1, 3], [4, 1], [2, 2]])
    uniform = metrics.constant_prediction(np.array([0.5, 0.5]), 4)
    res = metrics.summarise(counts, uniform, np.ones(4), None, resamples=0)
    assert res["metrics"]["accuracy"]["value"] == pytest.approx(0.5)  # argmax would give class 0: 2/3
    # half a prediction of each class per item: class 0 tp 1, fp .5, fn 1; class 1 tp .5, fp 1, fn .5
    f1 = (2 * 1 / (2 * 1 + 0.5 + 1) + 2 * 0.5 / (2 * 0.5 + 1 + 0.5)) / 2
    assert res["metrics"]["macro_f1"]["value"] == pytest.approx(f1)
    # a 3-way task with ties among the top two: reordering the choices changes nothing
    rng = np.random.default_rng(8)
    counts = rng.integers(0, 6, size=(300, 3)) + 1
    p = rng.dirichlet(np.ones(3), size=300)
    p[::3] = [0.4, 0.4, 0.2]
    p[1::3] = [0.2, 0.4, 0.4]
    base = metrics.summarise(counts, np.log(p), np.ones(300), None, resamples=0)
    for perm in ([1, 0, 2], [2, 1, 0]):
        moved = metrics.summarise(counts[:, perm], np.log(p[:, perm]), np.ones(300), None, resamples=0)
        for name in ("accuracy", "macro_f1"):
            assert moved["metrics"][name]["value"] == pytest.approx(base["metrics"][name]["value"]), (perm, name)
    # the bootstrap replicates use the same rule as the value: one resample of every item once is the value
    shares, labels = metrics.predicted_shares(np.log(p)), metrics.majority_labels(counts)
    assert metrics.macro_f1(shares, labels, np.arange(300)[None, :])[0] == pytest.approx(
        float(metrics.macro_f1(shares, labels))
    )


@pytest.mark.parametrize(
    ("p", "coverage", "reason"),
    [
        ([np.nan, 0.5], 1.0, "NaN"),
        ([0.5, 0.4], 1.0, "not a distribution"),
        ([np.inf, 0.0], 1.0, "p > 1"),
        ([1.0, 0.0], 1.0, "p = 0 to a choice annotators voted for"),
        ([0.5, 0.5], np.nan, "coverage"),
    ],
)
def test_a_bad_prediction_is_an_error_naming_the_item(p, coverage, reason):
    counts = np.array([[3, 1], [1, 3], [2, 5], [4, 4]])
    probs = np.array([[0.7, 0.3], [0.2, 0.8], p, [0.5, 0.5]])
    cov = np.array([0.9, 0.8, coverage, 0.7])
    ids = ["a1", "b2", "c3", "d4"]
    with np.errstate(invalid="ignore", divide="ignore"):
        logp = np.log(probs)
    with pytest.raises(ValueError, match=rf"1 item\(s\).*{reason}.*'c3'"):
        metrics.summarise(counts, logp, cov, None, resamples=10, ids=ids)
    with pytest.raises(ValueError, match="row 2"):  # without ids the row is named
        metrics.per_item_metrics(counts, logp, cov, 1.0, 1.0)
    if reason != "coverage":
        with pytest.raises(ValueError, match="row 2"):  # dev predictions are checked before T and c are fitted
            metrics.fit_on_dev((counts, logp))


def test_p_zero_on_a_choice_nobody_voted_for_is_finite_everywhere():
    counts = np.array([[3, 0], [2, 2], [0, 5]])
    logp = metrics.log_probs(np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]))
    items = metrics.per_item_metrics(counts, logp, np.ones(3), 1.3, 2.0)
    for name, values in items.items():
        assert np.isfinite(values[[0, 2]]).all(), name
    # Γ(1 + 3) / Γ(1) / (Γ(1 + 3) / Γ(1)) = 1: the unanimous item predicted exactly has likelihood 1
    assert items["dirichlet"][0] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(items["accuracy"][1])  # the tied human majority, excluded and counted
    res = metrics.summarise(counts, logp, np.ones(3), None, resamples=0)
    assert res["n_ties"] == 1 and res["metrics"]["accuracy"]["value"] == 1.0


def test_a_paired_difference_never_drops_an_item_silently():
    a, b = np.array([0.1, np.nan, 0.3]), np.array([0.2, np.nan, 0.5])
    assert metrics.paired_difference(a, b, resamples=0)["value"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="NaN on different items"):
        metrics.paired_difference(a, np.array([0.2, 0.4, np.nan]), resamples=0)


def test_train_prior_is_the_mean_distribution_the_best_constant_under_xentropy():
    rng = np.random.default_rng(9)
    # heavy-tailed vote totals: a few big items vote differently from the many small ones
    small = np.array([rng.multinomial(5, [0.8, 0.2]) for _ in range(300)])
    big = np.array([rng.multinomial(3000, [0.2, 0.8]) for _ in range(3)])
    train = np.vstack([small, big])
    h = train / train.sum(1, keepdims=True)
    prior = references.mean_distribution(train)
    np.testing.assert_allclose(prior, h.mean(0))
    rows = references.reference_rows(train, train, train, {"bootstrap_resamples": 0, "seed": 0, "best_samples": 2})
    np.testing.assert_allclose(rows["train_prior"]["prediction"], prior)
    pooled = train.sum(0) / train.sum()
    assert pooled[1] > 0.5 > prior[1]  # the pooled votes are dominated by three items

    def xent(q):
        return metrics.xentropy(h, metrics.constant_prediction(np.asarray(q), len(h))).mean()

    assert rows["train_prior"]["metrics"]["xentropy"]["value"] == pytest.approx(xent(prior))
    step = np.array([0.01, -0.01])
    for q in (pooled, prior + step, prior - step):
        assert xent(prior) < xent(q)


def test_best_is_a_floor_for_xentropy_but_not_for_dirichlet_with_c_1():
    """Predicting each item's true distribution is optimal for xentropy only (why figures draw BEST there only)."""
    rng = np.random.default_rng(10)
    alpha = np.array([0.98, 0.95])  # about the prior of the real dilemmas dev votes, 5 votes per item
    true = rng.dirichlet(alpha, size=3000)
    counts = np.array([rng.multinomial(5, p) for p in true])
    h = counts / counts.sum(1, keepdims=True)
    scores = {}
    for t in (0.7, 1.0, 1.5):
        logq = log_softmax(np.log(true) / t, axis=1)  # the oracle, sharpened (t < 1) or flattened (t > 1)
        scores[t] = (metrics.xentropy(h, logq).mean(), metrics.dirichlet(counts, logq, 1.0).mean())
    assert scores[1.0][0] < min(scores[0.7][0], scores[1.5][0])
    assert scores[1.5][1] < scores[1.0][1] - 0.01  # a flattened oracle beats BEST
    assert "xentropy" in metrics.best_floors() and "dirichlet" not in metrics.best_floors()
