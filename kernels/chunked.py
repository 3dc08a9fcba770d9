"""Chunked XLA backend: scans over token chunks and, inside each, over vocabulary tiles.

Memory is O(token_tile x vocab_tile + token_tile x D) instead of O(N x V); only the
[D, V] gradient of the head (an output) is full size, updated in place tile by tile.
The backward pass is a custom VJP that recomputes each logits tile (one extra matmul)
rather than storing them. A vocabulary or token count that is not a multiple of its
tile gets one smaller, static remainder tile (no padded copy of the head).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from copd_jax.kernels import tile_math


def _fold_over_vocab(step, carry, head, vocab_tile: int):
  """Run `carry = step(carry, head_tile [D, v], col_ids int32[1, v])` over all tiles."""
  vocab = head.shape[1]
  width = min(vocab_tile, vocab)
  num_full, remainder = divmod(vocab, width)
  iota = lax.broadcasted_iota(jnp.int32, (1, width), 1)

  def body(c, tile_index):
    start = tile_index * width
    head_tile = lax.dynamic_slice_in_dim(head, start, width, axis=1)
    return step(c, head_tile, start + iota), None

  carry, _ = lax.scan(body, carry, jnp.arange(num_full, dtype=jnp.int32))
  if remainder:
    start = num_full * width
    cols = start + lax.broadcasted_iota(jnp.int32, (1, remainder), 1)
    carry = step(carry, head[:, start:], cols)
  return carry


def _over_token_chunks(chunk_fn, carry, rows, token_tile: int):
  """Run `carry, out = chunk_fn(carry, [row chunks])` over chunks of the [N, ...] rows.

  Returns (carry, outs concatenated back to [N, ...]).
  """
  n = rows[0].shape[0]
  size = min(token_tile, n)
  num_full, remainder = divmod(n, size)

  def body(c, chunk_index):
    start = chunk_index * size
    return chunk_fn(c, [lax.dynamic_slice_in_dim(r, start, size, axis=0) for r in rows])

  carry, outs = lax.scan(body, carry, jnp.arange(num_full, dtype=jnp.int32))
  outs = jax.tree.map(lambda y: y.reshape(num_full * size, *y.shape[2:]), outs)
  if remainder:
    carry, last = chunk_fn(carry, [r[num_full * size:] for r in rows])
    outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outs, last)
  return carry, outs


def _add_to_head_grad(d_head, dw, col_ids):
  """d_head[:, cols] += dw, in place (dynamic slices of a loop carry)."""
  start, width = col_ids[0, 0], dw.shape[1]
  previous = lax.dynamic_slice_in_dim(d_head, start, width, axis=1)
  return lax.dynamic_update_slice_in_dim(d_head, previous + dw, start, axis=1)


def _head_grads(tile_grad, hidden, head, rows, token_tile: int, vocab_tile: int):
  """Gradients for hidden [N, D] and head [D, V] from per-tile logit gradients.

  tile_grad(hidden_chunk, head_tile, row_chunks, col_ids) -> dlogits f32[n, v].
  rows: extra [N, ...] arrays chunked alongside hidden. d_hidden is reduced over
  vocabulary tiles per token chunk; d_head is one f32 [D, V] carry updated in place.
  """

  def chunk_fn(d_head, row_chunks):
    hidden_chunk, extra = row_chunks[0], row_chunks[1:]

    def step(carry, head_tile, col_ids):
      d_hidden, d_head = carry
      dlogits = tile_grad(hidden_chunk, head_tile, extra, col_ids)
      dh, dw = tile_math.grad_matmuls(hidden_chunk, head_tile, dlogits)
      return d_hidden + dh, _add_to_head_grad(d_head, dw, col_ids)

    init = (jnp.zeros(hidden_chunk.shape, jnp.float32), d_head)
    d_hidden, d_head = _fold_over_vocab(step, init, head, vocab_tile)
    return d_head, d_hidden.astype(hidden.dtype)

  d_head, d_hidden = _over_token_chunks(chunk_fn, jnp.zeros(head.shape, jnp.float32),
                                        [hidden, *rows], token_tile)
  return d_hidden, d_head.astype(head.dtype)


# ------------------------------------------------------------ log-prob + entropy
def _stats_forward(hidden, head, tokens, token_tile: int, vocab_tile: int, top_k: int = 0):
  """-> (logprob, entropy, lse) each f32[N], and (top-k logits f32[N, k], ids) if top_k."""

  def chunk_fn(_, row_chunks):
    hidden_chunk, tokens_chunk = row_chunks
    n = hidden_chunk.shape[0]

    def step(carry, head_tile, col_ids):
      stats, best = carry
      logits = tile_math.tile_logits(hidden_chunk, head_tile)
      stats = tile_math.accumulate_tile(stats, logits, col_ids, tokens_chunk)
      if top_k:
        best = _merge_top_k(best, logits, col_ids, top_k)
      return stats, best

    best = None
    if top_k:
      best = (jnp.full((n, top_k), -jnp.inf, jnp.float32), jnp.zeros((n, top_k), jnp.int32))
    stats, best = _fold_over_vocab(step, (tile_math.init_stats(n), best), head, vocab_tile)
    logprob, entropy, lse = (x[:, 0] for x in tile_math.finalize_stats(stats))
    return None, (logprob, entropy, lse, best)

  _, outs = _over_token_chunks(chunk_fn, None, [hidden, tokens.astype(jnp.int32)[:, None]],
                               token_tile)
  return outs


def _merge_top_k(best, logits, col_ids, k: int):
  """Keep the k largest of (running best) + (this tile). best: (f32[n, k], int32[n, k])."""
  tile_k = min(k, logits.shape[1])
  values, idx = lax.top_k(logits, tile_k)
  ids = jnp.take_along_axis(jnp.broadcast_to(col_ids, logits.shape), idx, axis=1)
  values = jnp.concatenate([best[0], values], axis=1)
  ids = jnp.concatenate([best[1], ids], axis=1)
  values, order = lax.top_k(values, k)
  return values, jnp.take_along_axis(ids, order, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def token_logprob_entropy(hidden, head, tokens, token_tile: int, vocab_tile: int):
  """hidden: [N, D], head: [D, V], tokens: int[N] -> (logprob f32[N], entropy f32[N])."""
  logprob, entropy, _, _ = _stats_forward(hidden, head, tokens, token_tile, vocab_tile)
  return logprob, entropy


def _token_stats_fwd(hidden, head, tokens, token_tile, vocab_tile):
  logprob, entropy, lse, _ = _stats_forward(hidden, head, tokens, token_tile, vocab_tile)
  return (logprob, entropy), (hidden, head, tokens, lse, entropy)


def _stats_tile_grad(hidden_chunk, head_tile, rows, col_ids):
  tokens, lse, entropy, g_logprob, g_entropy = rows
  logits = tile_math.tile_logits(hidden_chunk, head_tile)
  return tile_math.logit_grad(logits, col_ids, tokens, lse, entropy, g_logprob, g_entropy)


def _token_stats_bwd(token_tile, vocab_tile, residuals, cotangents):
  hidden, head, tokens, lse, entropy = residuals
  g_logprob, g_entropy = (g.astype(jnp.float32)[:, None] for g in cotangents)
  rows = [tokens.astype(jnp.int32)[:, None], lse[:, None], entropy[:, None], g_logprob,
          g_entropy]
  d_hidden, d_head = _head_grads(_stats_tile_grad, hidden, head, rows, token_tile, vocab_tile)
  return d_hidden, d_head, None


token_logprob_entropy.defvjp(_token_stats_fwd, _token_stats_bwd)


def top_k_logprobs(hidden, head, k: int, token_tile: int, vocab_tile: int):
  """-> (top-k log-probs f32[N, k], ids int32[N, k]) in one pass; not differentiable."""
  dummy_tokens = jnp.zeros(hidden.shape[:1], jnp.int32)
  _, _, lse, (values, ids) = _stats_forward(hidden, head, dummy_tokens, token_tile,
                                            vocab_tile, top_k=k)
  return values - lse[:, None], ids


# ------------------------------------- log-prob + entropy + logits at given ids
def _stats_at_ids_forward(hidden, head, tokens, ids, token_tile: int, vocab_tile: int):
  """-> (logprob, entropy, lse) each f32[N] and the logits at ids f32[N, k], one pass."""

  def chunk_fn(_, row_chunks):
    hidden_chunk, tokens_chunk, ids_chunk = row_chunks

    def step(carry, head_tile, col_ids):
      stats, at_ids = carry
      logits = tile_math.tile_logits(hidden_chunk, head_tile)
      stats = tile_math.accumulate_tile(stats, logits, col_ids, tokens_chunk)
      return stats, at_ids + tile_math.gather_at_ids(logits, col_ids, ids_chunk)

    init = (tile_math.init_stats(hidden_chunk.shape[0]),
            jnp.zeros(ids_chunk.shape, jnp.float32))
    stats, at_ids = _fold_over_vocab(step, init, head, vocab_tile)
    logprob, entropy, lse = (x[:, 0] for x in tile_math.finalize_stats(stats))
    return None, (logprob, entropy, lse, at_ids)

  _, outs = _over_token_chunks(
      chunk_fn, None, [hidden, tokens.astype(jnp.int32)[:, None], ids.astype(jnp.int32)],
      token_tile)
  return outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def token_stats_at_ids(hidden, head, tokens, ids, token_tile: int, vocab_tile: int):
  """hidden: [N, D], head: [D, V], tokens: int[N], ids: int[N, k] (distinct per row) ->
  (logprob f32[N], entropy f32[N], logits at ids f32[N, k]), never [N, V]."""
  logprob, entropy, _, at_ids = _stats_at_ids_forward(hidden, head, tokens, ids, token_tile,
                                                      vocab_tile)
  return logprob, entropy, at_ids


def _stats_at_ids_fwd(hidden, head, tokens, ids, token_tile, vocab_tile):
  logprob, entropy, lse, at_ids = _stats_at_ids_forward(hidden, head, tokens, ids, token_tile,
                                                        vocab_tile)
  return (logprob, entropy, at_ids), (hidden, head, tokens, ids, lse, entropy)


def _stats_at_ids_tile_grad(hidden_chunk, head_tile, rows, col_ids):
  tokens, ids, lse, entropy, g_logprob, g_entropy, g_ids = rows
  logits = tile_math.tile_logits(hidden_chunk, head_tile)
  grad = tile_math.logit_grad(logits, col_ids, tokens, lse, entropy, g_logprob, g_entropy)
  return tile_math.scatter_at_ids(grad, col_ids, ids, g_ids)


def _stats_at_ids_bwd(token_tile, vocab_tile, residuals, cotangents):
  hidden, head, tokens, ids, lse, entropy = residuals
  g_logprob, g_entropy, g_ids = cotangents
  rows = [tokens.astype(jnp.int32)[:, None], ids.astype(jnp.int32), lse[:, None],
          entropy[:, None], g_logprob.astype(jnp.float32)[:, None],
          g_entropy.astype(jnp.float32)[:, None], g_ids.astype(jnp.float32)]
  d_hidden, d_head = _head_grads(_stats_at_ids_tile_grad, hidden, head, rows, token_tile,
                                 vocab_tile)
  return d_hidden, d_head, None, None


token_stats_at_ids.defvjp(_stats_at_ids_fwd, _stats_at_ids_bwd)


# ------------------------------------------------------- two-model reverse KL
def _teacher_tile(teacher_head, col_ids, width):
  """The teacher's head columns matching the student's tile (same vocabulary ids)."""
  return lax.dynamic_slice_in_dim(teacher_head, col_ids[0, 0], width, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def reverse_kl(student_hidden, student_head, teacher_hidden, teacher_head, token_tile: int,
               vocab_tile: int):
  """Full-vocabulary KL(p_s || p_t) per token -> f32[N].

  Gradients reach the student only; the teacher's cotangents are zero (OPD never trains
  the teacher through the student's KL).
  """
  return _rkl_forward(student_hidden, student_head, teacher_hidden, teacher_head, token_tile,
                      vocab_tile)[0]


def _rkl_forward(student_hidden, student_head, teacher_hidden, teacher_head, token_tile,
                 vocab_tile):
  def chunk_fn(_, row_chunks):
    s_hidden, t_hidden = row_chunks

    def step(stats, student_tile, col_ids):
      zs = tile_math.tile_logits(s_hidden, student_tile)
      zt = tile_math.tile_logits(t_hidden, _teacher_tile(teacher_head, col_ids,
                                                         student_tile.shape[1]))
      return tile_math.accumulate_rkl_tile(stats, zs, zt)

    stats = _fold_over_vocab(step, tile_math.init_rkl_stats(s_hidden.shape[0]), student_head,
                             vocab_tile)
    return None, tuple(x[:, 0] for x in tile_math.finalize_rkl_stats(stats))

  _, outs = _over_token_chunks(chunk_fn, None, [student_hidden, teacher_hidden], token_tile)
  return outs


def _rkl_fwd(student_hidden, student_head, teacher_hidden, teacher_head, token_tile, vocab_tile):
  kl, s_lse, t_lse = _rkl_forward(student_hidden, student_head, teacher_hidden, teacher_head,
                                  token_tile, vocab_tile)
  return kl, (student_hidden, student_head, teacher_hidden, teacher_head, kl, s_lse, t_lse)


def _rkl_bwd(token_tile, vocab_tile, residuals, g_kl):
  student_hidden, student_head, teacher_hidden, teacher_head, kl, s_lse, t_lse = residuals

  def tile_grad(hidden_chunk, student_tile, rows, col_ids):
    t_hidden, kl, s_lse, t_lse, g_kl = rows
    zs = tile_math.tile_logits(hidden_chunk, student_tile)
    zt = tile_math.tile_logits(t_hidden, _teacher_tile(teacher_head, col_ids,
                                                       student_tile.shape[1]))
    return tile_math.rkl_student_logit_grad(zs, zt, s_lse, t_lse, kl, g_kl)

  rows = [teacher_hidden, kl[:, None], s_lse[:, None], t_lse[:, None],
          g_kl.astype(jnp.float32)[:, None]]
  d_hidden, d_head = _head_grads(tile_grad, student_hidden, student_head, rows, token_tile,
                                 vocab_tile)
  return d_hidden, d_head, jnp.zeros_like(teacher_hidden), jnp.zeros_like(teacher_head)


reverse_kl.defvjp(_rkl_fwd, _rkl_bwd)
