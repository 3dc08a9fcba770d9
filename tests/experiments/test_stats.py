"""experiments/stats.py against hand computations and scipy's one-sample t as the oracle."""
import itertools
import os
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

import paths  # noqa: E402  (tests/paths.py)
sys.path.insert(0, paths.EXPERIMENTS)
import stats  # noqa: E402


def test_two_way_variance_and_df_by_hand():
  # x = [[1, 0, 1], [0, 0, 1]]: grand mean 1/2, seed means (2/3, 1/3), item means
  # (1/2, 0, 1). MS_seed = 3 * 2 * (1/6)^2 / 1 = 1/6; MS_item = 2 * (0 + 1/4 + 1/4) / 2 = 1/2;
  # residuals +-(1/3, -1/6, -1/6): MS_res = 2 * (1/9 + 2/36) / 2 = 1/6.
  x = np.array([[1, 0, 1], [0, 0, 1]], np.float64)
  ms = stats.mean_squares(x)
  assert ms["seed"] == pytest.approx(1 / 6) and ms["df_seed"] == 1
  assert ms["item"] == pytest.approx(1 / 2) and ms["df_item"] == 2
  assert ms["residual"] == pytest.approx(1 / 6) and ms["df_residual"] == 2
  est = stats.estimate(x)
  # Seed level: MS_seed / (S N) = 1/36 with 1 df; item level: (1/2 - 1/6) / 6 = 1/18, 2 df.
  assert est.mean == 0.5
  assert [v for part in est.parts for v in part] == pytest.approx([1 / 36, 1, 1 / 18, 2])
  mean, (low, high) = stats.mean_ci(x)
  half = np.sqrt(scipy_stats.t.ppf(0.975, 1) ** 2 / 36 + scipy_stats.t.ppf(0.975, 2) ** 2 / 18)
  assert (low, high) == pytest.approx((0.5 - half, 0.5 + half))
  # The p-value is where the interval's edge reaches 0.
  _, (low_at_p, _) = stats.interval(est, 1 - stats.p_value(est))
  assert low_at_p == pytest.approx(0.0, abs=1e-9)


def test_seed_level_case_is_scipys_one_sample_t():
  # Every item of a seed scores the same: no item or residual variance, so the interval is
  # the t interval over the 3 per-seed means (df 2), as scipy computes it.
  per_seed = np.array([0.60, 0.64, 0.59])
  x = np.repeat(per_seed[:, None], 5, axis=1)
  mean, (low, high) = stats.mean_ci(x)
  oracle = scipy_stats.t.interval(0.95, 2, loc=per_seed.mean(), scale=scipy_stats.sem(per_seed))
  assert mean == pytest.approx(per_seed.mean())
  assert (low, high) == pytest.approx(oracle)
  assert stats.p_value(stats.estimate(x)) == pytest.approx(scipy_stats.ttest_1samp(per_seed, 0).pvalue)


def test_one_seed_is_the_t_interval_over_items():
  items = np.array([1, 0, 1, 1, 0, 1, 1, 1], np.float64)
  mean, (low, high) = stats.mean_ci(items)
  oracle = scipy_stats.t.interval(0.95, 7, loc=items.mean(), scale=scipy_stats.sem(items))
  assert (low, high) == pytest.approx(oracle)


def test_paired_difference_is_the_interval_of_the_differences():
  rng = np.random.default_rng(0)
  a = (rng.random((3, 40)) < 0.6).astype(float)
  b = (rng.random((3, 40)) < 0.4).astype(float)
  assert stats.paired_difference_ci(a, b) == stats.mean_ci(a - b)
  base = (rng.random(40) < 0.5).astype(float)  # seed-independent: compared with every seed
  assert stats.paired_difference_ci(a, base) == stats.mean_ci(a - base[None])
  assert stats.paired_difference_p(a, a) == 1.0
  assert stats.paired_difference_ci(a, a) == (0.0, (0.0, 0.0))


