"""Teacher-forced log-probabilities: students, the reference and batched cross-expert teachers."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from copd_jax import kernels
from copd_jax.models import decoder, partitioning, qwen3_vl_decode
from copd_jax.models.decoder import Params
from copd_jax.models.qwen3_vl_config import Qwen3VLConfig
from copd_jax.rl.rows import (
  Rows,
  UpdateConfig,
  first_of_groups,
  join_rows,
  loss_targets,
  map_row_micro_batches,
  split_rows,
)


def is_qwen3_vl(ucfg: UpdateConfig) -> bool:
  """True when the policies are Qwen3-VL (rows' media: qwen3_vl_decode.PromptMedia)."""
  return isinstance(ucfg.model, Qwen3VLConfig)


def lm_head(params: Params, ucfg: UpdateConfig):
  """f32[D, V]: the policy's LM head (the embedding transposed when tied)."""
  return decoder.lm_head(params, ucfg.model.text if is_qwen3_vl(ucfg) else ucfg.model)


def opd_support_size(ucfg: UpdateConfig) -> int:
  """How many tokens a teacher sends per position: 0 for the sampled-token OPD estimator
  (it sends one log-prob), k for top_k, the vocabulary for full_vocab."""
  estimator = ucfg.loss.opd_estimator
  if estimator == "sampled_token":
    return 0
  if estimator == "top_k":
    return ucfg.loss.opd_top_k
  return (ucfg.model.text if is_qwen3_vl(ucfg) else ucfg.model).vocab_size


def _teacher_scores(hidden, head, targets, ucfg: UpdateConfig, support: int):
  """What a teacher computes from its hidden states [N, W, D]: the targets' log-probs
  f32[N, W] (support 0) or its top `support` tokens (log-probs f32[N, W, k], ids
  int32[N, W, k])."""
  if not support:
    return kernels.sampled_token_logprobs(hidden, head, targets, kernel=ucfg.kernel)
  return kernels.teacher_top_k(hidden, head, support, kernel=ucfg.kernel)


def _shared_prefix_hidden(params: Params, ucfg: UpdateConfig, prompt_tokens, prompt_positions,
                          prompt_mask, frames, tokens, positions):
  """Hidden states f32[N, R, D] that predict the R continuation tokens of N = B*G rows.

  prompt_*: [B, P] (frames: the prompts' media [B, ...] or None); tokens, positions:
  int32[N, R], row b*G + j continues prompt b. Each prompt runs once for its G rows
  (forward_hidden_shared_prefix); the prompt's last column predicts token 0. Qwen3-VL
  takes its positions from the media (PromptMedia.position_ids): the 1-D ones are unused."""
  g = tokens.shape[0] // prompt_tokens.shape[0]
  if is_qwen3_vl(ucfg):
    prompt_hidden, hidden = qwen3_vl_decode.forward_hidden_shared_prefix(
        params, ucfg.model, prompt_tokens, prompt_mask, frames, tokens)
  else:
    prompt_hidden, hidden = decoder.forward_hidden_shared_prefix(
        params, ucfg.model, prompt_tokens, prompt_positions, prompt_mask, frames, tokens,
        positions)
  b, _, d = prompt_hidden.shape
  last = jnp.broadcast_to(prompt_hidden[:, None, -1:], (b, g, 1, d)).reshape(b * g, 1, d)
  return jnp.concatenate([last, hidden[:, :-1]], axis=1)


def _response_hidden(params: Params, ucfg: UpdateConfig, tokens, positions, token_mask,
                     frames, prompt_len: int):
  """Hidden states f32[N, W, D] of the loss columns (loss_columns) of rows [N, T].

  With prompt_len P > 0 the rows come in groups of G = ucfg.samples_per_prompt that share
  their prompt (columns < P, and frames): each prompt runs once for its G rows and only
  the response columns run per row (_shared_prefix_hidden). With P = 0 every row runs
  whole."""
  if not prompt_len:
    if is_qwen3_vl(ucfg):
      raise ValueError("Qwen3-VL rows need their prompt length (prompt_len > 0): the media "
                       "belong to the prompt, which runs once for its samples")
    return decoder.forward_hidden(params, ucfg.model, tokens, positions, token_mask, frames)
  p, g = prompt_len, ucfg.samples_per_prompt
  first = lambda x: jax.tree.map(lambda y: first_of_groups(y, g), x)  # noqa: E731
  return _shared_prefix_hidden(params, ucfg, first(tokens[:, :p]), first(positions[:, :p]),
                               first(token_mask[:, :p]), first(frames),
                               tokens[:, p:], positions[:, p:])


def _sequence_logprobs(params: Params, ucfg: UpdateConfig, tokens, positions, token_mask,
                       frames, prompt_len: int = 0, support: int = 0):
  """Sampled-token log-probs f32[N, W] of rows under one model, on the loss columns (no
  gradient use); with support k > 0 the model's top k instead (_teacher_scores)."""
  hidden = _response_hidden(params, ucfg, tokens, positions, token_mask, frames, prompt_len)
  return _teacher_scores(hidden, lm_head(params, ucfg), loss_targets(tokens, prompt_len), ucfg,
                         support)


def _continuation_logprobs(params: Params, ucfg: UpdateConfig, prompt_tokens, prompt_positions,
                           prompt_mask, frames, tokens, positions, support: int = 0):
  """Log-probs f32[N, R] of the continuation tokens int32[N, R] (see _shared_prefix_hidden),
  or with support k > 0 the top k (_teacher_scores)."""
  hidden = _shared_prefix_hidden(params, ucfg, prompt_tokens, prompt_positions, prompt_mask,
                                 frames, tokens, positions)
  return _teacher_scores(hidden, lm_head(params, ucfg), tokens, ucfg, support)


def _identity(x):
  return x


def score_by_teachers(teacher_params: Params, rows: Rows, routing: dict, ucfg: UpdateConfig,
                      placement: tuple[Callable, Callable] | None = None,
                      cross_row_start: int = 0, prompt_len: int = 0):
  """Sampled-token log-probs of each cross row under its teacher, on the loss columns:
  f32[S, R, W] (W = T - P with prompt_len P > 0, else T; see loss_columns). With the
  top_k / full_vocab OPD estimators (opd_support_size k > 0) instead the teacher's top k
  at each position: (log-probs f32[S, R, W, k], ids int32[S, R, W, k]).

  The regroup is an all-to-all over the expert axis (see TeacherRouting):
    1. each student gathers, from its OWN rows, the rows it sends to each teacher into a
       buffer [S, J, C, ...] (a local gather: nothing crosses experts);
    2. swapping the first two axes, [S, J, C] -> [J, S, C], is the exchange: each device
       sends only its own rows' tokens;
    3. teacher j scores its [S*C] rows (one vmapped forward over teachers, in
       micro-batches of ucfg.micro_batch_rows rows);
    4. the scores swap back [J, S, C, W] -> [S, J, C, W] and each student unpacks its own.
  What crosses: token ids with the token mask packed in (-1 = masked), the frames once
  per prompt, and f32 log-probs of the loss columns (k of them and k int32 ids per
  position for top-k OPD: never logits). Positions are recomputed from
  the mask on the teacher side (rows' positions are positions_from_mask(token_mask), as
  rows.rollout_to_sequences builds them).

  cross_row_start (static): rows before it are native rows, never sent (the local gather
    reads rows [cross_row_start:] only).
  prompt_len (static, 0 = unknown): the prompt columns P. With it the prompt tokens move
    once per prompt (not once per sample), the teacher runs each prompt once for its G
    rows (_response_hidden), and only the scores of the response columns travel back.
  placement: optional (exchange, compute) sharding constraints from
    sharding.RunSharding.regroup_placement: `exchange` pins a buffer [A, B, C, ...] to
    expert on axis A, its rows C spread over the devices of each expert group; `compute`
    pins teacher-side rows [J, N, ...] to expert x batch.
  """
  exchange, compute = placement or (_identity, _identity)
  teacher_axis = "expert" if placement is not None else None  # see update_body
  send_row, prompt_row = routing["send_row"], routing["send_prompt_row"]
  s, j, c = send_row.shape
  g = c // prompt_row.shape[2]
  t = rows.tokens.shape[-1]
  if not 0 <= prompt_len < t:
    raise ValueError(f"prompt_len={prompt_len} must be in [0, rows' length {t})")
  if prompt_len and g != ucfg.samples_per_prompt:
    raise ValueError(f"routing groups {g} rows per prompt but ucfg.samples_per_prompt is "
                     f"{ucfg.samples_per_prompt}")
  start = cross_row_start
  support = opd_support_size(ucfg)

  def local(x, index):  # x [S, R, ...], index [S, J, C'] -> [S, J, C', ...], per student
    return jax.vmap(lambda xk, ik: jnp.take(xk, ik, axis=0))(x[:, start:],
                                                            jnp.maximum(index - start, 0))

  def swap(x):  # the all-to-all over `expert`: [A, B, ...] -> [B, A, ...]
    return exchange(jnp.swapaxes(exchange(x), 0, 1))

  def teacher_rows(x):  # [J, S, C', ...] -> [J, S*C', ...] on the teachers' devices
    return compute(x.reshape((j, -1) + x.shape[3:]))

  packed = jnp.where(rows.token_mask, rows.tokens, -1)  # the mask travels inside the ids
  valid = jnp.swapaxes(routing["send_valid"], 0, 1)  # [J, S, C]
  # The media travel once per prompt (the toy's frames, or Qwen3-VL's PromptMedia).
  frames = jax.tree.map(lambda x: teacher_rows(swap(local(x, prompt_row))), rows.frames)
  if prompt_len:
    p = prompt_len
    prompt = swap(local(packed[..., :p], prompt_row))  # [J, S, C // G, P]
    response = teacher_rows(swap(local(packed[..., p:], send_row)))  # [J, S*C, R]
    # Padding slots' prompts attend to their last column only: a finite, unused softmax.
    prompt_mask = teacher_rows(jnp.where(valid[:, :, ::g, None], prompt >= 0,
                                         jnp.arange(p) == p - 1))
    prompt_tokens = teacher_rows(jnp.maximum(prompt, 0))
    response_mask = response >= 0
    prompt_positions = decoder.positions_from_mask(
        prompt_mask.reshape(-1, p)).reshape(prompt_mask.shape)
    counts = jnp.repeat(prompt_mask.sum(-1), g, axis=1)[..., None]  # [J, S*C, 1]
    response_positions = jnp.maximum(counts + jnp.cumsum(response_mask, -1) - 1, 0)

    def one_teacher(params, p_tok, p_pos, p_msk, frm, r_tok, r_pos):
      chunk = functools.partial(_continuation_logprobs, params, ucfg, support=support)
      return _map_prompt_micro_batches(chunk, ucfg.micro_batch_rows, g,
                                       (p_tok, p_pos, p_msk, frm), (r_tok, r_pos))

    scores = partitioning.map_over_branches(
        one_teacher, jax.lax.stop_gradient(teacher_params), prompt_tokens, prompt_positions,
        prompt_mask, frames, jnp.maximum(response, 0), response_positions,
        spmd_axis_name=teacher_axis)  # [J, S*C, R (, k)]
  else:
    if is_qwen3_vl(ucfg):
      raise ValueError("teacher scoring of Qwen3-VL rows needs prompt_len > 0")
    packed = swap(local(packed, send_row))  # [J, S, C, T]
    # Padding rows attend to their first column only, so their (unused) softmax stays finite.
    mask = teacher_rows(jnp.where(valid[..., None], packed >= 0, jnp.arange(t) == 0))
    tokens = teacher_rows(jnp.maximum(packed, 0))
    if frames is not None:
      frames = compute(jnp.repeat(frames.reshape((j, s, c // g) + frames.shape[2:]), g,
                                  axis=2).reshape((j, s * c) + frames.shape[2:]))

    def one_teacher(params, tok, msk, frm):
      def chunk(tk, mk, fr):
        return _sequence_logprobs(params, ucfg, tk, decoder.positions_from_mask(mk), mk, fr,
                                  support=support)
      return map_row_micro_batches(chunk, ucfg.micro_batch_rows, tok, msk, frm)

    scores = partitioning.map_over_branches(
        one_teacher, jax.lax.stop_gradient(teacher_params), tokens, mask, frames,
        spmd_axis_name=teacher_axis)  # [J, S*C, T (, k)]

  def back_to_students(x):  # [J, S*C, W, ...] -> [S, R, W, ...]
    x = swap(compute(x).reshape((j, s, c) + x.shape[2:])).reshape((s, j * c) + x.shape[2:])
    return jax.vmap(lambda y, slot: jnp.take(y, slot, axis=0))(x, routing["receive_slot"])
  return jax.tree.map(back_to_students, scores)


def _map_prompt_micro_batches(fn: Callable, micro_batch_rows: int, group: int,
                              prompt_arrays: tuple, row_arrays: tuple):
  """fn(*prompt_arrays, *row_arrays) -> [N, ...] over micro-batches of whole prompts:
  prompt_arrays [B, ...] (None allowed), row_arrays [N = B*G, ...] (row b*G + j belongs to
  prompt b); each micro-batch holds micro_batch_rows // G prompts and their rows."""
  count = row_arrays[0].shape[0]
  if not micro_batch_rows or micro_batch_rows >= count:
    return fn(*prompt_arrays, *row_arrays)
  per = micro_batch_rows // group
  prompts = jax.tree.map(lambda x: split_rows(x, per), prompt_arrays)
  rows = jax.tree.map(lambda x: split_rows(x, micro_batch_rows, group), row_arrays)
  out = jax.lax.map(lambda chunk: fn(*chunk[0], *chunk[1]), (prompts, rows))
  return jax.tree.map(lambda x: join_rows(x, count, group), out)


def reference_logprobs(ref_params: Params, rows: Rows, ucfg: UpdateConfig, prompt_len: int = 0):
  """Sampled-token log-probs of every student's rows under one frozen reference policy
  (the shared base) on the loss columns: f32[S, R, W], for the KL-to-reference penalty (in
  micro-batches of ucfg.micro_batch_rows rows)."""
  ref_params = jax.lax.stop_gradient(ref_params)
  group = ucfg.samples_per_prompt if prompt_len else 1

  def one_student(r):
    return map_row_micro_batches(
        functools.partial(_sequence_logprobs, ref_params, ucfg, prompt_len=prompt_len),
        ucfg.micro_batch_rows, r.tokens, r.positions, r.token_mask, r.frames, group=group)
  return jax.vmap(one_student)(rows)
