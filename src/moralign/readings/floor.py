"""The sampling floor: how close N draws from the human distribution itself come to it, on average.

A reading built from N sampled answers is an empirical distribution, so even a model that samples exactly the
human distribution h is off by sampling noise. The floor is the exact expectation of that error in total
variation: the counts of N draws from h are multinomial, and

    E[TV] = 1/2 sum_j E|C_j / N - h_j|,   C_j ~ Binomial(N, h_j)

by linearity of expectation (each choice's count is binomial on its own). Each term is a finite sum over
k = 0..N, so the floor is exact (no Monte Carlo), per item. No reading of N samples beats it on average.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom


def sampling_floor(h: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """Per-item expected total variation between ``h`` (items x choices) and the shares of ``n`` draws from it.

    ``n`` is one number of draws for every item, or one per item (e.g. each item's valid draws). An item with
    n = 0 has no empirical distribution: its floor is NaN.
    """
    h = np.asarray(h, dtype=float)
    if h.ndim != 2:
        raise ValueError(f"h must be items x choices, not shape {h.shape}")
    if np.any(h < 0) or not np.allclose(h.sum(axis=1), 1.0, atol=1e-9):
        raise ValueError("every row of h must be a distribution (non-negative, summing to 1)")
    n_items = np.broadcast_to(np.asarray(n), (h.shape[0],)).astype(int)
    if np.any(n_items < 0):
        raise ValueError("the number of draws cannot be negative")
    floor = np.full(h.shape[0], np.nan)
    for size in np.unique(n_items[n_items > 0]):
        rows = n_items == size
        k = np.arange(size + 1)[None, None, :]
        pmf = binom.pmf(k, size, h[rows][:, :, None])
        mad = (pmf * np.abs(k / size - h[rows][:, :, None])).sum(axis=2)
        floor[rows] = 0.5 * mad.sum(axis=1)
    return floor
