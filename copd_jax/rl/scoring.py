"""Teacher-forced log-probabilities: students, the reference and batched cross-expert teachers."""
from __future__ import annotations

import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from copd_jax import kernels
from copd_jax.models import decoder, lora, partitioning
from copd_jax.models.decoder import Params
from copd_jax.rl import teacher_lanes
from copd_jax.rl.rows import (
  RowInputs,
  Rows,
  UpdateConfig,
  first_of_groups,
  join_rows,
  loss_targets,
  map_row_micro_batches,
  split_rows,
)


def lm_head(params: Params, ucfg: UpdateConfig):
  """f32[D, V]: the policy's LM head (the embedding transposed when tied)."""
  return ucfg.policy.lm_head(params)


def opd_support_size(ucfg: UpdateConfig) -> int:
  """How many tokens a teacher sends per position: 0 for the sampled-token OPD estimator
  (it sends one log-prob), k for top_k, the vocabulary for full_vocab."""
  estimator = ucfg.loss.opd_estimator
  if estimator == "sampled_token":
    return 0
  if estimator == "top_k":
    return ucfg.loss.opd_top_k
  return ucfg.policy.text.vocab_size


def _teacher_scores(hidden, head, targets, ucfg: UpdateConfig, support: int):
  """What a teacher computes from its hidden states [N, W, D]: the targets' log-probs
  f32[N, W] (support 0) or its top `support` tokens (log-probs f32[N, W, k], ids
  int32[N, W, k])."""
  if not support:
    return kernels.sampled_token_logprobs(hidden, head, targets, kernel=ucfg.kernel)
  return kernels.teacher_top_k(hidden, head, support, kernel=ucfg.kernel)


def _shared_prefix_hidden(params: Params, ucfg: UpdateConfig, prompt: RowInputs, tokens,
                          positions):
  """Hidden states f32[N, R, D] that predict the R continuation tokens of N = B*G rows.

  prompt: the prompts' RowInputs [B, P] (frames: their media [B, ...] or None); tokens,
  positions: int32[N, R], row b*G + j continues prompt b. Each prompt runs once for its G
  rows (Policy.shared_prefix_hidden); the prompt's last column predicts token 0. Qwen3-VL
  takes its positions from the media (PromptMedia.position_ids): the 1-D ones are unused."""
  g = tokens.shape[0] // prompt.tokens.shape[0]
  prompt_hidden, hidden = ucfg.policy.shared_prefix_hidden(
      params, prompt.tokens, prompt.positions, prompt.token_mask, prompt.frames, tokens,
      positions)
  b, _, d = prompt_hidden.shape
  last = jnp.broadcast_to(prompt_hidden[:, None, -1:], (b, g, 1, d)).reshape(b * g, 1, d)
  return jnp.concatenate([last, hidden[:, :-1]], axis=1)


def _response_hidden(params: Params, ucfg: UpdateConfig, inputs: RowInputs, prompt_len: int):
  """Hidden states f32[N, W, D] of the loss columns (loss_columns) of rows [N, T]
  (inputs: their RowInputs).

  With prompt_len P > 0 the rows come in groups of G = ucfg.samples_per_prompt that share
  their prompt (columns < P, and frames): each prompt runs once for its G rows and only
  the response columns run per row (_shared_prefix_hidden). With P = 0 every row runs
  whole."""
  if not prompt_len:  # (Qwen3-VL refuses: its media belong to the prompt)
    return ucfg.policy.rows_hidden(params, *inputs)
  p, g = prompt_len, ucfg.samples_per_prompt
  first = lambda x: jax.tree.map(lambda y: first_of_groups(y, g), x)  # noqa: E731
  tokens, positions, token_mask, frames = inputs
  prompt = RowInputs(first(tokens[:, :p]), first(positions[:, :p]), first(token_mask[:, :p]),
                     first(frames))
  return _shared_prefix_hidden(params, ucfg, prompt, tokens[:, p:], positions[:, p:])


