"""Check the prior fit, BEST, the Dirichlet score and the reference rows on the real Scruples dev vote counts.

Not a test: it needs the Scruples dev label counts folder, which is not part of this repository: the real v1.0
dev vote counts without text, as allenai/scruples ships them for its BEST estimator, in
`<folder>/scruples-dev-label-counts/{anecdotes,dilemmas}-dev-label-counts.json`.

    python benchmarks/validate_reference.py --reference <folder>

Besides the independent figures of docs/design.md ("Check values") it shows, on the real counts and on demo-like
synthetic counts:

* where BEST is a floor: the oracle that predicts each item's posterior-drawn true distribution p, against the
  same oracle flattened or sharpened (p^(1/T), renormalised). For xentropy T = 1 is the minimum (BEST is a floor);
  for dirichlet with c = 1 a flatter prediction (T > 1) scores lower, so BEST is no floor there;
* the train prior: the mean of the items' distributions against the pooled votes, as a constant predictor of the
  same items (the mean is the xentropy minimiser; the pooled votes are pulled by the few items with many votes).
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.special import log_softmax

from moralign import metrics, references, sample

# Figures of an independent implementation (docs/design.md, "Check values").
EXPECTED = {
    "anecdotes": {"alpha": [0.503, 1.547, 0.193, 0.317, 0.166], "xentropy": 0.734, "accuracy": 0.881},
    "dilemmas": {"alpha": [0.978, 0.949], "xentropy": 0.494, "accuracy": 0.849, "dirichlet_uniform": 3.126},
}
TEMPERATURES = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0)


def oracle_scan(counts: np.ndarray, samples: int, seed: int = 0) -> dict[float, tuple[float, float]]:
    """Mean (xentropy, dirichlet c=1) of the posterior-drawn oracle p^(1/T), per temperature T."""
    alpha = references.fit_dirichlet_prior(counts)
    h = counts / counts.sum(1, keepdims=True)
    rng = np.random.default_rng(seed)
    sums = {t: np.zeros(2) for t in TEMPERATURES}
    for _ in range(samples):
        draw = rng.gamma(alpha[None, :] + counts)
        logp = metrics.log_probs(draw / draw.sum(1, keepdims=True))
        for t in TEMPERATURES:
            logq = log_softmax(logp / t, axis=1)
            sums[t] += (metrics.xentropy(h, logq).mean(), metrics.dirichlet(counts, logq, 1.0).mean())
    return {t: tuple(v / samples) for t, v in sums.items()}


def report_floors(name: str, counts: np.ndarray, samples: int) -> None:
    """Print the oracle scan and the two train-prior variants for one set of counts."""
    scan = oracle_scan(counts, samples)
    best_x, best_d = scan[1.0]
    print(f"  oracle p^(1/T) ({samples} posterior draws); T = 1 is BEST:")
    for t, (x, d) in scan.items():
        print(f"    T = {t:<4} xentropy {x:.4f} ({x - best_x:+.4f})   dirichlet c=1 {d:.4f} ({d - best_d:+.4f})")
    t_x = min(scan, key=lambda t: scan[t][0])
    t_d = min(scan, key=lambda t: scan[t][1])
    print(f"  {name}: xentropy minimal at T = {t_x} (BEST is its floor); dirichlet c=1 minimal at T = {t_d}")
    h = counts / counts.sum(1, keepdims=True)
    for label, q in (
        ("mean of distributions", references.mean_distribution(counts)),
        ("pooled votes", counts.sum(0) / counts.sum()),
    ):
        x = metrics.xentropy(h, metrics.constant_prediction(q, len(h))).mean()
        print(f"  constant {label:<22} {np.round(q, 3).tolist()}  xentropy {x:.4f}")


def demo_like(archive: str, n: int = 200, seed: int = 0) -> np.ndarray:
    """Vote counts of ``n`` synthetic items (moralign.sample, the demo's generator): dilemmas or binary anecdotes."""
    rng = np.random.default_rng(seed)
    if archive == "dilemmas":
        return np.array([sample.dilemma_record(rng)["gold_annotations"] for _ in range(n)])
    rows = [sample.anecdote_record(rng)["binarized_label_scores"] for _ in range(n)]
    counts = np.array([[r["WRONG"], r["RIGHT"]] for r in rows])
    return counts[counts.sum(1) > 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--reference",
        type=Path,
        required=True,
        help="the Scruples dev label counts folder (holding scruples-dev-label-counts/)",
    )
    parser.add_argument("--samples", type=int, default=400)
    args = parser.parse_args()
    folder = args.reference / "scruples-dev-label-counts"
    real = {}
    for name, expected in EXPECTED.items():
        counts = np.array(json.loads((folder / f"{name}-dev-label-counts.json").read_text()))
        real[name] = counts
        t0 = time.perf_counter()
        alpha = references.fit_dirichlet_prior(counts)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        best = references.best_oracle(counts, alpha, samples=args.samples, seed=0, resamples=0)
        best_s = time.perf_counter() - t0
        print(
            f"== {name} dev: {counts.shape[0]} items x {counts.shape[1]} labels "
            f"(fit {fit_s:.2f} s, BEST {args.samples} draws {best_s:.2f} s)"
        )
        print(f"  alpha_hat          {np.round(alpha, 3).tolist()}   expected {expected['alpha']}")
        for metric in ("xentropy", "accuracy", "dirichlet"):
            value, se = best["metrics"][metric]["value"], best["mc_se"][metric]
            print(f"  BEST {metric:<13} {value:.4f} ± {se:.4f} (MC s.e.)   expected ≈ {expected.get(metric, '-')}")
        if "dirichlet_uniform" in expected:
            uniform = metrics.constant_prediction(np.full(counts.shape[1], 1 / counts.shape[1]), len(counts))
            value = metrics.dirichlet(counts, uniform, 1.0).mean()
            print(f"  dirichlet (c=1) of p = uniform   {value:.4f}   expected ≈ {expected['dirichlet_uniform']}")
        report_floors(name, counts, args.samples)
    # The project's binary anecdotes task: WRONG = AUTHOR + EVERYBODY, RIGHT = OTHER + NOBODY, INFO dropped.
    five = real["anecdotes"]
    binary = np.stack([five[:, 0] + five[:, 2], five[:, 1] + five[:, 3]], axis=1)
    binary = binary[binary.sum(1) > 0]
    print(f"== anecdotes (binary WRONG/RIGHT) dev: {len(binary)} items with votes")
    report_floors("anecdotes binary", binary, args.samples)
    for archive in ("dilemmas", "anecdotes"):
        counts = demo_like(archive)
        print(f"== demo-like {archive} (moralign.sample, {len(counts)} items)")
        report_floors(f"demo-like {archive}", counts, args.samples)
    # The bootstrap the table uses: 1,000 resamples of 2,500 items, every metric of a cell.
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 30, size=(2500, 2)) + 1
    logp = np.log(rng.dirichlet(np.ones(2), size=2500))
    t0 = time.perf_counter()
    metrics.summarise(counts, logp, np.ones(2500), None, resamples=1000, seed=0)
    print(
        f"== bootstrap: 1,000 resamples x 2,500 items, all {len(metrics.names())} metrics: "
        f"{time.perf_counter() - t0:.3f} s"
    )


if __name__ == "__main__":
    main()
