"""Intervals for held-out accuracy over a few training seeds and many eval items.

Every method is evaluated on the SAME held-out items, once per training seed, so a result is
a 0/1 matrix rewards[seed, item]. Its mean varies with which seeds were run and which items
were drawn. With 3 seeds a bootstrap cannot see the seed noise properly: a percentile
interval never reaches past the most extreme seed, and nominal 95% intervals covered only
80-85% in simulation. The intervals here come from a two-way random-effects model (seeds x
items; for a paired comparison, of the per-item differences):

    x[s, n] = mu + seed[s] + item[n] + residual[s, n]
    Var(mean) = s2_seed / S + s2_item / N + s2_residual / (S N)
              = MS_seed / (S N)  +  (MS_item - MS_residual) / (S N)
                '-- seed level --'  '------- item level --------'

with the balanced-ANOVA mean squares. The seed-level part is the variance of the mean of
the S per-seed means (seed and residual noise), estimated with S - 1 degrees of freedom:
alone it gives the seed-level t interval over per-seed means. The item-level part is the
items' own spread (clipped at 0), estimated with N - 1. Each part gets its own t quantile
and the half-widths add in quadrature:

    half-width = sqrt(t_{S-1}^2 * MS_seed / (S N) + t_{N-1}^2 * max(0, MS_item - MS_res) / (S N))

With one seed (a seed-independent policy, the shared base) it is the t interval over items.
A pooled Satterthwaite t was tried first: its simulated coverage fell to 0.92-0.93 where
the seed part is small and noisy; this one stays at 0.95-0.97 on the comparisons here.

    mean, (low, high) = mean_ci(rewards)                  # rewards f[S, N]
    diff, (low, high) = paired_difference_ci(a, b)        # a, b f[S, N] (or b f[N])
    diff, (low, high) = unpaired_difference_ci(a, b)      # a f[Sa, Na], b f[Sb, Nb]
    p = paired_difference_p(a, b)                         # two-sided, H0: no difference
    adjusted = holm(p_values)                             # Holm's step-down adjustment
    coverage = simulate_coverage(components, S, N)        # of nominal 95% intervals

The two-level percentile bootstrap the project used before stays here
(`bootstrap_mean_ci`) for comparison in the coverage simulation.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import optimize
from scipy import stats as scipy_stats

INTERVAL_METHOD = ("seed-level t interval (S - 1 df) over per-seed means, with the items' own "
                   "variance added in quadrature (t, N - 1 df): two-way random effects, "
                   "seeds x items")
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


# ------------------------------------------------------------------ the t interval

@dataclasses.dataclass(frozen=True)
class Estimate:
  """A mean and the independent parts of its variance, each (variance, degrees of
  freedom); an interval gives each part its own t quantile."""
  mean: float
  parts: tuple[tuple[float, float], ...]

  @property
  def variance(self) -> float:
    return float(sum(v for v, _ in self.parts))

  def half_width(self, level: float) -> float:
    q = 0.5 + level / 2
    return float(np.sqrt(sum(scipy_stats.t.ppf(q, df) ** 2 * v for v, df in self.parts if v > 0)))


def mean_squares(matrix) -> dict:
  """The two-way ANOVA mean squares of x f[S, N] (S, N >= 2): seed, item, residual, each
  with its degrees of freedom."""
  m = _as_matrix(matrix, "matrix")
  s, n = m.shape
  if s < 2 or n < 2:
    raise ValueError(f"mean squares need at least 2 seeds and 2 items, got shape {m.shape}")
  grand, seed_means, item_means = m.mean(), m.mean(axis=1), m.mean(axis=0)
  residual = m - seed_means[:, None] - item_means[None, :] + grand
  df_seed, df_item, df_res = s - 1, n - 1, (s - 1) * (n - 1)
  return {"seed": n * np.sum((seed_means - grand) ** 2) / df_seed, "df_seed": df_seed,
          "item": s * np.sum((item_means - grand) ** 2) / df_item, "df_item": df_item,
          "residual": np.sum(residual ** 2) / df_res, "df_residual": df_res}


def estimate(matrix) -> Estimate:
  """The mean of x f[S, N] and its variance parts (module docstring)."""
  m = _as_matrix(matrix, "matrix")
  s, n = m.shape
  if s == 1 or n == 1:  # one level only: the plain t over the other axis
    values = m.ravel()
    if values.size < 2:
      return Estimate(float(values.mean()), ())
    return Estimate(float(values.mean()),
                    ((float(values.var(ddof=1) / values.size), float(values.size - 1)),))
  ms = mean_squares(m)
  return Estimate(float(m.mean()), (
      (float(ms["seed"] / (s * n)), float(ms["df_seed"])),
      (float(max(0.0, ms["item"] - ms["residual"]) / (s * n)), float(ms["df_item"]))))


def interval(est: Estimate, level: float = 0.95) -> tuple[float, tuple[float, float]]:
  """(mean, (low, high)): mean -/+ the half-width at `level`."""
  if not 0 < level < 1:
    raise ValueError(f"level must lie in (0, 1), got {level}")
  half = est.half_width(level)
  return est.mean, (est.mean - half, est.mean + half)


def p_value(est: Estimate) -> float:
  """Two-sided p-value of H0: the true mean is 0, consistent with `interval`: 1 - the
  level at which the interval's edge reaches 0 (1.0 for an exact 0, 0.0 for an exact
  non-zero constant)."""
  if est.variance == 0:
    return 1.0 if est.mean == 0 else 0.0
  if est.mean == 0:
    return 1.0
  reach = lambda level: est.half_width(level) - abs(est.mean)
  top = 1 - 1e-15
  if reach(top) < 0:
    return 0.0
  return float(1 - optimize.brentq(reach, 1e-12, top, xtol=1e-14, rtol=1e-12))


def _paired(a, b) -> np.ndarray:
  a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"a and b must be scored on the same items, got {a.shape[1]} and "
                     f"{b.shape[1]} items")
  if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
    raise ValueError(f"a and b must have the same seeds (or one must be seed-independent), "
                     f"got {a.shape[0]} and {b.shape[0]}")
  return a - b  # broadcasts a seed-independent side over the other's seeds


def mean_ci(rewards, level: float = 0.95) -> tuple[float, tuple[float, float]]:
  """(mean, (low, high)): the mean of rewards [S, N] and its t interval."""
  return interval(estimate(rewards), level)


def paired_difference_ci(a, b, level: float = 0.95) -> tuple[float, tuple[float, float]]:
  """(mean(a - b), (low, high)) for two methods on the same items.

  a, b: f[S, N] per seed and item, or f[N] for a policy that does not depend on the seed
  (the shared base), which is then compared with every seed of the other. Seeds pair by
  position: seed s of a with seed s of b, so both methods must have run the same seeds.
  """
  return interval(estimate(_paired(a, b)), level)


def paired_difference_p(a, b) -> float:
  """Two-sided p-value of 'a and b have the same mean' (same pairing as above)."""
  return p_value(estimate(_paired(a, b)))


def unpaired_difference_estimate(a, b) -> Estimate:
  """mean(a) - mean(b) for two samples with nothing to pair them on (for example,
  measurements from different training steps): the variance parts of both, together."""
  ea, eb = estimate(a), estimate(b)
  return Estimate(ea.mean - eb.mean, ea.parts + eb.parts)


def unpaired_difference_ci(a, b, level: float = 0.95) -> tuple[float, tuple[float, float]]:
  """(mean(a) - mean(b), (low, high)); a f[Sa, Na], b f[Sb, Nb]."""
  return interval(unpaired_difference_estimate(a, b), level)


# ------------------------------------------------------------- multiple comparisons

def holm(p_values) -> list[float]:
  """Holm's step-down adjusted p-values, in the input order: the k-th smallest of m is
  multiplied by (m - k + 1), then made non-decreasing along that order and capped at 1.
  Rejecting where adjusted p < alpha keeps the family-wise error rate at alpha."""
  p = np.asarray(p_values, np.float64)
  if p.ndim != 1 or np.any((p < 0) | (p > 1)) or not np.all(np.isfinite(p)):
    raise ValueError(f"p-values must be a list of numbers in [0, 1], got {p_values!r}")
  order = np.argsort(p, kind="stable")
  m = len(p)
  stepped = np.maximum.accumulate(p[order] * (m - np.arange(m)))
  adjusted = np.empty(m)
  adjusted[order] = np.minimum(stepped, 1.0)
  return adjusted.tolist()


# ---------------------------------------------------------------- coverage by simulation

def variance_components(matrix) -> dict:
  """Method-of-moments estimates, truncated at 0, of the seed, item and residual variances
  of x f[S, N] (S, N >= 2): E[MS_seed] = r + N s, E[MS_item] = r + S i, E[MS_res] = r."""
  ms = mean_squares(matrix)
  s, n = ms["df_seed"] + 1, ms["df_item"] + 1
  return {"seed": max(0.0, (ms["seed"] - ms["residual"]) / n),
          "item": max(0.0, (ms["item"] - ms["residual"]) / s),
          "residual": float(ms["residual"])}


def simulate_coverage(components: dict, seeds: int, items: int, level: float = 0.95,
                      replicates: int = 2000, seed: int = 0, method: str = "t",
                      chunk: int = 200) -> float:
  """The share of `replicates` simulated data sets whose interval covers the true mean.

  Each data set is x[s, n] = seed[s] + item[n] + residual[s, n], Gaussian with the given
  variances (components: {'seed', 'item', 'residual'}), true mean 0; method 't' is the
  interval of this module, 'bootstrap' the two-level percentile bootstrap."""
  if method not in ("t", "bootstrap"):
    raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}")
  rng = np.random.default_rng(seed)
  sd = {k: float(np.sqrt(components[k])) for k in ("seed", "item", "residual")}
  covered = 0
  for start in range(0, replicates, chunk):
    r = min(chunk, replicates - start)
    data = (sd["seed"] * rng.standard_normal((r, seeds, 1))
            + sd["item"] * rng.standard_normal((r, 1, items))
            + sd["residual"] * rng.standard_normal((r, seeds, items)))
    for x in data:
      if method == "t":
        _, (low, high) = interval(estimate(x), level)
      else:
        _, (low, high) = bootstrap_mean_ci(x, level, replicates=1000,
                                           seed=int(rng.integers(2 ** 31)))
      covered += low <= 0.0 <= high
  return covered / replicates


# ------------------------------------------------- the percentile bootstrap (for comparison)

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


def bootstrap_mean_ci(matrix, level: float = 0.95, replicates: int = DEFAULT_REPLICATES,
                      seed: int = 0) -> tuple[float, tuple[float, float]]:
  """(mean, (low, high)): the two-level percentile bootstrap interval of the mean."""
  m = _as_matrix(matrix, "matrix")
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(bootstrap_means(m, replicates, seed), [tail, 1.0 - tail])
  return float(m.mean()), (float(low), float(high))
