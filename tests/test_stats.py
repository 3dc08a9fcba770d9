"""The two-level bootstrap against hand computations on inputs small enough to enumerate."""
import itertools

import numpy as np
import pytest

from copd_jax import stats


def exact_bootstrap(matrix):
  """Every equally likely (seed draw, item draw) of a tiny [S, N] matrix -> its means."""
  m = np.asarray(matrix, np.float64)
  s, n = m.shape
  out = []
  for seeds in itertools.product(range(s), repeat=s):
    for items in itertools.product(range(n), repeat=n):
      out.append(m[np.ix_(seeds, items)].mean())
  return np.array(out)


def test_paired_difference_by_hand():
  # One seed, two items; a - b = [1, 0]. Resampling the two items gives the means
  # 1 (both item 0: p = 1/4), 0.5 (one of each: p = 1/2), 0 (both item 1: p = 1/4).
  a, b = np.array([[1.0, 1.0]]), np.array([[0.0, 1.0]])
  diff, (low, high) = stats.paired_difference_ci(a, b, replicates=20000)
  assert diff == 0.5
  assert (low, high) == (0.0, 1.0)
  reps = stats.bootstrap_means(a - b, replicates=20000)
  for value, p in ((1.0, 0.25), (0.5, 0.5), (0.0, 0.25)):
    assert abs(np.mean(reps == value) - p) < 0.015


def test_bootstrap_matches_exact_enumeration():
  m = np.array([[1, 0, 1], [0, 0, 1]], np.float64)  # 2 seeds x 3 items
  exact = exact_bootstrap(m)  # 4 seed draws x 27 item draws, equally likely
  reps = stats.bootstrap_means(m, replicates=40000, seed=1)
  assert abs(reps.mean() - exact.mean()) < 0.005
  assert abs(reps.std() - exact.std()) < 0.005
  for q in (0.1, 0.5, 0.9):
    assert abs(np.quantile(reps, q) - np.quantile(exact, q)) <= 1 / 6 + 1e-9  # one grid step


def test_pairing_is_tighter_than_marginals():
  rng = np.random.default_rng(0)
  base = (rng.random((3, 500)) < 0.5).astype(float)
  better = np.maximum(base, (rng.random((3, 500)) < 0.1))  # fixes ~10% of items, never worse
  diff, (low, high) = stats.paired_difference_ci(better, base)
  assert 0 < low <= diff <= high
  assert high - low < 0.06  # a marginal interval at N = 1500 is ~0.05 wide on its own


def test_identical_methods_and_constant_differences():
  a = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], np.float64)
  assert stats.paired_difference_ci(a, a) == (0.0, (0.0, 0.0))
  shifted = stats.paired_difference_ci(np.ones((2, 4)), np.zeros((2, 4)))
  assert shifted == (1.0, (1.0, 1.0))


def test_seed_independent_side_broadcasts():
  base = np.array([1, 0, 0, 1], np.float64)  # one shared policy
  expert = np.array([[1, 1, 0, 1], [1, 1, 1, 1]], np.float64)
  diff, _ = stats.paired_difference_ci(expert, base)
  assert diff == pytest.approx(((1 + 0) + (1 + 1)) / 8)  # (expert - base) summed / (2 x 4)


def test_mean_ci_contains_mean_and_validates():
  m = np.array([[1, 0, 1, 0, 1]], np.float64)
  mean, (low, high) = stats.mean_ci(m)
  assert mean == 0.6 and low <= mean <= high
  with pytest.raises(ValueError, match="same items"):
    stats.paired_difference_ci(np.ones((1, 3)), np.ones((1, 4)))
  with pytest.raises(ValueError, match="same seeds"):
    stats.paired_difference_ci(np.ones((2, 3)), np.ones((3, 3)))
  with pytest.raises(ValueError, match="non-finite"):
    stats.mean_ci([[np.nan, 1.0]])


def test_unpaired_difference_by_hand():
  # Constant samples: every replicate's difference is 0.7 - 0.2 exactly.
  diff, (low, high) = stats.unpaired_difference_ci(np.full((2, 5), 0.7), np.full((3, 4), 0.2))
  assert diff == pytest.approx(0.5)
  assert low == pytest.approx(0.5) and high == pytest.approx(0.5)
  # a in {0, 1} (mean 0.5), b = 0.25: a replicate's difference lies in [-0.25, 0.75].
  diff, (low, high) = stats.unpaired_difference_ci([[0.0, 1.0, 0.0, 1.0]], [[0.25, 0.25]])
  assert diff == pytest.approx(0.25)
  assert -0.25 <= low < 0.25 < high <= 0.75
  with pytest.raises(ValueError, match="non-finite"):
    stats.unpaired_difference_ci([[np.nan]], [[0.0]])