def _sequence_logprobs(params: Params, ucfg: UpdateConfig, inputs: RowInputs,
                       prompt_len: int = 0, support: int = 0):
  """Sampled-token log-probs f32[N, W] of rows [N, T] (inputs: their RowInputs) under one
  model, on the loss columns (no gradient use); with support k > 0 the model's top k
  instead (_teacher_scores)."""
  hidden = _response_hidden(params, ucfg, inputs, prompt_len)
  return _teacher_scores(hidden, lm_head(params, ucfg), loss_targets(inputs.tokens, prompt_len),
                         ucfg, support)


def _continuation_logprobs(params: Params, ucfg: UpdateConfig, prompt: RowInputs, tokens,
                           positions):
  """A teacher's scores of the continuation tokens int32[N, R] (see _shared_prefix_hidden):
  their log-probs f32[N, R], or for the top_k / full_vocab OPD estimators its top k
  (opd_support_size, _teacher_scores)."""
  hidden = _shared_prefix_hidden(params, ucfg, prompt, tokens, positions)
  return _teacher_scores(hidden, lm_head(params, ucfg), tokens, ucfg, opd_support_size(ucfg))


def _identity(x):
  return x


def teachers_share_one_shape() -> bool:
  """True when every teacher's forward must take one shape: under a mesh whose `expert`
  axis spreads the teachers over several device groups (one SPMD call per round over
  the lanes; see teacher_lanes). Otherwise (one device, or every branch on every
  device) each group of teachers with equal loads runs its own call, on exactly its
  rows."""
  mesh = jax.sharding.get_abstract_mesh()
  return (mesh is not None and not mesh.empty and "expert" in mesh.axis_names
          and mesh.shape["expert"] > 1)


def teacher_call_groups(loads, equal: bool) -> list[tuple[np.ndarray, int]]:
  """[(teacher ids int[n], prompts each)]: one teacher call per entry. loads[j]: teacher
  j's prompts. equal: one call over all teachers at the largest load; else one call per
  distinct nonzero load (teachers nobody asks are skipped)."""
  loads = np.asarray(loads)
  if equal or not loads.any():  # (no teacher asked at all: one call on padding, unused)
    return [(np.arange(len(loads)), max(1, int(loads.max(initial=0))))]
  return [(np.flatnonzero(loads == n), int(n)) for n in np.unique(loads) if n > 0]


def _take_teachers(tree, ids: np.ndarray, count: int):
  """The stacked pytree [J, ...] restricted to teachers ids (static): itself when they are
  all J in order, else a slice or a gather."""
  if len(ids) == count and np.array_equal(ids, np.arange(count)):
    return tree
  if lora.is_lora(tree):  # the shared base is not stacked: take the teachers' adapters
    return tree.replace(adapters=_take_teachers(tree.adapters, ids, count))
  if np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
    return jax.tree.map(lambda x: x[ids[0]:ids[0] + len(ids)], tree)
  return jax.tree.map(lambda x: jnp.take(x, jnp.asarray(ids), axis=0), tree)


def _teacher_forward(fn: Callable) -> Callable:
  """fn as its own (inlined) jit named teacher_forward: the teacher's work on one
  micro-batch, which a benchmark can find and measure in the program's jaxpr."""
  def teacher_forward(*args):
    return fn(*args)
  return jax.jit(teacher_forward)


@flax.struct.dataclass
class Teachers:
  """A distilling step's teachers and the way its cross rows reach them.

  params: stacked [J] (for live teachers the students' own params, read before the
    update); always scored under stop-gradient.
  routing: the stage's stages.TeacherRouting as arrays (TeacherRouting.as_tree or
    as_arrays): which rows each student sends to each teacher, and the way back.
  native_rows (static): the native rows at the head of each student's R rows (the rows
    the routing was built for: teacher_routing's native_rows); they are never sent."""
  params: Params
  routing: dict
  native_rows: int = flax.struct.field(pytree_node=False, default=0)


