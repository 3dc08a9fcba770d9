"""Pallas backend: TPU Mosaic kernels over a (token tile, vocabulary tile) grid.

Forward: grid (token tiles, vocab tiles), vocab innermost; per-token online statistics
live in f32 VMEM scratch and are written once, at the last vocabulary tile.
Backward (custom VJP, logits recomputed per tile, never stored), two kernels as in
flash-attention backward passes, because each output block must be owned by one grid row:
  d_hidden: grid (token tiles, vocab tiles), f32 [tm, D] accumulator, reduce over vocab;
  d_head:   grid (vocab tiles, token tiles), f32 [D, tv] accumulator, reduce over tokens.

Teacher top-k: a forward-only kernel on the same grid keeps a running [tm, k] top-k in
VMEM, merged per tile by k rounds of max-selection (no sort or concat inside the kernel).

Ragged edges: the grid is cdiv-sized; edge blocks read past the array (garbage, NaN in
TPU interpret mode) and every kernel masks rows >= N and columns >= V before they can
reach a sum, so no padded copy of the head or the hidden states is ever made.

VMEM. Every kernel keeps whole [token_tile, D] row blocks (and [D, vocab_tile] head
blocks) in VMEM and asks the Mosaic compiler for a scoped-VMEM limit of 3/4 of its TPU
generation's VMEM per core (`CompilerParams(vmem_limit_bytes=...)`); the default tiles are
chosen per generation from a byte model of each kernel (kernels/tpu_tiles.py, which says
why). The compiler's default limit (16 MiB on v5e and v5p) is too small at real sizes: at
8,192 tokens, D = 2,560, V = 151,936, bf16, with 256 x 512 tiles, the d_hidden kernel
needs 18.4 MiB, d_head 21.8 MiB, the reverse-KL kernels up to 29.6 MiB, top-k 17.1 MiB
(the compiler's figures on v5p). The hidden dimension is not tiled: a D-split grid
re-reads the hidden states once per vocabulary tile (tpu_tiles has the arithmetic).
tests/kernels/test_pallas_tpu.py compiles every kernel for v5e, v5p and v6e.

Not done here: dimension_semantics: jax 0.10.2's pallas vmap rule prepends a grid axis but
keeps the user's dimension_semantics tuple, which breaks vmap over the expert axis, so
all axes stay 'arbitrary' (no megacore split on two-TensorCore chips such as v5p).
Runs on CPU only in interpret mode; no GPU lowering.

Meshes. A Mosaic kernel cannot be partitioned by XLA: on a multi-device mesh call the ops
inside `jax.shard_map` (each device runs the kernels on its own tokens). There, with
check_vma=True, the outputs declare the mesh axes they vary over and the head's
cotangent is summed over the axes the head is replicated on (tests/kernels/test_ops.py pins
this to the full-batch reference). Pallas's generic interpreter (interpret=True) cannot
run under check_vma; TPU interpret mode can.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from copd_jax.kernels import tile_math, tpu_tiles
from copd_jax.kernels.tpu_tiles import Tiles


def interpret_arg(mode):
  """KernelConfig.interpret -> pallas_call's `interpret` argument."""
  if mode == "tpu":
      # NaN for out-of-bounds reads, so a missing edge mask shows up in tests.
    return pltpu.InterpretParams(out_of_bounds_reads="uninitialized",
                                 uninitialized_memory="nan")
  return bool(mode)


def _tiles(num_tokens: int, vocab: int, tiles: Tiles):
  tm, tv = min(tiles.token_tile, num_tokens), min(tiles.vocab_tile, vocab)
  return tm, tv, pl.cdiv(num_tokens, tm), pl.cdiv(vocab, tv)


