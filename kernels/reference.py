"""Dense reference backend: materialises [tokens x vocab] logits. The oracle.

Plain jnp and autodiff; memory O(N x V). Multiplies in hidden's dtype with f32
accumulation, like the tiled backends, so bf16 results are comparable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from copd_jax import losses
from copd_jax.kernels import tile_math


def dense_logits(hidden, head):
  """hidden: [N, D], head: [D, V] -> f32[N, V]."""
  return tile_math.tile_logits(hidden, head)


def token_logprob_entropy(hidden, head, tokens):
  """-> (log p(tokens) f32[N], entropy f32[N]); differentiable by autodiff."""
  logits = dense_logits(hidden, head)
  return (losses.token_logprobs_from_logits(logits, tokens),
          losses.entropy_from_logits(logits))


def token_stats_at_ids(hidden, head, tokens, ids):
  """-> (log p(tokens) f32[N], entropy f32[N], logits at ids f32[N, k]); autodiff."""
  logits = dense_logits(hidden, head)
  return (losses.token_logprobs_from_logits(logits, tokens),
          losses.entropy_from_logits(logits),
          jnp.take_along_axis(logits, ids.astype(jnp.int32), axis=-1))


def top_k_logprobs(hidden, head, k: int):
  """-> (top-k log-probs f32[N, k], their token ids int32[N, k]), largest first."""
  logp = jax.nn.log_softmax(dense_logits(hidden, head), axis=-1)
  values, ids = jax.lax.top_k(logp, k)
  return values, ids.astype(jnp.int32)


def reverse_kl(student_hidden, student_head, teacher_hidden, teacher_head):
  """Full-vocabulary KL(p_student || p_teacher) per token -> f32[N]."""
  return losses.reverse_kl_from_logits(dense_logits(student_hidden, student_head),
                                           dense_logits(teacher_hidden, teacher_head))
