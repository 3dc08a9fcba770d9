"""Several reward functions with weights (config.reward.fns / config.reward.weights).

A response's reward is sum_i weights[i] * fn_i(response, example). Each entry of
config.reward.fns is either

  'verifier'           the built-in verifier each example names (integer / math / choice /
                       exact, copd_jax/data/verifiers.py), or
  'module:function'    a plug-in fn(response: str, example: RewardExample) -> float,

and each one is scored through the existing single-function path (verifiers.score with
RewardConfig.fn set to it: the sandboxed worker pool, its time limits and its error
accounting), so a list adds no new way for a plug-in to run. config.reward.weights is a
tuple of the same length (empty = every weight 1.0). Empty fns = the single config.reward.fn
(the behaviour before the list existed). Each function's mean reward is logged per step
(`reward_fn/<name>`, see rollout.verify_local).

Example (a format bonus next to correctness):
    --config.reward.fns=verifier,my_rewards:has_boxed --config.reward.weights=1.0,0.2
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from copd_jax.data import math_verifier, verifiers

BUILTIN = "verifier"  # the verifier each example names


@dataclasses.dataclass(frozen=True)
class RewardFn:
  """One weighted term: spec ('verifier' or 'module:function'), weight, log name."""
  spec: str
  weight: float
  name: str


def _as_tuple(value) -> tuple:
  if value is None:
    return ()
  if isinstance(value, str):
    return tuple(p.strip() for p in value.split(",") if p.strip())
  return tuple(value)


def parse_fns(fns, weights=()) -> tuple[RewardFn, ...]:
  """config.reward.fns / weights -> RewardFns; ValueError naming the field when wrong.

  fns: 'verifier' or 'module:function' entries (a tuple, or one comma-separated string);
  weights: finite numbers, one per entry, or empty for all 1.0. Log names are the function
  names ('verifier', 'has_boxed'); a name used twice gets its module too."""
  specs = _as_tuple(fns)
  values = _as_tuple(weights)
  for spec in specs:
    if not isinstance(spec, str) or (spec != BUILTIN and spec.count(":") != 1):
      raise ValueError(f"config.reward.fns entries must be '{BUILTIN}' or 'module:function', "
                       f"got {spec!r}")
  if len(set(specs)) != len(specs):
    raise ValueError(f"config.reward.fns must not repeat a function, got {specs!r}")
  if values and len(values) != len(specs):
    raise ValueError(f"config.reward.weights must give one weight per config.reward.fns "
                     f"entry ({len(specs)}), or be empty for all 1.0; got {values!r}")
  parsed = []
  for value in values:
    try:
      weight = float(value)
    except (TypeError, ValueError):
      weight = math.nan
    if isinstance(value, bool) or not math.isfinite(weight):
      raise ValueError(f"config.reward.weights must be finite numbers, got {values!r}")
    parsed.append(weight)
  weights = parsed or [1.0] * len(specs)
  short = [s.rpartition(":")[2] for s in specs]
  names = [n if short.count(n) == 1 else s.replace(":", ".") for n, s in zip(short, specs)]
  return tuple(RewardFn(s, w, n) for s, w, n in zip(specs, weights, names))


def from_config(reward_cfg) -> tuple[math_verifier.RewardConfig, tuple[RewardFn, ...]]:
  """config.reward (a run_spec.RewardSpec or a dict of its fields) -> (the RewardConfig every function is scored with, the weighted list).

  Only the fields RewardConfig has are passed to it, so fields added to either side
  (the list here, error limits there) never break the other."""
  raw = (dataclasses.asdict(reward_cfg) if dataclasses.is_dataclass(reward_cfg)
         else dict(reward_cfg))
  known = {f.name for f in dataclasses.fields(math_verifier.RewardConfig)}
  fns = parse_fns(raw.get("fns", ()), raw.get("weights", ()))
  if fns and raw.get("fn"):
    raise ValueError("config.reward.fn and config.reward.fns are both set; put the plug-in "
                     f"into the list instead (config.reward.fns=...,{raw['fn']})")
  config = math_verifier.RewardConfig(**{k: v for k, v in raw.items() if k in known})
  return config, fns


@dataclasses.dataclass(frozen=True)
class Rewards:
  """A run's rewards (config.reward), passed to whatever scores responses: the settings
  every function is scored with, and the weighted list (empty: the single function)."""
  config: math_verifier.RewardConfig = math_verifier.RewardConfig()
  fns: tuple[RewardFn, ...] = ()

  def score(self, responses: Sequence[str], examples: Sequence):
    """(float32[N] weighted rewards, {name: float32[N]}, [PoolStats]): see `score`."""
    return score(responses, examples, self.fns, self.config)

  def rewards_for(self, responses: Sequence[str], examples: Sequence) -> np.ndarray:
    """float32[N] weighted rewards of responses[i] against examples[i]; without a list,
    verifiers.rewards_for with these settings."""
    if not self.fns:
      return verifiers.rewards_for(responses, examples, self.config)
    return self.score(responses, examples)[0]


def run_config(reward_cfg) -> math_verifier.RewardConfig:
  """The RewardConfig a run scores with: config.reward's limits, and every plug-in of the
  list for the one worker pool (reward.workers bounds all of them). Pure: imports nothing."""
  config, fns = from_config(reward_cfg)
  return dataclasses.replace(config, plugins=tuple(sorted(
      {fn.spec for fn in fns if fn.spec != BUILTIN} | set(config.plugins))))


def rewards_of(reward_cfg) -> Rewards:
  """The Rewards of config.reward (a run_spec.RewardSpec). Every plug-in is imported now,
  so a bad spec fails at start, naming it, not in a worker later."""
  _, fns = from_config(reward_cfg)
  config = run_config(reward_cfg)
  for spec in math_verifier.pool_plugins(config):
    math_verifier.load_plugin(spec)
  return Rewards(config, fns)


def _single(config: math_verifier.RewardConfig, fn: RewardFn) -> math_verifier.RewardConfig:
  return dataclasses.replace(config, fn="" if fn.spec == BUILTIN else fn.spec)


def combine(per_fn: Mapping[str, np.ndarray], fns: Sequence[RewardFn]) -> np.ndarray:
  """sum_i weights[i] * per_fn[name_i] -> float32[N]."""
  total = np.zeros_like(np.asarray(per_fn[fns[0].name], np.float64))
  for fn in fns:
    total = total + fn.weight * np.asarray(per_fn[fn.name], np.float64)
  return total.astype(np.float32)


def score(responses: Sequence[str], examples: Sequence, fns: Sequence[RewardFn] = (),
          config: math_verifier.RewardConfig | None = None
          ) -> tuple[np.ndarray, dict[str, np.ndarray], list]:
  """(float32[N] weighted rewards, {name: float32[N]} per function, [PoolStats per call]).

  Without a list (fns empty, the default when config.reward.fns is unset) this is exactly
  verifiers.score with config's single function, and the per-function dict is empty."""
  fns = tuple(fns)
  config = config or math_verifier.RewardConfig()
  if not fns:
    rewards, stats = verifiers.score(responses, examples, config)
    return rewards, {}, [stats]
  per_fn, stats = {}, []
  for fn in fns:
    per_fn[fn.name], pool = verifiers.score(responses, examples, _single(config, fn))
    stats.append(pool)
  return combine(per_fn, fns), per_fn, stats


def total_stats(stats: Sequence) -> math_verifier.PoolStats:
  """The PoolStats of several calls, their counters added (one step's counters). The
  per-request `failures` map indexes one call's requests, so it is not carried over."""
  total = math_verifier.PoolStats()
  counters = [f.name for f in dataclasses.fields(total) if f.type in (int, "int")]
  for one in stats:
    for name in counters:
      setattr(total, name, getattr(total, name) + getattr(one, name))
  return total


def branch_means(per_fn: Mapping[str, np.ndarray], flat: np.ndarray, branches: int,
                 rows: int) -> dict[str, np.ndarray]:
  """{'reward_fn/<name>': f32[S]}: each function's mean reward over the scored rows of
  every branch. per_fn[name]: f32[len(flat)] for the flat row indices `flat` of an
  [S, rows] batch (a branch without scored rows gets 0)."""
  branch = np.asarray(flat) // rows
  counts = np.bincount(branch, minlength=branches).astype(np.float64)
  return {f"reward_fn/{name}": (np.bincount(branch, weights=np.asarray(values, np.float64),
                                            minlength=branches)
                                / np.maximum(counts, 1)).astype(np.float32)
          for name, values in per_fn.items()}
