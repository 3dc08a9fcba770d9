"""Intervals for held-out accuracy over seeds and eval items (a two-level bootstrap).

Every method is evaluated on the SAME held-out items, once per training seed, so a result is
a 0/1 matrix rewards[seed, item]. Two sources of noise matter: which seeds were run and
which items were drawn. The bootstrap resamples both, seeds and items independently with
replacement, and keeps the pairing: a replicate uses the same resampled items for every
seed and, in a paired comparison, for both methods. That is what makes a paired difference
much tighter than the two marginal intervals.

    mean, (low, high) = mean_ci(rewards)                  # rewards f32[S, N]
    diff, (low, high) = paired_difference_ci(a, b)        # a, b f32[S, N] (or b f32[N])
    diff, (low, high) = unpaired_difference_ci(a, b)      # a f32[S, Na], b f32[S, Nb]
"""
from __future__ import annotations

import numpy as np

DEFAULT_REPLICATES = 4000


def _as_matrix(x, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim == 1:
    x = x[None]
  if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
    raise ValueError(f"{name} must be f32[seeds, items] (or f32[items]) with at least one "
                     f"entry, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} holds non-finite values")
  return x


def bootstrap_means(matrix, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> np.ndarray:
  """f64[replicates]: the mean of `matrix` [S, N] over seeds and items drawn with
  replacement (S seeds and N items per replicate, items shared across seeds)."""
  m = _as_matrix(matrix, "matrix")
  s, n = m.shape
  rng = np.random.default_rng(seed)
  # A replicate's mean = sum_{s,n} count_s * count_n * m[s, n] / (S * N), where count_* are
  # how often each seed / item was drawn: multinomial counts, no [B, S, N] tensor needed.
  seed_counts = rng.multinomial(s, np.full(s, 1.0 / s), size=replicates)
  item_counts = rng.multinomial(n, np.full(n, 1.0 / n), size=replicates)
  return np.einsum("bs,sn,bn->b", seed_counts, m, item_counts) / (s * n)


def _interval(point: float, replicates: np.ndarray, level: float) -> tuple[float, tuple[float, float]]:
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(replicates, [tail, 1.0 - tail])
  return float(point), (float(low), float(high))


def mean_ci(rewards, level: float = 0.95, replicates: int = DEFAULT_REPLICATES,
            seed: int = 0) -> tuple[float, tuple[float, float]]:
  """(mean, (low, high)): the mean of rewards [S, N] and its percentile bootstrap interval."""
  m = _as_matrix(rewards, "rewards")
  return _interval(m.mean(), bootstrap_means(m, replicates, seed), level)


def paired_difference_ci(a, b, level: float = 0.95, replicates: int = DEFAULT_REPLICATES,
                         seed: int = 0) -> tuple[float, tuple[float, float]]:
  """(mean(a - b), (low, high)) for two methods on the same items.

  a, b: f32[S, N] per seed and item, or f32[N] for a policy that does not depend on the
  seed (the shared base), which is then compared with every seed of the other. Seeds pair
  by position: seed s of a with seed s of b, so both methods must have run the same seeds.
  """
  a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"a and b must be scored on the same items, got {a.shape[1]} and "
                     f"{b.shape[1]} items")
  if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
    raise ValueError(f"a and b must have the same seeds (or one must be seed-independent), "
                     f"got {a.shape[0]} and {b.shape[0]}")
  diff = a - b  # broadcasts a seed-independent side over the other's seeds
  return _interval(diff.mean(), bootstrap_means(diff, replicates, seed), level)


def unpaired_difference_ci(a, b, level: float = 0.95, replicates: int = DEFAULT_REPLICATES
                           ) -> tuple[float, tuple[float, float]]:
  """(mean(a) - mean(b), (low, high)) for two samples with nothing to pair them on (for
  example, measurements from different training steps): a f32[Sa, Na], b f32[Sb, Nb], each
  mean bootstrapped over its own seeds and entries, independently of the other."""
  a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
  replicated = bootstrap_means(a, replicates, seed=1) - bootstrap_means(b, replicates, seed=2)
  return _interval(a.mean() - b.mean(), replicated, level)
