"""A stronger merge of independently trained experts: task arithmetic, its scale chosen on
the validation split.

    merged(scale) = base + scale * sum_e (expert_e - base)

With E experts, scale = 1/E is the uniform weight average (the merge CoPD and the "merged
experts" baseline use); larger scales keep more of each expert's change. The scale is the
one of `scales(E)` (1/E to 1 in 5 even steps) whose merge scores best on `VALIDATION_ITEMS` validation items per capability
(the validation split is disjoint from train and eval; ties go to the smaller scale), and
only that merge is scored on the held-out eval items. experiments/reproduce.py calls
`score_strong_merge` once per seed, after the experts.
"""
from __future__ import annotations

import json
import os

import numpy as np

VALIDATION_ITEMS = 300  # per capability


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


def choose_scale(validation_accuracy: dict[float, float]) -> float:
  """The scale with the best validation accuracy; the smallest one among ties."""
  best = max(validation_accuracy.values())
  return min(s for s, acc in validation_accuracy.items() if acc == best)


def load_base_and_experts(cfg, experts_dir: str):
  """(setup, base params, stacked expert params [E, ...]) for an experts run's config."""
  import jax
  from copd_jax import checkpoint, policy_setup
  from copd_jax.models import stacked as stacked_lib
  setup = policy_setup.build_setup(cfg)
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
  grid = scales(len(setup.capabilities))
  candidates = task_arithmetic(base, stacked, grid)
  kwargs = dict(max_new_tokens=cfg.sampling.max_new_tokens, batch_size=cfg.eval.batch_size)
  validation = {cap: toy_tasks.validation_set(cap, VALIDATION_ITEMS, seed=cfg.tasks.seed,
                                              difficulty=cfg.tasks.difficulty[cap],
                                              **setup.example_kwargs)
                for cap in setup.capabilities}
  accuracy = evaluation.evaluate_stacked(candidates, setup, validation, **kwargs)
  by_scale = {s: float(accuracy["accuracy/overall"][k]) for k, s in enumerate(grid)}
  scale = choose_scale(by_scale)
  import jax
  chosen = jax.tree.map(lambda x: x[grid.index(scale)][None], candidates)
  rewards = {}
  held_out = evaluation.evaluate_stacked(chosen, setup, policy_setup.held_out_sets(cfg, setup),
                                         rewards_out=rewards, **kwargs)
  os.makedirs(out_dir, exist_ok=True)
  evaluation.save_eval_rewards(os.path.join(out_dir, "eval_rewards.npz"),
                               {"merged": {c: r[0] for c, r in rewards.items()}})
  summary = {"method": "merged_experts_strong", "merge": "task arithmetic",
             "experts": experts_dir, "scales": list(grid),
             "validation_items_per_capability": VALIDATION_ITEMS,
             "validation_accuracy_by_scale": {f"{s:.4f}": a for s, a in by_scale.items()},
             "scale": scale,
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