def score_by_teachers(teachers: Teachers, rows: Rows, ucfg: UpdateConfig,
                      placement: tuple[Callable, Callable] | None = None,
                      one_shape: bool | None = None):
  """Sampled-token log-probs of each cross row under its teacher, on the loss columns:
  f32[S, R, W] (W = T - P with prompt_len P > 0, else T; see loss_columns). With the
  top_k / full_vocab OPD estimators (opd_support_size k > 0) instead the teacher's top k
  at each position: (log-probs f32[S, R, W, k], ids int32[S, R, W, k]).

  The regroup is an all-to-all over the expert axis (see TeacherRouting):
    1. each student gathers, from its OWN rows, the rows it sends to each teacher into a
       buffer [S, J, C, ...] (a local gather: nothing crosses experts);
    2. swapping the first two axes, [S, J, C] -> [J, S, C], is the exchange: each device
       sends only its own rows' tokens;
    3. each teacher compacts the rows it received to its real prompts (teacher_prompts:
       a local gather; the exchange's padding is never scored) and scores them in
       micro-batches of ucfg.micro_batch_rows rows: one vmapped call per group of
       teachers with equal loads, or, when the teachers are spread over an `expert` axis
       of several device groups (teachers_share_one_shape), rounds of one call over all
       lanes whose chunks balance the loads (teacher_lanes.lane_plan: the hub's overflow
       runs on the spokes' lanes, with the hub's parameters copied there);
    4. the scores go back to the received layout (teacher_row_back), swap back
       [J, S, C, W] -> [S, J, C, W] and each student unpacks its own.
  What crosses: token ids with the token mask packed in (-1 = masked), the frames once
  per prompt, and f32 log-probs of the loss columns (k of them and k int32 ids per
  position for top-k OPD: never logits). Positions are recomputed from
  the mask on the teacher side (rows' positions are positions_from_mask(token_mask), as
  rows.rollout_to_sequences builds them).

  teachers.native_rows (static): rows before it are native rows, never sent (the local
    gather reads the cross rows [native_rows:] only).
  rows.prompt_len (static, 0 = unknown): the prompt columns P. With it the prompt tokens
    move once per prompt (not once per sample), the teacher runs each prompt once for its
    G rows (_response_hidden), and only the scores of the response columns travel back.
  placement: optional (exchange, compute) sharding constraints from
    sharding.RunSharding.regroup_placement: `exchange` pins a buffer [A, B, C, ...] to
    expert on axis A, its rows C spread over the devices of each expert group; `compute`
    pins teacher-side rows [J, N, ...] to expert x batch.
  one_shape (static): the teachers' calls all take one shape, in rounds over the lanes
    of the balanced lane plan (True), or one call per load (False); None =
    teachers_share_one_shape() (what the mesh allows). Either way only a chunk's padding
    prompts are computed beyond the assigned rows (none for the bench's hub and full).
  """
  exchange, compute = placement or (_identity, _identity)
  teacher_axis = "expert" if placement is not None else None  # see update_body
  routing, prompt_len = teachers.routing, rows.prompt_len
  send_row, prompt_row = routing["send_row"], routing["send_prompt_row"]
  s, j, c = send_row.shape
  cp = prompt_row.shape[2]
  g = c // cp
  t = rows.tokens.shape[-1]
  if not 0 <= prompt_len < t:
    raise ValueError(f"rows.prompt_len={prompt_len} must be in [0, rows' length {t})")
  if prompt_len and g != ucfg.samples_per_prompt:
    raise ValueError(f"routing groups {g} rows per prompt but ucfg.samples_per_prompt is "
                     f"{ucfg.samples_per_prompt}")
  if ucfg.policy.needs_prompt_len and not prompt_len:
    raise ValueError("teacher scoring of Qwen3-VL rows needs rows.prompt_len > 0")
  start = teachers.native_rows
  support = opd_support_size(ucfg)
  loads = [int(x.shape[0]) for x in routing["teacher_prompts"]]

  def local(x, index):  # x [S, R, ...], index [S, J, C'] -> [S, J, C', ...], per student
    return jax.vmap(lambda xk, ik: jnp.take(xk, ik, axis=0))(x[:, start:],
                                                            jnp.maximum(index - start, 0))

  def swap(x):  # the all-to-all over `expert`: [A, B, ...] -> [B, A, ...]
    return exchange(jnp.swapaxes(exchange(x), 0, 1))

  def received(x, per_prompt_rows: int):  # [S, J, C', ...] -> [J, S*Cp, rows, ...]
    x = swap(x)
    return x.reshape((j, s * cp, per_prompt_rows) + x.shape[3:])

  packed = jnp.where(rows.token_mask, rows.tokens, -1)  # the mask travels inside the ids
  # Teacher-side inputs, per received prompt slot [J, S*Cp, ...]; rows [J, S*Cp, G, ...].
  frames = jax.tree.map(lambda x: received(local(x, prompt_row), 1)[:, :, 0], rows.frames)
  if prompt_len:
    p = prompt_len
    per_prompt = received(local(packed[..., :p], prompt_row), 1)[:, :, 0]  # [J, S*Cp, P]
    per_row = received(local(packed[..., p:], send_row), g)  # [J, S*Cp, G, R]
  else:
    per_prompt = None
    per_row = received(local(packed, send_row), g)  # [J, S*Cp, G, T]

  def compacted(ids, n):
    """(prompt index [m, n] into the received prompt slots, valid bool[m, n]) of teachers
    ids (static) at n prompts each; padding (equal loads only) repeats slot 0."""
    index = jnp.stack([jnp.pad(routing["teacher_prompts"][i], (0, n - loads[i])) for i in ids])
    valid = np.arange(n)[None, :] < np.asarray([loads[i] for i in ids])[:, None]
    return index, valid

  def gather(x, ids, index):  # [J, S*Cp, ...] -> [m, n, ...] (teachers ids' real prompts)
    x = _take_teachers(x, ids, j)
    return jax.vmap(lambda xj, ij: jnp.take(xj, ij, axis=0))(x, index)

  def teacher_rows(x):  # [m, n, G, ...] -> [m, n*G, ...] on the teachers' devices
    return compute(x.reshape((x.shape[0], -1) + x.shape[3:]))

  def score_compacted(params, prompt, row_tokens, grp_frames, valid):
    """Scores [m, n*G, W (, k)] of m teachers (params [m, ...]) on their compacted prompts:
    prompt [m, n, P] (or None), row_tokens [m, n, G, W'], grp_frames [m, n, ...] (or
    None), valid bool[m, n] (False: a padding prompt)."""
    grp_frames = jax.tree.map(compute, grp_frames)
    if prompt_len:
      # Padding slots' prompts attend to their last column only: a finite, unused softmax.
      prompt_mask = compute(jnp.where(valid[..., None], prompt >= 0, jnp.arange(p) == p - 1))
      prompt_tokens = compute(jnp.maximum(prompt, 0))
      response = teacher_rows(row_tokens)  # [m, n*G, R]
      response_mask = response >= 0
      prompt_positions = decoder.positions_from_mask(
          prompt_mask.reshape(-1, p)).reshape(prompt_mask.shape)
      counts = jnp.repeat(prompt_mask.sum(-1), g, axis=1)[..., None]  # [m, n*G, 1]
      response_positions = jnp.maximum(counts + jnp.cumsum(response_mask, -1) - 1, 0)

      def one_teacher(params, prompt: RowInputs, r_tok, r_pos):
        chunk = _teacher_forward(functools.partial(_continuation_logprobs, params, ucfg))
        return _map_prompt_micro_batches(chunk, ucfg.micro_batch_rows, g, prompt,
                                         (r_tok, r_pos))

      prompts = RowInputs(prompt_tokens, prompt_positions, prompt_mask, grp_frames)
      return partitioning.map_over_branches(
          one_teacher, params, prompts, jnp.maximum(response, 0), response_positions,
          spmd_axis_name=teacher_axis)
    # Padding rows attend to their first column only, so their (unused) softmax stays finite.
    mask = teacher_rows(jnp.where(valid[..., None, None], row_tokens >= 0,
                                  jnp.arange(t) == 0))
    tokens = teacher_rows(jnp.maximum(row_tokens, 0))
    if grp_frames is not None:
      grp_frames = compute(jnp.repeat(grp_frames, g, axis=1))

    def one_teacher(params, tok, msk, frm):
      def chunk(tk, mk, fr):
        return _sequence_logprobs(params, ucfg,
                                  RowInputs(tk, decoder.positions_from_mask(mk), mk, fr),
                                  support=support)
      return map_row_micro_batches(_teacher_forward(chunk), ucfg.micro_batch_rows, tok, msk,
                                   frm)

    return partitioning.map_over_branches(one_teacher, params, tokens, mask, grp_frames,
                                          spmd_axis_name=teacher_axis)

  def score_group(ids, n):
    """Scores [m, n*G, W (, k)] of teachers ids on their compacted rows."""
    index, valid = compacted(ids, n)
    params = jax.lax.stop_gradient(_take_teachers(teachers.params, ids, j))
    return score_compacted(
        params, gather(per_prompt, ids, index) if prompt_len else None,
        gather(per_row, ids, index), jax.tree.map(lambda x: gather(x, ids, index), frames),
        valid)

  def score_lanes(plan):
    """Scores in the received layout [J, S*C, W (, k)] through the balanced lane plan
    (teacher_lanes.lane_plan): trips rounds of one call over the J lanes each."""
    lanes, trips, n = plan.lanes, plan.trips, plan.bucket
    # Each (lane, trip) chunk's prompts, as flat indices into [J * S*Cp] received slots.
    index = jnp.stack([jnp.stack([
        plan.teacher[l, i] * s * cp + jnp.pad(
            routing["teacher_prompts"][plan.teacher[l, i]][
                plan.first[l, i]:plan.first[l, i] + plan.count[l, i]],
            (0, n - plan.count[l, i]))
        for i in range(trips)]) for l in range(lanes)])  # [lanes, trips, n]
    valid = np.arange(n) < plan.count[..., None]  # [lanes, trips, n]

    def chunks(x):  # [J, S*Cp, ...] -> [trips, lanes, n, ...]
      flat = x.reshape((j * s * cp,) + x.shape[2:])
      return jnp.swapaxes(jnp.take(flat, index, axis=0), 0, 1)
    inputs = (chunks(per_prompt) if prompt_len else None, chunks(per_row),
              jax.tree.map(chunks, frames), np.swapaxes(valid, 0, 1))
    params = jax.lax.stop_gradient(teachers.params)

    def trip(args):  # lane l runs its chunk's teacher: the hub's overflow copies its
      lane_teacher, chunk_inputs = args  # parameters to the lanes that take it
      return score_compacted(_take_teachers_dynamic(params, lane_teacher), *chunk_inputs)
    out = jax.lax.map(trip, (jnp.asarray(plan.teacher.T), inputs))  # [trips, lanes, n*G, ...]
    # Flat computed rows [(lane * trips + trip) * n*G + row in chunk, ...].
    flat = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[3:]), out)
    # Teacher j's compacted row r sits in its chunk r // (n*G) at offset r % (n*G).
    chunk_base = np.zeros((j, max(1, max(-(-ld // n) for ld in loads))), np.int32)
    for jj in range(j):
      place = plan.chunk_place(jj)
      chunk_base[jj, :len(place)] = place * n * g
    row = routing["teacher_row_back"]  # [J, S*C]
    back = jnp.take_along_axis(jnp.asarray(chunk_base), row // (n * g), axis=1) + row % (n * g)
    return jax.tree.map(lambda x: compute(jnp.take(x, back, axis=0)), flat)

  lanes = teachers_share_one_shape() if one_shape is None else one_shape
  plan = teacher_lanes.lane_plan(loads) if lanes and any(loads) else None
  if plan is not None and not plan.is_one_round_own_teachers():
    scores = score_lanes(plan)
  else:
    # One device: a call per load. Lanes of equal loads (one round, each lane its own
    # teacher): one call over all, each teacher's rows gathered on its own lane. (Nobody
    # asks at all: one call on padding, unused.)
    groups = ([(np.arange(j), plan.bucket)] if plan is not None
              else teacher_call_groups(loads, equal=False))
    scores = _scores_by_groups(score_group, groups, routing, compute, j)

  def back_to_students(x):  # [J, S*C, W, ...] -> [S, R, W, ...]
    x = swap(compute(x).reshape((j, s, c) + x.shape[2:])).reshape((s, j * c) + x.shape[2:])
    return jax.vmap(lambda y, slot: jnp.take(y, slot, axis=0))(x, routing["receive_slot"])
  return jax.tree.map(back_to_students, scores)


def _scores_by_groups(score_group: Callable, groups, routing: dict, compute: Callable, j: int):
  """Each group's scores back into the received layout [J, S*C, W (, k)], teachers in
  order (teachers nobody asks: zeros, never read back)."""
  back = []
  for ids, n in groups:
    slot = _take_teachers(routing["teacher_row_back"], ids, j)  # [m, S*C]
    scores = score_group(ids, n)
    back.append(jax.tree.map(
        lambda x, slot=slot: jax.vmap(lambda y, sl: jnp.take(y, sl, axis=0))(compute(x), slot),
        scores))
  order = np.concatenate([ids for ids, _ in groups])
  missing = np.setdiff1d(np.arange(j), order)
  if len(missing):
    back.append(jax.tree.map(lambda x: jnp.zeros((len(missing),) + x.shape[1:], x.dtype),
                             back[0]))
    order = np.concatenate([order, missing])
  scores = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *back) if len(back) > 1 \
      else back[0]
  if not np.array_equal(order, np.arange(j)):
    scores = jax.tree.map(lambda x: jnp.take(x, jnp.asarray(np.argsort(order)), axis=0), scores)
  return scores


def _take_teachers_dynamic(tree, ids):
  """The stacked pytree [J, ...] at teachers ids int32[m] (traced): a gather on the
  leading axis (LoRA: the adapters only; the shared base is not stacked)."""
  if lora.is_lora(tree):
    return tree.replace(adapters=_take_teachers_dynamic(tree.adapters, ids))
  return jax.tree.map(lambda x: jnp.take(x, ids, axis=0), tree)


def _map_prompt_micro_batches(fn: Callable, micro_batch_rows: int, group: int, prompts,
                              row_arrays: tuple):
  """fn(prompts, *row_arrays) -> [N, ...] over micro-batches of whole prompts: prompts a
  pytree of [B, ...] arrays (None allowed), row_arrays [N = B*G, ...] (row b*G + j belongs
  to prompt b); each micro-batch holds micro_batch_rows // G prompts and their rows."""
  count = row_arrays[0].shape[0]
  if not micro_batch_rows or micro_batch_rows >= count:
    return fn(prompts, *row_arrays)
  per = micro_batch_rows // group
  prompts = jax.tree.map(lambda x: split_rows(x, per), prompts)
  rows = jax.tree.map(lambda x: split_rows(x, micro_batch_rows, group), row_arrays)
  out = jax.lax.map(lambda chunk: fn(chunk[0], *chunk[1]), (prompts, rows))
  return jax.tree.map(lambda x: join_rows(x, count, group), out)


def reference_logprobs(ref_params: Params, rows: Rows, ucfg: UpdateConfig):
  """Sampled-token log-probs of every student's rows under one frozen reference policy
  (the shared base) on the loss columns: f32[S, R, W], for the KL-to-reference penalty (in
  micro-batches of ucfg.micro_batch_rows rows)."""
  ref_params = jax.lax.stop_gradient(ref_params)
  prompt_len = rows.prompt_len
  group = ucfg.samples_per_prompt if prompt_len else 1

  def one_student(r):
    return map_row_micro_batches(
        lambda inputs: _sequence_logprobs(ref_params, ucfg, inputs, prompt_len),
        ucfg.micro_batch_rows, r.inputs, group=group)
  return jax.vmap(one_student)(rows)
