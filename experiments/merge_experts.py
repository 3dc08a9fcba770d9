"""A stronger merge of independently trained experts, chosen on the validation split from
two families of candidates:

  - task arithmetic: base + scale * sum_e (expert_e - base), scale in `scales(E)` (1/E to 1
    in 5 even steps). scale = 1/E is the uniform weight average (the merge CoPD and the
    "merged experts" baseline use); larger scales keep more of each expert's change.
  - TIES (Yadav et al., 2023): each task vector expert_e - base keeps its largest
    TIES_DENSITY share of entries by magnitude (per parameter tensor), every entry takes
    the sign of the larger total mass, the kept task-vector entries that agree with it are
    averaged, and base + scale * that average is the merge, scale in TIES_SCALES.

The candidate whose merge scores best on `VALIDATION_ITEMS` validation items per capability
(the validation split is disjoint from train and eval; ties go to the earlier candidate,
the uniform average first) is the only one scored on the held-out eval items.
experiments/reproduce.py calls `score_strong_merge` once per seed, after the experts.
"""
from __future__ import annotations

import json
import os

import numpy as np
from copd_jax.config_lib import spec_of

VALIDATION_ITEMS = 200  # per capability
TIES_DENSITY = 0.2
TIES_SCALES = (0.5, 1.0, 1.5)


def scales(num_experts: int) -> tuple[float, ...]:
  """The candidate scales: 1/E (the uniform average) to 1 (every task vector whole)."""
  return tuple(float(s) for s in np.linspace(1.0 / num_experts, 1.0, 5))


def task_arithmetic(base, stacked, scales):
  """[K, ...] params: base + scale_k * sum_e (stacked[e] - base) for every scale_k.

  base: one model's params; stacked: [E, ...] experts; scales: K floats."""
  import jax
  import jax.numpy as jnp
  scales = jnp.asarray(scales, jnp.float32)

  def leaf(b, x):
    task_sum = jnp.sum(x.astype(jnp.float32) - b.astype(jnp.float32)[None], axis=0)
    shape = (-1,) + (1,) * b.ndim
    return (b.astype(jnp.float32)[None] + scales.reshape(shape) * task_sum[None]).astype(x.dtype)

  return jax.tree.map(leaf, base, stacked)


def ties(base, stacked, scales, density: float = TIES_DENSITY):
  """[K, ...] params: the TIES merge of the experts at every scale_k (module docstring).

  base: one model's params; stacked: [E, ...] experts; density: share of each task
  vector's entries kept (per parameter tensor, by magnitude)."""
  import jax
  import jax.numpy as jnp
  scales = jnp.asarray(scales, jnp.float32)

  def leaf(b, x):
    b32 = b.astype(jnp.float32)
    tau = x.astype(jnp.float32) - b32[None]                     # [E, ...] task vectors
    flat = jnp.abs(tau.reshape(tau.shape[0], -1))
    threshold = jnp.quantile(flat, 1.0 - density, axis=1)       # [E]
    keep = jnp.abs(tau) >= threshold.reshape((-1,) + (1,) * b.ndim)
    trimmed = jnp.where(keep, tau, 0.0)
    sign = jnp.sign(jnp.sum(trimmed, axis=0))                   # the elected sign
    agree = (jnp.sign(trimmed) == sign[None]) & (trimmed != 0)
    count = jnp.sum(agree, axis=0)
    merged = jnp.where(count > 0, jnp.sum(jnp.where(agree, trimmed, 0.0), axis=0)
                       / jnp.maximum(count, 1), 0.0)
    shape = (-1,) + (1,) * b.ndim
    return (b32[None] + scales.reshape(shape) * merged[None]).astype(x.dtype)

  return jax.tree.map(leaf, base, stacked)


def candidates(base, stacked, num_experts: int):
  """(names, [K, ...] params): every merge the validation split chooses among."""
  import jax
  import jax.numpy as jnp
  grid = scales(num_experts)
  names = [f"task arithmetic {s:.4f}" for s in grid] + [f"TIES {s:g}" for s in TIES_SCALES]
  params = jax.tree.map(lambda a, t: jnp.concatenate([a, t]),
                        task_arithmetic(base, stacked, grid), ties(base, stacked, TIES_SCALES))
  return names, params