def test_unpaired_difference_by_hand():
  # Constant samples: the difference is exact.
  assert stats.unpaired_difference_ci(np.full((2, 5), 0.7), np.full((3, 4), 0.2)) == (
      pytest.approx(0.5), (pytest.approx(0.5), pytest.approx(0.5)))
  # One seed each: each side's t half-width over its entries, added in quadrature.
  a, b = np.array([0.3, 0.1, 0.4, 0.2]), np.array([0.0, -0.1, 0.1, 0.05, -0.2])
  diff, (low, high) = stats.unpaired_difference_ci(a, b)
  half = np.hypot(scipy_stats.t.ppf(0.975, 3) * scipy_stats.sem(a),
                  scipy_stats.t.ppf(0.975, 4) * scipy_stats.sem(b))
  assert diff == pytest.approx(a.mean() - b.mean())
  assert (low, high) == pytest.approx((diff - half, diff + half))


def test_validation():
  with pytest.raises(ValueError, match="same items"):
    stats.paired_difference_ci(np.ones((1, 3)), np.ones((1, 4)))
  with pytest.raises(ValueError, match="same seeds"):
    stats.paired_difference_ci(np.ones((2, 3)), np.ones((3, 3)))
  with pytest.raises(ValueError, match="non-finite"):
    stats.mean_ci([[np.nan, 1.0]])
  with pytest.raises(ValueError, match="p-values"):
    stats.holm([0.5, 1.5])


def test_holm_by_hand():
  # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; the last is
  # raised to 0.06 (step-down: never below an earlier one).
  assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
  assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
  assert stats.holm([0.02]) == pytest.approx([0.02])  # one test: unchanged


def test_variance_components_recover_known_values():
  rng = np.random.default_rng(1)
  s, n = 40, 400
  x = (2.0 * rng.standard_normal((s, 1)) + 1.0 * rng.standard_normal((1, n))
       + 0.5 * rng.standard_normal((s, n)))
  comps = stats.variance_components(x)
  assert comps["seed"] == pytest.approx(4.0, rel=0.5)  # 39 df: a loose check
  assert comps["item"] == pytest.approx(1.0, rel=0.2)
  assert comps["residual"] == pytest.approx(0.25, rel=0.05)


@pytest.mark.parametrize("components, seeds, items", [
    ({"seed": 1.0, "item": 0.0, "residual": 0.0}, 3, 4),   # exactly the t over 3 seeds
    ({"seed": 0.0, "item": 1.0, "residual": 0.0}, 3, 6),   # exactly the t over 6 items
])
def test_coverage_simulation_on_known_variance(components, seeds, items):
  # The interval is an exact t interval here: coverage is 0.95 in expectation; 4,000
  # replicates give a standard error of 0.0034.
  coverage = stats.simulate_coverage(components, seeds, items, replicates=4000, seed=3)
  assert abs(coverage - 0.95) < 0.015


@pytest.mark.parametrize("components, seeds, items", [
    ({"seed": 0.0, "item": 0.004, "residual": 0.08}, 3, 500),    # like CoPD - text expert
    ({"seed": 3e-4, "item": 0.006, "residual": 0.23}, 3, 1500),  # like CoPD - mixed RLVR
    ({"seed": 1.0, "item": 1.0, "residual": 1.0}, 3, 20),
])
def test_coverage_where_both_parts_matter(components, seeds, items):
  # Seeds and items both vary: no exact interval; the quadrature sum must not fall below
  # 0.93 (the pooled Satterthwaite t gave 0.92-0.93 in the first two) nor be far too wide.
  coverage = stats.simulate_coverage(components, seeds, items, replicates=2000, seed=5)
  assert 0.935 <= coverage <= 0.985


def test_percentile_bootstrap_undercovers_with_three_seeds():
  # With the seeds alone varying, a percentile interval lies inside [min, max] of the 3
  # seed means, which covers the true mean with probability 1 - 2 / 2^3 = 0.75.
  coverage = stats.simulate_coverage({"seed": 1.0, "item": 0.0, "residual": 0.0}, 3, 4,
                                     replicates=400, seed=4, method="bootstrap")
  assert coverage <= 0.75 + 0.05


def test_bootstrap_matches_exact_enumeration():
  m = np.array([[1, 0, 1], [0, 0, 1]], np.float64)  # 2 seeds x 3 items
  exact = np.array([m[np.ix_(seeds, items)].mean()
                    for seeds in itertools.product(range(2), repeat=2)
                    for items in itertools.product(range(3), repeat=3)])
  reps = stats.bootstrap_means(m, replicates=40000, seed=1)
  assert abs(reps.mean() - exact.mean()) < 0.005
  assert abs(reps.std() - exact.std()) < 0.005
