"""Bootstrap intervals and null baselines (`saefeatures.stats`): coverage, determinism, exact nulls."""

import math

import numpy as np
import pytest

from saefeatures.stats import bootstrap, group_difference, null_summary, permutations, permuted


def test_bootstrap_interval_covers_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(1)
    x = rng.normal(size=60)
    y = 0.6 * x + rng.normal(size=60)
    r = np.corrcoef(x, y)[0, 1]
    ci = bootstrap(lambda i: np.corrcoef(x[i], y[i])[0, 1], 60)
    assert ci["lower"] < r < ci["upper"] and 0 < ci["lower"] and ci["upper"] < 1 and ci["n_boot"] == 1000
    assert bootstrap(lambda i: np.corrcoef(x[i], y[i])[0, 1], 60) == ci  # fixed seed
    assert bootstrap(lambda i: np.corrcoef(x[i], y[i])[0, 1], 60, seed=5) != ci
    assert bootstrap(lambda i: float("nan"), 10) is None  # undefined everywhere: no interval


def test_permutations_are_exact_when_few_and_random_when_many():
    orders = list(permutations(4))
    assert len(orders) == 24 and len({tuple(o) for o in orders}) == 24
    many = list(permutations(9, n_perm=50))  # 9! orders: too many to enumerate
    assert len(many) == 50 and all(sorted(o) == list(range(9)) for o in many)


def test_null_summary_places_the_observation():
    null = np.arange(100.0)
    s = null_summary(95.0, null)
    assert s["percentile"] == pytest.approx(95.5) and s["p95"] == pytest.approx(94.05) and s["mean"] == 49.5
    assert null_summary(float("nan"), null) is None and null_summary(1.0, np.array([np.nan])) is None
    # a perfect Spearman of 5 points sits at the top of its exact null, which has 1 / 120 orders as extreme
    ranks = np.arange(5.0)
    rho = permuted(lambda p: np.corrcoef(ranks, ranks[p])[0, 1], 5)
    assert len(rho) == 120 and null_summary(rho[0], rho)["percentile"] == pytest.approx(100 - 50 / 120)


def test_group_difference_weights_interval_and_null():
    a, b = np.array([1.0, 2.0, 3.0, 2.0]), np.array([4.0, 5.0, 6.0, 5.0])
    diff, ci, null = group_difference(a, b)
    assert diff == 3.0 and ci["lower"] <= 3.0 <= ci["upper"] and null["percentile"] > 95
    diff_w, _, _ = group_difference(a, b, wa=np.array([0, 0, 1, 0.0]), wb=np.ones(4))
    assert diff_w == pytest.approx(5.0 - 3.0)  # only a's third value counts
    same, ci, null = group_difference(a, a.copy())
    assert same == 0 and ci["lower"] <= 0 <= ci["upper"] and 5 < null["percentile"] < 95
    assert math.isnan(group_difference(a[:1], b)[0])