def choose(validation_accuracy: dict[str, float]) -> str:
  """The candidate with the best validation accuracy; the earliest one among ties."""
  best = max(validation_accuracy.values())
  return next(n for n, acc in validation_accuracy.items() if acc == best)


def load_base_and_experts(cfg, experts_dir: str):
  """(setup, base params, stacked expert params [E, ...]) for an experts run's config."""
  import jax
  from copd_jax import checkpoint, policy_setup
  from copd_jax.models import stacked as stacked_lib
  setup = policy_setup.build_setup(spec_of(cfg))
  caps = tuple(cfg.rl.capabilities)
  directory = os.path.join(experts_dir, "final_params")
  stored = tuple(checkpoint.read_metadata(directory).get("branches", ()))
  if stored != caps:
    raise SystemExit(f"{directory} holds experts {stored}, expected {caps}")
  init = lambda: policy_setup.init_policy_params(setup.model_cfg, jax.random.key(0))
  single = jax.eval_shape(init)
  unverified = bool(cfg.checkpoint.get("allow_unverified", False))
  stacked = checkpoint.load_policy(
      directory, jax.eval_shape(lambda: stacked_lib.broadcast_params(init(), len(caps))),
      allow_unverified=unverified)
  base = checkpoint.load_policy(cfg.warm_start.checkpoint_dir, single,
                                allow_unverified=unverified)
  return setup, base, stacked


def score_strong_merge(cfg, experts_dir: str, out_dir: str, reference_experts_dir=None) -> dict:
  """Task arithmetic over the experts at `experts_dir`, scale chosen on validation, scored
  on the held-out items: writes <out_dir>/eval_rewards.npz ('merged/<cap>') and
  summary.json (every scale's validation accuracy, the scale chosen) and returns the
  summary. reference_experts_dir: a finished experts run of the same config whose weights
  are gone; the summary then records how many held-out rewards of the two runs agree
  (the experts were retrained to get weights)."""
  from copd_jax import policy_setup
  from copd_jax.data import toy_tasks
  from copd_jax.rl import evaluation
  setup, base, stacked = load_base_and_experts(cfg, experts_dir)
  names, merges = candidates(base, stacked, len(setup.capabilities))
  kwargs = dict(max_new_tokens=cfg.sampling.max_new_tokens, batch_size=cfg.eval.batch_size)
  validation = {cap: toy_tasks.validation_set(cap, VALIDATION_ITEMS, seed=cfg.tasks.seed,
                                              difficulty=cfg.tasks.difficulty[cap],
                                              **setup.example_kwargs)
                for cap in setup.capabilities}
  accuracy = evaluation.evaluate_stacked(merges, setup, validation, **kwargs)
  by_name = {n: float(accuracy["accuracy/overall"][k]) for k, n in enumerate(names)}
  name = choose(by_name)
  import jax
  chosen = jax.tree.map(lambda x: x[names.index(name)][None], merges)
  rewards = {}
  held_out = evaluation.evaluate_stacked(chosen, setup, policy_setup.held_out_sets(spec_of(cfg), setup),
                                         rewards_out=rewards, **kwargs)
  os.makedirs(out_dir, exist_ok=True)
  evaluation.save_eval_rewards(os.path.join(out_dir, "eval_rewards.npz"),
                               {"merged": {c: r[0] for c, r in rewards.items()}})
  summary = {"method": "merged_experts_strong", "experts": experts_dir,
             "validation_items_per_capability": VALIDATION_ITEMS,
             "validation_accuracy": by_name, "chosen": name,
             "merged": {k: float(v[0]) for k, v in held_out.items()}}
  if reference_experts_dir is not None:
    summary["experts_retrained_for_weights"] = True
    summary["held_out_rewards_equal_to_reference"] = rewards_agreement(
        experts_dir, reference_experts_dir)
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def rewards_agreement(run_a: str, run_b: str) -> dict:
  """{key: share of items with equal rewards} over the keys both eval_rewards.npz hold."""
  with np.load(os.path.join(run_a, "eval_rewards.npz")) as a, \
       np.load(os.path.join(run_b, "eval_rewards.npz")) as b:
    return {k: float(np.mean(a[k] == b[k])) for k in sorted(set(a.files) & set(b.files))}
