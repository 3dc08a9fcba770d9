"""Stacked experts: E policies as ONE pytree whose every leaf has a leading expert axis.

Code for one expert is written once (copd_jax.models.decoder) and lifted with jax.vmap, so E
experts cost one batched call, never a Python loop in a hot path. The stacked pytree goes
to optax, orbax and shardings as is (shard its leading axis over the `expert` mesh axis).

LoRA branches (copd_jax.models.lora.LoraBranches: one shared base + adapters stacked
[E, ...]) go through the same functions: vmaps take lora.branch_axes (the base is not
batched), take_expert returns a branch's effective weights and merge averages them.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from copd_jax.models import decoder, lora
from copd_jax.models.model_config import ModelConfig

Params = Any  # a nested dict of f32 arrays


def init_stacked(cfg: ModelConfig, keys) -> Params:
  """Independent fresh experts, one per key. keys: PRNG keys [E] -> params with leaves [E, ...]."""
  cfg.validate()
  return jax.vmap(lambda key: decoder.init_params(cfg, key))(keys)


def broadcast_params(params: Params, num_experts: int) -> Params:
  """E identical copies of one checkpoint (every branch starts from the shared base)."""
  if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) or \
      num_experts <= 0:
    raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
  return jax.tree_util.tree_map(
      lambda x: jnp.broadcast_to(x, (num_experts,) + x.shape), params)


def initial_branches(base: Params, num_experts: int, spec: lora.LoraSpec | None = None,
                     key=None) -> Params:
  """E branches that all start at `base`: E copies (full fine-tuning, spec None or rank
  0) or, with a LoRA spec, LoraBranches of `base` and E fresh adapters (B = 0; A drawn
  from `key`, default key 0)."""
  if spec is None or not spec.enabled:
    return broadcast_params(base, num_experts)
  broadcast_params(jnp.zeros(()), num_experts)  # the same check of num_experts
  return lora.init_branches(base, spec, num_experts,
                            jax.random.key(0) if key is None else key)


def num_experts(stacked: Params) -> int:
  """The size of the leading expert axis (all leaves must agree)."""
  if lora.is_lora(stacked):
    return lora.num_branches(stacked)
  sizes = {x.shape[0] if x.ndim else None for x in jax.tree_util.tree_leaves(stacked)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"stacked params must share one leading expert axis, got sizes {sizes}")
  return int(sizes.pop())


def select_experts(stacked: Params, indices) -> Params:
  """The experts at `indices` (int[K]), still stacked [K, ...] (a LoRA run's shared base
  stays as it is)."""
  indices = np.asarray(indices)
  if lora.is_lora(stacked):
    return stacked.replace(adapters=jax.tree.map(lambda x: x[indices], stacked.adapters))
  return jax.tree.map(lambda x: x[indices], stacked)


def take_expert(stacked: Params, k: int) -> Params:
  """Expert k's single-model params (leaves without the expert axis); for LoRA branches
  its effective weights W + scale B_k A_k (plain params)."""
  e = num_experts(stacked)
  if isinstance(k, (int, np.integer)) and not -e <= k < e:
    raise ValueError(f"expert index k={k} out of range for {e} experts")
  if lora.is_lora(stacked):
    return lora.effective_params(lora.take_branch(stacked, k))
  return jax.tree_util.tree_map(lambda x: x[k], stacked)


@functools.partial(jax.jit, static_argnames=("cfg",))
def stacked_forward_hidden(stacked: Params, cfg: ModelConfig, tokens, positions,
                           token_mask, vision=None):
  """Each expert's forward on its own batch, one vmapped call.

  tokens, positions: int32[E, B, T]; token_mask: bool[E, B, T];
  vision: f32[E, B, F, H, W, C] or None -> hidden f32[E, B, T, D].
  """
  def one_expert(params, tok, pos, mask, vis):
    return decoder.forward_hidden(params, cfg, tok, pos, mask, vis)
  return jax.vmap(one_expert, in_axes=(lora.branch_axes(stacked), 0, 0, 0, 0))(
      stacked, tokens, positions, token_mask, vision)


def append_model(stacked: Params, single: Params) -> Params:
  """[E+1]: the branches plus one more model (e.g. the base, for diagnostics). LoRA
  branches append their own base (zero adapters); `single` must then be that base."""
  if lora.is_lora(stacked):
    return lora.append_base(stacked)
  return jax.tree.map(lambda s, b: jnp.concatenate([s, b[None]]), stacked, single)


def merge_weights(num: int, weights: Sequence[float] | None) -> np.ndarray:
  """Validated, normalised merge weights f32[E] (uniform when `weights` is None)."""
  if weights is None:
    return np.full((num,), 1.0 / num, np.float32)
  w = np.asarray(weights, dtype=np.float64)
  if w.shape != (num,):
    raise ValueError(f"merge weights must have one entry per expert ({num}), got shape "
                     f"{w.shape}")
  if not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError(f"merge weights must be finite and non-negative, got {w.tolist()}")
  if w.sum() <= 0:
    raise ValueError(f"merge weights must not all be zero, got {w.tolist()}")
  return (w / w.sum()).astype(np.float32)


def merge(stacked: Params, weights: Sequence[float] | None = None) -> Params:
  """The all-in-one policy: a weighted average of the experts' parameters (f32).

  weights: None (uniform, the paper's simple merging) or E non-negative numbers, normalised
  to sum 1. Returns single-model params. LoRA branches merge in weight space:
  W + sum_k w_k scale B_k A_k (lora.merge).
  """
  w = jnp.asarray(merge_weights(num_experts(stacked), weights))
  if lora.is_lora(stacked):
    return lora.merge(stacked, w)
  return jax.tree_util.tree_map(
      lambda x: jnp.tensordot(w, x.astype(jnp.float32), axes=1), stacked)
