"""Per-tile math shared by the chunked (XLA) and Pallas backends.

A tile is logits z: f32[n, v] for n tokens and v vocabulary columns. Running per-token
statistics are kept as f32[n, 1] columns (the layout a TPU kernel wants), updated tile
by tile with an online log-sum-exp, so no [tokens x vocab] array ever exists.

Everything accumulates in f32 and relative to the running max, which keeps results
tile-invariant to float tolerance and finite for logits of magnitude 1e4.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# A finite "minus infinity" for the running max: (m_old - m_new) * 0 must stay 0,
# which -inf would turn into NaN.
NEG_INIT = -1e30


def tile_logits(hidden, head):
  """hidden: [n, D] @ head: [D, v] -> f32[n, v].

  Multiplies in hidden's dtype (bf16 hidden -> bf16 operands, the fast path) and
  accumulates in f32.
  """
  return jnp.dot(hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)


def grad_matmuls(hidden, head, dlogits):
  """Tile gradients from dlogits: f32[n, v] -> (d_hidden f32[n, D], d_head f32[D, v])."""
  dz = dlogits.astype(hidden.dtype)
  d_hidden = jax.lax.dot_general(dz, head.astype(hidden.dtype), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
  d_head = jax.lax.dot_general(hidden, dz, (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
  return d_hidden, d_head


# ------------------------------------------------------------ softmax statistics
class SoftmaxStats(NamedTuple):
  """Running statistics over the vocabulary tiles seen so far, each f32[n, 1].

  max: running max m; sum_exp: l = sum exp(z - m); sum_exp_shifted: s = sum
  exp(z - m) (z - m) (for the entropy); target: the sampled token's logit (0 until
  its tile is seen).
  """

  max: jax.Array
  sum_exp: jax.Array
  sum_exp_shifted: jax.Array
  target: jax.Array


def init_stats(n: int) -> SoftmaxStats:
  return SoftmaxStats(jnp.full((n, 1), NEG_INIT, jnp.float32), jnp.zeros((n, 1), jnp.float32),
                      jnp.zeros((n, 1), jnp.float32), jnp.zeros((n, 1), jnp.float32))


def accumulate_tile(stats: SoftmaxStats, logits, col_ids, tokens, col_valid=None) -> SoftmaxStats:
  """Fold one tile into the running statistics.

  logits: f32[n, v]; col_ids: int32[1 or n, v] vocabulary ids of the columns;
  tokens: int32[n, 1]; col_valid: bool[1 or n, v] or None (False for padding columns).
  """
  if col_valid is not None:
    logits = jnp.where(col_valid, logits, NEG_INIT)
  m_new = jnp.maximum(stats.max, jnp.max(logits, axis=1, keepdims=True))
  shift = stats.max - m_new                      # <= 0
  alpha = jnp.exp(shift)
  centred = logits - m_new
  e = jnp.exp(centred)
  e_centred = e * centred
  if col_valid is not None:
    e = jnp.where(col_valid, e, 0.0)
    e_centred = jnp.where(col_valid, e_centred, 0.0)
  sum_exp = alpha * stats.sum_exp + jnp.sum(e, axis=1, keepdims=True)
  # sum exp(z - m_new)(z - m_new) over old columns = alpha * (s + shift * l)
  shifted = alpha * (stats.sum_exp_shifted + shift * stats.sum_exp) + jnp.sum(
      e_centred, axis=1, keepdims=True)
  hit = col_ids == tokens
  target = stats.target + jnp.sum(jnp.where(hit, logits, 0.0), axis=1, keepdims=True)
  return SoftmaxStats(m_new, sum_exp, shifted, target)


def finalize_stats(stats: SoftmaxStats):
  """-> (logprob of the target, entropy, log-sum-exp), each f32[n, 1]."""
  log_sum = jnp.log(stats.sum_exp)
  lse = stats.max + log_sum
  entropy = log_sum - stats.sum_exp_shifted / stats.sum_exp
  return stats.target - lse, entropy, lse


def logit_grad(logits, col_ids, tokens, lse, entropy, g_logprob, g_entropy, col_valid=None):
  """d(g_lp * logprob + g_ent * entropy) / d logits for one tile. -> f32[n, v].

  With p = softmax(z): d logprob/dz = onehot(token) - p and
  d entropy/dz = -p (log p + H). lse, entropy, g_logprob, g_entropy: f32[n, 1].
  """
  logp = logits - lse
  p = jnp.exp(logp)
  onehot = (col_ids == tokens).astype(jnp.float32)
  grad = g_logprob * (onehot - p) - g_entropy * p * (logp + entropy)
  if col_valid is not None:
    grad = jnp.where(col_valid, grad, 0.0)
  return grad


# --------------------------------------------------- two-model reverse KL statistics
class ReverseKLStats(NamedTuple):
  """Running statistics for KL(p_s || p_t), each f32[n, 1].

  Student m_s, l_s; teacher m_t, l_t; cross = sum exp(z_s - m_s) ((z_s - m_s) - (z_t - m_t)).
  Shifting both logits by their running max keeps the sum free of cancellation
  between two numbers of magnitude |logit|.
  """

  s_max: jax.Array
  s_sum_exp: jax.Array
  t_max: jax.Array
  t_sum_exp: jax.Array
  cross: jax.Array


def init_rkl_stats(n: int) -> ReverseKLStats:
  neg = jnp.full((n, 1), NEG_INIT, jnp.float32)
  zero = jnp.zeros((n, 1), jnp.float32)
  return ReverseKLStats(neg, zero, neg, zero, zero)


def accumulate_rkl_tile(stats: ReverseKLStats, student_logits, teacher_logits,
                        col_valid=None) -> ReverseKLStats:
  """Fold one tile of student and teacher logits (f32[n, v] each) into the stats."""
  if col_valid is not None:
    student_logits = jnp.where(col_valid, student_logits, NEG_INIT)
    teacher_logits = jnp.where(col_valid, teacher_logits, NEG_INIT)
  s_max = jnp.maximum(stats.s_max, jnp.max(student_logits, axis=1, keepdims=True))
  t_max = jnp.maximum(stats.t_max, jnp.max(teacher_logits, axis=1, keepdims=True))
  s_shift, t_shift = stats.s_max - s_max, stats.t_max - t_max
  s_alpha, t_alpha = jnp.exp(s_shift), jnp.exp(t_shift)
  ds, dt = student_logits - s_max, teacher_logits - t_max
  es, et = jnp.exp(ds), jnp.exp(dt)
  es_diff = es * (ds - dt)
  if col_valid is not None:
    es = jnp.where(col_valid, es, 0.0)
    et = jnp.where(col_valid, et, 0.0)
    es_diff = jnp.where(col_valid, es_diff, 0.0)
  cross = s_alpha * (stats.cross + (s_shift - t_shift) * stats.s_sum_exp) + jnp.sum(
      es_diff, axis=1, keepdims=True)
  return ReverseKLStats(
      s_max, s_alpha * stats.s_sum_exp + jnp.sum(es, axis=1, keepdims=True),
      t_max, t_alpha * stats.t_sum_exp + jnp.sum(et, axis=1, keepdims=True), cross)


def finalize_rkl_stats(stats: ReverseKLStats):
  """-> (KL(p_s || p_t), student lse, teacher lse), each f32[n, 1]."""
  log_ls, log_lt = jnp.log(stats.s_sum_exp), jnp.log(stats.t_sum_exp)
  kl = stats.cross / stats.s_sum_exp - log_ls + log_lt
  # KL >= 0 exactly; rounding can leave -1e-7.
  return jnp.maximum(kl, 0.0), stats.s_max + log_ls, stats.t_max + log_lt


def rkl_student_logit_grad(student_logits, teacher_logits, s_lse, t_lse, kl, g_kl,
                           col_valid=None):
  """d(g_kl * KL(p_s || p_t)) / d student logits = g_kl p_s (log p_s - log p_t - KL)."""
  logp_s = student_logits - s_lse
  logp_t = teacher_logits - t_lse
  p_s = jnp.exp(logp_s)
  grad = g_kl * p_s * (logp_s - logp_t - kl)
  if col_valid is not None:
    grad = jnp.where(col_valid, grad, 0.0)
  return grad


# ------------------------------------------------------------------------ top-k
def merge_top_k(best_values, best_ids, logits, col_ids, k: int, col_valid=None):
  """Merge a tile into a running top-k by k rounds of max-selection (no sort, no concat,
  so it lowers inside a TPU kernel).

  best_values: f32[n, k] (largest first, -inf when empty), best_ids: int32[n, k];
  logits: f32[n, v]; col_ids: int32[n, v]. Ties go to the lower vocabulary id, as in
  lax.top_k (the running best always holds lower ids than the current tile).
  Returns (values f32[n, k], ids int32[n, k]).
  """
  if col_valid is not None:
    logits = jnp.where(col_valid, logits, -jnp.inf)
  slot = jax.lax.broadcasted_iota(jnp.int32, best_values.shape, 1)
  out_values = jnp.full(best_values.shape, -jnp.inf, jnp.float32)
  out_ids = jnp.zeros(best_ids.shape, jnp.int32)
  no_col = jnp.iinfo(jnp.int32).max
  for rank in range(k):
    best_max = jnp.max(best_values, axis=1, keepdims=True)
    tile_max = jnp.max(logits, axis=1, keepdims=True)
    from_tile = tile_max > best_max
    tile_col = jnp.min(jnp.where(logits == tile_max, col_ids, no_col), axis=1, keepdims=True)
    best_slot = jnp.min(jnp.where(best_values == best_max, slot, k), axis=1, keepdims=True)
    best_id = jnp.sum(jnp.where(slot == best_slot, best_ids, 0), axis=1, keepdims=True)
    out_values = jnp.where(slot == rank, jnp.where(from_tile, tile_max, best_max), out_values)
    out_ids = jnp.where(slot == rank, jnp.where(from_tile, tile_col, best_id), out_ids)
    logits = jnp.where(from_tile & (col_ids == tile_col), -jnp.inf, logits)
    best_values = jnp.where(~from_tile & (slot == best_slot), -jnp.inf, best_values)
  return out_values, out_ids


# ------------------------------------------------------- logits at given token ids
def _local_ids(ids, col_ids, width: int):
  """ids int32[n, k] -> (their column in this tile clipped to [0, v), bool[n, k] inside)."""
  local = ids - col_ids[:1, :1]
  inside = (local >= 0) & (local < width)
  return jnp.clip(local, 0, width - 1), inside


def gather_at_ids(logits, col_ids, ids):
  """This tile's share of z[n, ids[n, i]]: f32[n, k], 0 for ids outside the tile.

  logits: f32[n, v] for the contiguous columns col_ids int32[1 or n, v]; ids: int32[n, k].
  Summed over all tiles, every id is seen exactly once: the logits at ids."""
  local, inside = _local_ids(ids, col_ids, logits.shape[1])
  return jnp.where(inside, jnp.take_along_axis(logits, local, axis=1), 0.0)


def scatter_at_ids(dlogits, col_ids, ids, g_ids):
  """dlogits f32[n, v] + g_ids f32[n, k] placed at the columns ids int32[n, k] that fall
  in this tile (the adjoint of gather_at_ids; ids distinct within a row)."""
  local, inside = _local_ids(ids, col_ids, dlogits.shape[1])
  rows = jax.lax.broadcasted_iota(jnp.int32, ids.shape, 0)
  return dlogits.at[rows, local].add(jnp.where(inside, g_ids, 0.0))
