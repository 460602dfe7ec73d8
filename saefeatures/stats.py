"""Uncertainty of the study's headline numbers: percentile bootstrap intervals and null baselines.

A number goes to metrics.json with ``ci.<name>`` (``lower``, ``upper``: a 95% percentile
bootstrap over the units the number is a statistic of, e.g. emotions for valence r) and
``null.<name>`` (``mean``, ``p05``, ``p95`` of the number under a null, e.g. shuffled valence
labels, and ``percentile``: where the observed value falls in that null, 0-100). Seeds are fixed,
so a rerun writes the same intervals.

Example:
    >>> x = np.arange(20.0); y = x + np.random.default_rng(0).normal(size=20)
    >>> bootstrap(lambda i: np.corrcoef(x[i], y[i])[0, 1], 20)       # {'lower': ..., 'upper': ...}
    >>> null_summary(0.9, permuted(lambda p: np.corrcoef(x, y[p])[0, 1], 20))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
from scipy.stats import percentileofscore

N_RESAMPLES = 1000
"""Bootstrap resamples and null draws per number."""
SEED = 0
LEVEL = 0.95
EXACT_UP_TO = 40320
"""A null over at most this many orders (8!) enumerates them all instead of drawing."""


def bootstrap(stat: Callable[[np.ndarray], float], n: int, n_boot: int = N_RESAMPLES, seed: int = SEED,
              level: float = LEVEL) -> dict[str, float] | None:
    """Percentile interval of ``stat(idx)`` over ``n_boot`` resamples ``idx`` of ``range(n)`` drawn
    with replacement; resamples whose statistic is undefined (NaN) are left out. None when fewer
    than half of them are defined."""
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=float)
    return interval(values, n_boot, level)


def interval(values: np.ndarray, n_boot: int, level: float = LEVEL) -> dict[str, float] | None:
    """``{'lower', 'upper', 'n_boot'}``: the central ``level`` of the defined ``values``."""
    values = values[np.isfinite(values)]
    if len(values) < max(2, n_boot // 2):
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return {"lower": float(lo), "upper": float(hi), "n_boot": float(len(values))}


def permutations(n: int, n_perm: int = N_RESAMPLES, seed: int = SEED) -> Iterator[np.ndarray]:
    """Every permutation of ``range(n)`` when there are at most `EXACT_UP_TO` (an exact null, e.g.
    the 5,040 orders of 7 doses), else ``n_perm`` random ones."""
    if math.factorial(n) <= EXACT_UP_TO:
        for p in itertools.permutations(range(n)):
            yield np.array(p)
        return
    rng = np.random.default_rng(seed)
    for _ in range(n_perm):
        yield rng.permutation(n)


def permuted(stat: Callable[[np.ndarray], float], n: int, n_perm: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``stat(perm)`` for each permutation of `permutations`: the statistic with labels shuffled."""
    return np.array([stat(p) for p in permutations(n, n_perm, seed)], dtype=float)


def null_summary(observed: float, null: np.ndarray) -> dict[str, float] | None:
    """``{'mean', 'p05', 'p95', 'percentile', 'n_null'}`` of a null distribution and where
    ``observed`` falls in it (ties count half); None when the null or the observation is undefined."""
    null = null[np.isfinite(null)]
    if len(null) < 2 or observed is None or not math.isfinite(observed):
        return None
    p05, p95 = np.percentile(null, [5, 95])
    at = percentileofscore(np.round(null, 10), round(observed, 10), kind="mean")  # float noise is no rank
    return {"mean": float(null.mean()), "p05": float(p05), "p95": float(p95), "percentile": float(at),
            "n_null": float(len(null))}


def group_difference(a: np.ndarray, b: np.ndarray, wa: np.ndarray | None = None, wb: np.ndarray | None = None,
                     n_boot: int = N_RESAMPLES, seed: int = SEED) -> tuple[float, dict | None, dict | None]:
    """Weighted mean of ``b`` minus that of ``a`` (weights default to 1), its bootstrap interval
    (each group resampled on its own) and its permutation null (group labels shuffled)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    wa = np.ones_like(a) if wa is None else np.asarray(wa, float)
    wb = np.ones_like(b) if wb is None else np.asarray(wb, float)
    if len(a) < 2 or len(b) < 2 or wa.sum() <= 0 or wb.sum() <= 0:
        return float("nan"), None, None

    def mean(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # rows of resampled indices -> weighted means
        ws = w.sum(-1)
        return np.where(ws > 0, (x * w).sum(-1) / np.where(ws > 0, ws, 1), np.nan)

    observed = float(mean(b, wb) - mean(a, wa))
    rng = np.random.default_rng(seed)
    ia, ib = rng.integers(0, len(a), (n_boot, len(a))), rng.integers(0, len(b), (n_boot, len(b)))
    ci = interval(mean(b[ib], wb[ib]) - mean(a[ia], wa[ia]), n_boot)
    x, w = np.concatenate([a, b]), np.concatenate([wa, wb])
    perm = np.argsort(rng.random((n_boot, len(x))), axis=1)
    null = mean(x[perm[:, len(a):]], w[perm[:, len(a):]]) - mean(x[perm[:, :len(a)]], w[perm[:, :len(a)]])
    return observed, ci, null_summary(observed, null)
