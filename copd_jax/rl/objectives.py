"""GRPO group advantages: the RL objective's host-side half.

The policy loss itself (PolicyLossConfig, the clipped surrogate, KL, OPD token advantage,
aggregation) lives in `copd_jax.losses`, which the fused kernels import without importing
`copd_jax.rl`.

Shapes: `G` groups of `K` rollouts each (one group = the K samples of one prompt).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


# ------------------------------------------------------------------ group advantages
class GroupAdvantages(NamedTuple):
  """advantages: f32[G, K]; zero_variance: bool[G], groups whose K rewards are all
  equal (they carry no GRPO signal: their advantages are exactly 0)."""

  advantages: jax.Array
  zero_variance: jax.Array


def grpo_advantages(rewards, *, scale_by_std: bool = True, eps: float = 1e-6,
                    ddof: int = 0) -> GroupAdvantages:
  """Group-normalised advantages, one group per prompt.

  Args:
    rewards: f32[G, K], K rollouts of each of G prompts.
    scale_by_std: True for GRPO, (r - mean) / (std + eps); False for Dr.GRPO,
      r - mean (dividing by std up-weights near-uniform groups).
    eps: added to the std.
    ddof: std degrees of freedom (0: population std; TRL and verl use 1).
  Returns:
    GroupAdvantages(advantages f32[G, K], zero_variance bool[G]).
  """
  rewards = jnp.asarray(rewards)
  if rewards.ndim != 2:
    raise ValueError(f"rewards must be [groups, group_size], got shape {rewards.shape}")
  if rewards.shape[1] - ddof < 1:
    raise ValueError(f"rewards: group size {rewards.shape[1]} too small for ddof={ddof}")
  rewards = rewards.astype(jnp.float32)
  centred = rewards - rewards.mean(axis=1, keepdims=True)
  # Exact test (not std < tol): a group is degenerate only if every reward is equal.
  zero_variance = jnp.all(rewards == rewards[:, :1], axis=1)
  if scale_by_std:
    std = jnp.std(rewards, axis=1, keepdims=True, ddof=ddof)
    centred = centred / (std + eps)
  advantages = jnp.where(zero_variance[:, None], 0.0, centred)
  return GroupAdvantages(advantages, zero_variance)