def _out_struct(shape, dtype, *operands):
  """A kernel output's type. Inside `jax.shard_map` (check_vma=True) a kernel output
  varies over every mesh axis one of its operands varies over (tokens split over the
  data axis make the per-token outputs, and each device's partial head gradient, vary)."""
  varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in operands))
  return jax.ShapeDtypeStruct(shape, dtype,
                              manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def _sum_over_extra_axes(cotangent, primal):
  """Inside `jax.shard_map` (check_vma=True): a primal invariant over a mesh axis (a head
  replicated over the data axis) gets the sum of its per-device cotangents over that axis,
  as JAX's own transpose of a broadcast would give it."""
  extra = (jax.typeof(cotangent).manual_axis_type.varying
           - jax.typeof(primal).manual_axis_type.varying)
  return lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


def _compiler_params(tiles: Tiles):
  """Scoped-VMEM limit of the generation (tpu_tiles: the compiler's default is too small
  for [tm, D] row blocks at real D); ignored in interpret mode."""
  return pltpu.CompilerParams(vmem_limit_bytes=tiles.vmem_limit_bytes)


def _col_ids(col_tile_index, shape, tv):
  return col_tile_index * tv + lax.broadcasted_iota(jnp.int32, shape, 1)


def _row_ids(row_tile_index, shape, tm):
  return row_tile_index * tm + lax.broadcasted_iota(jnp.int32, shape, 0)


def _row_spec(tm, width, token_axis):
  """Block of a per-token array [N, width]; token_axis = grid axis of the token tile."""
  if token_axis == 0:
    return pl.BlockSpec((tm, width), lambda i, j: (i, 0))
  return pl.BlockSpec((tm, width), lambda j, i: (i, 0))


def _col_spec(rows, tv, token_axis):
  """Block of a per-vocabulary array [rows, V] (a head)."""
  if token_axis == 0:
    return pl.BlockSpec((rows, tv), lambda i, j: (0, j))
  return pl.BlockSpec((rows, tv), lambda j, i: (0, j))


def _column(x):
  """[N] -> [N, 1]: per-token vectors travel as columns (broadcast against [tm, tv])."""
  return x.reshape(-1, 1)


# ------------------------------------------------------------------ forward kernels
def _stats_kernel(hidden_ref, head_ref, tokens_ref, logprob_ref, entropy_ref, lse_ref,
                  max_ref, sum_ref, shifted_ref, target_ref, *, vocab, tv):
  j = pl.program_id(1)
  scratch = (max_ref, sum_ref, shifted_ref, target_ref)

  @pl.when(j == 0)
  def _init():
    for ref, value in zip(scratch, tile_math.init_stats(max_ref.shape[0])):
      ref[...] = value

  logits = tile_math.tile_logits(hidden_ref[...], head_ref[...])
  cols = _col_ids(j, logits.shape, tv)
  stats = tile_math.accumulate_tile(tile_math.SoftmaxStats(*(r[...] for r in scratch)),
                                    logits, cols, tokens_ref[...], cols < vocab)
  for ref, value in zip(scratch, stats):
    ref[...] = value

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    logprob, entropy, lse = tile_math.finalize_stats(stats)
    logprob_ref[...], entropy_ref[...], lse_ref[...] = logprob, entropy, lse


def _stats_forward(hidden, head, tokens, tiles, interpret):
  """-> (logprob, entropy, lse), each f32[N, 1]."""
  (n, d), vocab = hidden.shape, head.shape[1]
  tm, tv, grid_rows, grid_cols = _tiles(n, vocab, tiles)
  column = _out_struct((n, 1), jnp.float32, hidden, head, tokens)
  return pl.pallas_call(
      functools.partial(_stats_kernel, vocab=vocab, tv=tv),
      out_shape=(column, column, column),
      grid=(grid_rows, grid_cols),
      in_specs=[_row_spec(tm, d, 0), _col_spec(d, tv, 0), _row_spec(tm, 1, 0)],
      out_specs=[_row_spec(tm, 1, 0)] * 3,
      scratch_shapes=[pltpu.VMEM((tm, 1), jnp.float32)] * 4,
      compiler_params=_compiler_params(tiles),
      interpret=interpret_arg(interpret),
      name="token_logprob_entropy_fwd",
  )(hidden, head, _column(tokens.astype(jnp.int32)))


def _rkl_kernel(s_hidden_ref, s_head_ref, t_hidden_ref, t_head_ref, kl_ref, s_lse_ref,
                t_lse_ref, *scratch, vocab, tv):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    for ref, value in zip(scratch, tile_math.init_rkl_stats(scratch[0].shape[0])):
      ref[...] = value

  zs = tile_math.tile_logits(s_hidden_ref[...], s_head_ref[...])
  zt = tile_math.tile_logits(t_hidden_ref[...], t_head_ref[...])
  valid = _col_ids(j, zs.shape, tv) < vocab
  stats = tile_math.accumulate_rkl_tile(tile_math.ReverseKLStats(*(r[...] for r in scratch)),
                                        zs, zt, valid)
  for ref, value in zip(scratch, stats):
    ref[...] = value

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    kl_ref[...], s_lse_ref[...], t_lse_ref[...] = tile_math.finalize_rkl_stats(stats)


def _rkl_forward(s_hidden, s_head, t_hidden, t_head, tiles, interpret):
  """-> (KL, student lse, teacher lse), each f32[N, 1]."""
  (n, ds), dt, vocab = s_hidden.shape, t_hidden.shape[1], s_head.shape[1]
  tm, tv, grid_rows, grid_cols = _tiles(n, vocab, tiles)
  column = _out_struct((n, 1), jnp.float32, s_hidden, s_head, t_hidden, t_head)
  return pl.pallas_call(
      functools.partial(_rkl_kernel, vocab=vocab, tv=tv),
      out_shape=(column, column, column),
      grid=(grid_rows, grid_cols),
      in_specs=[_row_spec(tm, ds, 0), _col_spec(ds, tv, 0),
                _row_spec(tm, dt, 0), _col_spec(dt, tv, 0)],
      out_specs=[_row_spec(tm, 1, 0)] * 3,
      scratch_shapes=[pltpu.VMEM((tm, 1), jnp.float32)] * 5,
      compiler_params=_compiler_params(tiles),
      interpret=interpret_arg(interpret),
      name="reverse_kl_fwd",
  )(s_hidden, s_head, t_hidden, t_head)


def _top_k_kernel(hidden_ref, head_ref, values_ref, ids_ref, max_ref, sum_ref, best_values_ref,
                  best_ids_ref, *, vocab, tv, k):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    max_ref[...] = jnp.full(max_ref.shape, tile_math.NEG_INIT, jnp.float32)
    sum_ref[...] = jnp.zeros_like(sum_ref)
    best_values_ref[...] = jnp.full(best_values_ref.shape, -jnp.inf, jnp.float32)
    best_ids_ref[...] = jnp.zeros_like(best_ids_ref)

  logits = tile_math.tile_logits(hidden_ref[...], head_ref[...])
  cols = _col_ids(j, logits.shape, tv)
  valid = cols < vocab
  # Online log-sum-exp (the normaliser of the top-k log-probs).
  masked = jnp.where(valid, logits, tile_math.NEG_INIT)
  m_new = jnp.maximum(max_ref[...], jnp.max(masked, axis=1, keepdims=True))
  tile_sum = jnp.sum(jnp.where(valid, jnp.exp(masked - m_new), 0.0), axis=1, keepdims=True)
  sum_ref[...] = jnp.exp(max_ref[...] - m_new) * sum_ref[...] + tile_sum
  max_ref[...] = m_new
  best_values, best_ids = tile_math.merge_top_k(best_values_ref[...], best_ids_ref[...], logits,
                                                cols, k, valid)
  best_values_ref[...], best_ids_ref[...] = best_values, best_ids

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    values_ref[...] = best_values - (max_ref[...] + jnp.log(sum_ref[...]))
    ids_ref[...] = best_ids


def top_k_logprobs(hidden, head, k: int, token_tile: int | None, vocab_tile: int | None,
                   interpret):
  """-> (top-k log-probs f32[N, k], ids int32[N, k]), largest first; not differentiable.

  token_tile / vocab_tile: None picks the TPU generation's default (tpu_tiles).
  """
  (n, d), vocab = hidden.shape, head.shape[1]
  tiles = tpu_tiles.resolve_tiles(token_tile, vocab_tile, hidden=d, hidden_dtype=hidden.dtype,
                                  head_dtype=head.dtype, op="top_k_logprobs", top_k=k)
  tm, tv, grid_rows, grid_cols = _tiles(n, vocab, tiles)
  return pl.pallas_call(
      functools.partial(_top_k_kernel, vocab=vocab, tv=tv, k=k),
      out_shape=(_out_struct((n, k), jnp.float32, hidden, head),
                 _out_struct((n, k), jnp.int32, hidden, head)),
      grid=(grid_rows, grid_cols),
      in_specs=[_row_spec(tm, d, 0), _col_spec(d, tv, 0)],
      out_specs=[_row_spec(tm, k, 0)] * 2,
      scratch_shapes=[pltpu.VMEM((tm, 1), jnp.float32), pltpu.VMEM((tm, 1), jnp.float32),
                      pltpu.VMEM((tm, k), jnp.float32), pltpu.VMEM((tm, k), jnp.int32)],
      compiler_params=_compiler_params(tiles),
      interpret=interpret_arg(interpret),
      name="top_k_logprobs",
  )(hidden, head)


# ---------------------------------------------------------- generic backward pair
def _load_masked(hidden_ref, head_ref, row_tile, col_tile, *, num_tokens, vocab, tm, tv):
  """Load the tiles with rows >= N and columns >= V zeroed (edge blocks hold garbage)."""
  hidden, head = hidden_ref[...], head_ref[...]
  row_valid = _row_ids(row_tile, (hidden.shape[0], 1), tm) < num_tokens
  col_valid = _col_ids(col_tile, (1, head.shape[1]), tv) < vocab
  hidden = jnp.where(row_valid, hidden, jnp.zeros_like(hidden))
  head = jnp.where(col_valid, head, jnp.zeros_like(head))
  return hidden, head, row_valid, col_valid


def _d_hidden_kernel(*refs, tile_dlogits, num_row_inputs, num_tokens, vocab, tm, tv):
  """Grid (token tile i, vocab tile j): d_hidden[i] = sum_j dlogits_ij @ head_j^T."""
  hidden_ref, head_ref = refs[:2]
  row_refs = refs[2:2 + num_row_inputs]
  col_refs = refs[2 + num_row_inputs:-2]
  out_ref, acc_ref = refs[-2:]
  i, j = pl.program_id(0), pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  hidden, head, row_valid, col_valid = _load_masked(
      hidden_ref, head_ref, i, j, num_tokens=num_tokens, vocab=vocab, tm=tm, tv=tv)
  dlogits = tile_dlogits(hidden, head, [r[...] for r in row_refs],
                         [r[...] for r in col_refs], j * tv, col_valid)
  d_hidden, _ = _grad_pair(hidden, head, dlogits, want_head=False)
  acc_ref[...] += d_hidden

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _d_head_kernel(*refs, tile_dlogits, num_row_inputs, num_tokens, vocab, tm, tv):
  """Grid (vocab tile j, token tile i): d_head[j] = sum_i hidden_i^T @ dlogits_ij."""
  hidden_ref, head_ref = refs[:2]
  row_refs = refs[2:2 + num_row_inputs]
  col_refs = refs[2 + num_row_inputs:-2]
  out_ref, acc_ref = refs[-2:]
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  hidden, head, row_valid, col_valid = _load_masked(
      hidden_ref, head_ref, i, j, num_tokens=num_tokens, vocab=vocab, tm=tm, tv=tv)
  dlogits = tile_dlogits(hidden, head, [r[...] for r in row_refs],
                         [r[...] for r in col_refs], j * tv, col_valid)
  # Garbage rows of the per-token inputs must not reach the sum over tokens.
  dlogits = jnp.where(row_valid, dlogits, 0.0)
  _, d_head = _grad_pair(hidden, head, dlogits, want_head=True)
  acc_ref[...] += d_head

  @pl.when(i == pl.num_programs(1) - 1)
  def _finish():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _grad_pair(hidden, head, dlogits, *, want_head):
  dz = dlogits.astype(hidden.dtype)
  if want_head:
    return None, lax.dot_general(hidden, dz, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
  return lax.dot_general(dz, head.astype(hidden.dtype), (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32), None


def _backward(tile_dlogits, hidden, head, row_inputs, col_inputs, tiles, interpret):
  """Run the d_hidden and d_head kernels. row_inputs: [N, w] arrays; col_inputs: [r, V].

  tile_dlogits(hidden_tile, head_tile, row_tiles, col_tiles, col_start, col_valid)
    -> dlogits f32[tm, tv], zero at invalid columns.
  """
  (n, d), vocab = hidden.shape, head.shape[1]
  tm, tv, grid_rows, grid_cols = _tiles(n, vocab, tiles)
  static = dict(tile_dlogits=tile_dlogits, num_row_inputs=len(row_inputs), num_tokens=n,
                vocab=vocab, tm=tm, tv=tv)

  def specs(token_axis):
    return ([_row_spec(tm, d, token_axis), _col_spec(d, tv, token_axis)]
            + [_row_spec(tm, x.shape[1], token_axis) for x in row_inputs]
            + [_col_spec(x.shape[0], tv, token_axis) for x in col_inputs])

  operands = (hidden, head, *row_inputs, *col_inputs)
  d_hidden = pl.pallas_call(
      functools.partial(_d_hidden_kernel, **static),
      out_shape=_out_struct(hidden.shape, hidden.dtype, *operands),
      grid=(grid_rows, grid_cols),
      in_specs=specs(0),
      out_specs=_row_spec(tm, d, 0),
      scratch_shapes=[pltpu.VMEM((tm, d), jnp.float32)],
      compiler_params=_compiler_params(tiles),
      interpret=interpret_arg(interpret),
      name="lm_head_d_hidden",
  )(*operands)
  d_head = pl.pallas_call(
      functools.partial(_d_head_kernel, **static),
      out_shape=_out_struct(head.shape, head.dtype, *operands),
      grid=(grid_cols, grid_rows),
      in_specs=specs(1),
      out_specs=_col_spec(d, tv, 1),
      scratch_shapes=[pltpu.VMEM((d, tv), jnp.float32)],
      compiler_params=_compiler_params(tiles),
      interpret=interpret_arg(interpret),
      name="lm_head_d_head",
  )(*operands)
  return _sum_over_extra_axes(d_hidden, hidden), _sum_over_extra_axes(d_head, head)


# ------------------------------------------------------------ log-prob + entropy op
def _stats_dlogits(hidden, head, row_tiles, col_tiles, col_start, col_valid):
  tokens, lse, entropy, g_logprob, g_entropy = row_tiles
  logits = tile_math.tile_logits(hidden, head)
  cols = col_start + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  return tile_math.logit_grad(logits, cols, tokens, lse, entropy, g_logprob, g_entropy,
                              col_valid)


def token_logprob_entropy(hidden, head, tokens, token_tile: int | None,
                          vocab_tile: int | None, interpret):
  """hidden: [N, D], head: [D, V], tokens: int[N] -> (logprob f32[N], entropy f32[N]).

  token_tile / vocab_tile: None picks the TPU generation's default (tpu_tiles).
  """
  tiles = tpu_tiles.resolve_tiles(token_tile, vocab_tile, hidden=hidden.shape[1],
                                  hidden_dtype=hidden.dtype, head_dtype=head.dtype,
                                  op="token_logprob_entropy")
  return _token_logprob_entropy(hidden, head, tokens, tiles, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _token_logprob_entropy(hidden, head, tokens, tiles: Tiles, interpret):
  logprob, entropy, _ = _stats_forward(hidden, head, tokens, tiles, interpret)
  return logprob[:, 0], entropy[:, 0]


def _stats_fwd(hidden, head, tokens, tiles, interpret):
  logprob, entropy, lse = _stats_forward(hidden, head, tokens, tiles, interpret)
  return (logprob[:, 0], entropy[:, 0]), (hidden, head, tokens, lse, entropy)


def _stats_bwd(tiles, interpret, residuals, cotangents):
  hidden, head, tokens, lse, entropy = residuals
  g_logprob, g_entropy = (_column(g.astype(jnp.float32)) for g in cotangents)
  row_inputs = [_column(tokens.astype(jnp.int32)), lse, entropy, g_logprob, g_entropy]
  d_hidden, d_head = _backward(_stats_dlogits, hidden, head, row_inputs, [], tiles, interpret)
  return d_hidden, d_head, None


_token_logprob_entropy.defvjp(_stats_fwd, _stats_bwd)


# -------------------------------------------------------------- reverse KL op
def _rkl_dlogits(hidden, head, row_tiles, col_tiles, col_start, col_valid):
  t_hidden, kl, s_lse, t_lse, g_kl = row_tiles
  (t_head,) = col_tiles
  zs = tile_math.tile_logits(hidden, head)
  # Teacher garbage columns are harmless: the gradient is masked by col_valid after.
  zt = tile_math.tile_logits(t_hidden, t_head)
  return tile_math.rkl_student_logit_grad(zs, zt, s_lse, t_lse, kl, g_kl, col_valid)


def reverse_kl(s_hidden, s_head, t_hidden, t_head, token_tile: int | None,
               vocab_tile: int | None, interpret):
  """KL(p_student || p_teacher) per token -> f32[N]; gradients to the student only.

  token_tile / vocab_tile: None picks the TPU generation's default (tpu_tiles).
  """
  tiles = tpu_tiles.resolve_tiles(token_tile, vocab_tile, hidden=s_hidden.shape[1],
                                  hidden_dtype=s_hidden.dtype, head_dtype=s_head.dtype,
                                  op="reverse_kl", teacher_hidden=t_hidden.shape[1])
  return _reverse_kl(s_hidden, s_head, t_hidden, t_head, tiles, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _reverse_kl(s_hidden, s_head, t_hidden, t_head, tiles: Tiles, interpret):
  kl, _, _ = _rkl_forward(s_hidden, s_head, t_hidden, t_head, tiles, interpret)
  return kl[:, 0]


def _rkl_fwd(s_hidden, s_head, t_hidden, t_head, tiles, interpret):
  kl, s_lse, t_lse = _rkl_forward(s_hidden, s_head, t_hidden, t_head, tiles, interpret)
  return kl[:, 0], (s_hidden, s_head, t_hidden, t_head, kl, s_lse, t_lse)


def _rkl_bwd(tiles, interpret, residuals, g_kl):
  s_hidden, s_head, t_hidden, t_head, kl, s_lse, t_lse = residuals
  row_inputs = [t_hidden, kl, s_lse, t_lse, _column(g_kl.astype(jnp.float32))]
  d_hidden, d_head = _backward(_rkl_dlogits, s_hidden, s_head, row_inputs, [t_head], tiles,
                               interpret)
  return d_hidden, d_head, jnp.zeros_like(t_hidden), jnp.zeros_like(t_head)


_reverse_kl.defvjp(_rkl_fwd, _rkl_bwd)
