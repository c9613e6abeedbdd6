"""Check the prior fit, BEST and the Dirichlet score on the real Scruples dev vote counts.

Not a test: it reads ../shared/reference/ (the Scruples dev label counts), which users do not have.

    python benchmarks/validate_reference.py [--reference ../shared/reference]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from moralign import metrics, references

# Figures of an independent implementation (design.md §5).
EXPECTED = {
    "anecdotes": {"alpha": [0.503, 1.547, 0.193, 0.317, 0.166], "xentropy": 0.734, "accuracy": 0.881},
    "dilemmas": {"alpha": [0.978, 0.949], "xentropy": 0.494, "accuracy": 0.849, "dirichlet_uniform": 3.126},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=Path(__file__).resolve().parents[2] / "shared/reference")
    parser.add_argument("--samples", type=int, default=400)
    args = parser.parse_args()
    folder = args.reference / "scruples-dev-label-counts"
    for name, expected in EXPECTED.items():
        counts = np.array(json.loads((folder / f"{name}-dev-label-counts.json").read_text()))
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
        for metric in ("xentropy", "accuracy"):
            value, se = best["metrics"][metric]["value"], best["mc_se"][metric]
            print(f"  BEST {metric:<13} {value:.4f} ± {se:.4f} (MC s.e.)   expected ≈ {expected[metric]}")
        if "dirichlet_uniform" in expected:
            uniform = metrics.constant_prediction(np.full(counts.shape[1], 1 / counts.shape[1]), len(counts))
            value = metrics.dirichlet(counts, uniform, 1.0).mean()
            print(f"  dirichlet (c=1) of p = uniform   {value:.4f}   expected ≈ {expected['dirichlet_uniform']}")
    # The bootstrap the table uses: 1,000 resamples of 2,500 items, every metric of a cell.
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 30, size=(2500, 2)) + 1
    logp = np.log(rng.dirichlet(np.ones(2), size=2500))
    t0 = time.perf_counter()
    metrics.summarise(counts, logp, np.ones(2500), None, resamples=1000, seed=0)
    print(
        f"== bootstrap: 1,000 resamples x 2,500 items, all {len(metrics.METRICS)} metrics: "
        f"{time.perf_counter() - t0:.3f} s"
    )


if __name__ == "__main__":
    main()
