import math

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


def test_bootstrap_is_seeded_and_brackets_the_value():
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 9, size=(2500, 2)) + 1
    logp = np.log(rng.dirichlet(np.ones(2), size=2500))
    a = metrics.summarise(counts, logp, np.ones(2500), None, resamples=1000, seed=1)
    b = metrics.summarise(counts, logp, np.ones(2500), None, resamples=1000, seed=1)
    for name, e in a["metrics"].items():
        assert e == b["metrics"][name]
        assert e["low"] <= e["value"] <= e["high"], name
    diff = metrics.paired_difference(np.zeros(500), np.full(500, 0.1) + rng.normal(0, 0.01, 500))
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
    prior = metrics.constant_prediction(references.vote_marginal(counts), len(counts))
    h = counts / counts.sum(1, keepdims=True)
    assert best["metrics"]["xentropy"]["value"] < metrics.xentropy(h, prior).mean()


def test_paired_macro_f1_difference():
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 6, size=(400, 2)) + 1
    h = counts / counts.sum(1, keepdims=True)
    noisy = np.log(rng.dirichlet(np.ones(2), size=400))
    same = metrics.paired_macro_f1_difference(counts, noisy, noisy, resamples=200)
    assert same == {"value": 0.0, "low": 0.0, "high": 0.0}
    better = metrics.paired_macro_f1_difference(counts, noisy, np.log(np.clip(h, 1e-3, 1)), resamples=200)
    assert better["low"] > 0
