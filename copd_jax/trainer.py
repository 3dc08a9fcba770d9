"""The CoPD trainer. Every method (experts, mixed RLVR, static OPD, MOPD, CoPD) is a
`Stage` of this one loop; `copd_jax.methods` says which stages a method runs.

One step, for S student branches held as one stacked pytree (leading axis S):

  1. beta[k, j] = the teacher matrix for this step (`schedules`): topology x per-branch
     rate x schedule weight. It is data, not code: no recompilation when it changes.
  2. Sampling, one vmapped call over students: branch k draws G responses for B_native
     prompts of its own data (its GRPO batch) and, when its row of beta is non-zero,
     for B_cross prompts of its teachers' data (the cross batch, PAPER.md Phase II).
  3. Host: verifiers -> rewards -> group-normalised advantages for native rows.
  4. `update` (jitted, all branches at once):
       a. teacher scoring: the cross rows are regrouped by teacher with an all-to-all
          over experts (token ids move to the teacher, parameters stay) and every teacher scores its rows in ONE vmapped
          forward; the sampled-token log-probs travel back. Teachers are under
          stop-gradient: the *current* students themselves (CoPD: live teachers) or a
          frozen stacked pytree (static OPD, MOPD).
       b. per-branch loss, vmapped over S: token-mean clipped PG with advantage
          A_rl + beta * (log p_teacher(y_t) - log p_student(y_t)) (fused LM-head loss,
          never [tokens x vocab]);
       c. optax update vmapped over S.

Nothing here loops over experts in Python inside the step.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from copd_jax import experts as experts_lib
from copd_jax import kernels, objectives, sampling, schedules, tasks, verifiers
from copd_jax import model as model_lib
from copd_jax.evaluation import decode_responses

Params = Any


# ----------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage: who learns, from which data, and who teaches whom when.

  student_data[k]: the capabilities of student k's native (GRPO) prompts; () = none
    (e.g. the MOPD student, which only distils).
  teacher_data[j]: the capabilities of teacher j's domain: a student distilling from j
    samples on these prompts.
  live_teachers: the teachers are the students themselves, as they are at this step
    (CoPD); otherwise `frozen_teachers` params are passed to `train_stage`.
  topology: f32[S, J] 0/1, which (student, teacher) pairs exchange at all.
  branch_beta: f32[S], each student's OPD rate beta_k.
  """
  name: str
  steps: int
  student_data: tuple[tuple[str, ...], ...]
  teacher_data: tuple[tuple[str, ...], ...]
  live_teachers: bool
  topology: np.ndarray
  branch_beta: np.ndarray
  schedule: schedules.OPDSchedule
  native_prompts: int
  cross_prompts: int
  samples_per_prompt: int
  cross_outcome_reward: bool = False  # also use GRPO advantages on cross rows (MOPD option)

  def __post_init__(self):
    s, j = len(self.student_data), len(self.teacher_data)
    if self.topology.shape != (s, j):
      raise ValueError(f"stage {self.name}: topology shape {self.topology.shape} must be "
                       f"(students={s}, teachers={j})")
    if self.live_teachers and s != j:
      raise ValueError(f"stage {self.name}: live teachers need as many teachers as students")
    if self.native_prompts == 0 and self.schedule.kind != "constant":
      raise ValueError(f"stage {self.name}: with no native prompts the schedule must be "
                       "'constant' (every step distils)")
    if self.steps < 0 or self.native_prompts < 0 or self.cross_prompts < 0:
      raise ValueError(f"stage {self.name}: steps and prompt counts must be >= 0")
    if self.samples_per_prompt < 1:
      raise ValueError(f"stage {self.name}: samples_per_prompt must be >= 1")

  @property
  def num_students(self) -> int:
    return len(self.student_data)

  @property
  def distils(self) -> bool:
    return bool(np.any(self.topology * self.branch_beta[:, None] > 0)) and self.cross_prompts > 0


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  """Static settings of the jitted update (hashable)."""
  model: model_lib.ModelConfig
  loss: objectives.PolicyLossConfig
  kernel: kernels.KernelConfig
  scale_by_std: bool = True  # GRPO (True) or Dr.GRPO (False) group advantages
  # Rows per micro-batch of the update (gradient accumulation) and of teacher / reference
  # scoring; 0 = all rows at once. Exact: losses are (sum, denominator) pairs.
  micro_batch_rows: int = 0
  # G: rows b*G .. b*G+G-1 share prompt b (as build_rows lays them out). With a known
  # prompt length the update runs each prompt once for its G rows (see _response_hidden).
  samples_per_prompt: int = 1

  def __post_init__(self):
    for name in ("micro_batch_rows", "samples_per_prompt"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"UpdateConfig.{name} must be an integer >= 0, got {value!r}")
    if self.samples_per_prompt < 1:
      raise ValueError("UpdateConfig.samples_per_prompt must be >= 1, got 0")
    if self.micro_batch_rows % self.samples_per_prompt:
      raise ValueError(
          f"UpdateConfig.micro_batch_rows ({self.micro_batch_rows}) must be a multiple of "
          f"samples_per_prompt ({self.samples_per_prompt}): a micro-batch holds whole prompts")


# ----------------------------------------------------------------------- rollout rows

# Row kinds on the host: a native row, or a cross slot of a student that has no teacher
# (kept only so every student has the same number of rows; fully masked). Cross rows
# carry their teacher's index j >= 0.
NATIVE = -1
NO_TEACHER = -2


def cross_teacher_assignment(stage: Stage) -> np.ndarray:
  """int32[S, B_cross]: the teacher of each cross prompt of each student.

  Prompts go round-robin over the student's teachers, so a hub student splits its cross
  batch between its spokes. Students without a teacher get NO_TEACHER (rows masked out).
  """
  pattern = (stage.topology * stage.branch_beta[:, None]) > 0
  out = np.full((stage.num_students, stage.cross_prompts), NO_TEACHER, np.int32)
  for k in range(stage.num_students):
    teachers = np.flatnonzero(pattern[k])
    if len(teachers):
      out[k] = teachers[np.arange(stage.cross_prompts) % len(teachers)]
  return out


@dataclasses.dataclass(frozen=True)
class TeacherRouting:
  """Static regrouping of cross rows by teacher, laid out for an all-to-all over the
  expert axis (computed once per stage on the host).

  Rows per student are [native rows | cross rows], the G samples of a prompt adjacent.
  Every student k packs the rows it sends to teacher j into slot j of a send buffer
  [S, J, C, ...] (C = the most rows any (student, teacher) pair exchanges; a pair with
  fewer rows is padded). Swapping the first two axes is the exchange: teacher j then holds
  [S, C] rows, i.e. every student's rows for j, and the scores travel back the same way.
  send_row: int32[S, J, C] — the row (index into the student's R rows) in slot (j, c);
    padding points at the first cross row.
  send_valid: bool[S, J, C] — False for padding.
  send_prompt_row: int32[S, J, C // G] — the first row of each prompt in the slot (the G
    rows of a prompt share its prompt tokens and frames, so those move once per prompt).
  receive_slot: int32[S, R] — where each row's score lands in the student's returned
    [J * C] scores (native rows: 0, unused because their beta is 0).
  """
  send_row: np.ndarray
  send_valid: np.ndarray
  send_prompt_row: np.ndarray
  receive_slot: np.ndarray

  def as_arrays(self) -> dict:
    """The fields as device arrays, the `routing` argument of `update`."""
    return {k: jnp.asarray(v) for k, v in dataclasses.asdict(self).items()}

  @property
  def samples(self) -> int:
    return self.send_row.shape[2] // self.send_prompt_row.shape[2]

  def teacher_forward_rows(self) -> int:
    """Rows the vmapped teacher forward scores per step (all teachers, padding included)."""
    s, j, c = self.send_row.shape
    return s * j * c


def teacher_routing(assignment: np.ndarray, num_teachers: int, samples: int,
                    native_rows: int = 0) -> TeacherRouting:
  """assignment: int32[S, B_cross] (per prompt; NO_TEACHER for a student without teachers)
  -> routing for rows laid out as [native_rows native rows | B_cross*G cross rows] per
  student (cross prompt b's samples are rows native_rows + b*G .. + G - 1)."""
  assignment = np.asarray(assignment)
  s, b_cross = assignment.shape
  j_count = num_teachers
  if np.any((assignment >= j_count) | ((assignment < 0) & (assignment != NO_TEACHER))):
    raise ValueError(f"assignment holds teacher ids outside [0, {j_count}) / NO_TEACHER: "
                     f"{np.unique(assignment).tolist()}")
  prompts = [[np.flatnonzero(assignment[k] == j) for j in range(j_count)] for k in range(s)]
  cp = max([1] + [len(p) for per_k in prompts for p in per_k])  # prompts per slot
  c = cp * samples
  send_prompt_row = np.full((s, j_count, cp), native_rows, np.int32)
  send_row = np.full((s, j_count, c), native_rows, np.int32)
  send_valid = np.zeros((s, j_count, c), bool)
  receive_slot = np.zeros((s, native_rows + b_cross * samples), np.int32)
  for k in range(s):
    for j in range(j_count):
      first_rows = native_rows + prompts[k][j] * samples  # [n_prompts]
      rows = (first_rows[:, None] + np.arange(samples)).reshape(-1)
      send_prompt_row[k, j, :len(first_rows)] = first_rows
      send_row[k, j, :len(rows)] = rows
      send_valid[k, j, :len(rows)] = True
      receive_slot[k, rows] = j * c + np.arange(len(rows))
  return TeacherRouting(send_row, send_valid, send_prompt_row, receive_slot)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
  """Scored-rollout rows of every student: prompt + response, ready for teacher forcing.

  Leading axes [S, R] (R = rows per student). T = P + max_new_tokens.
  tokens, positions: int32[S, R, T]; token_mask: bool[S, R, T];
  response_mask: f32[S, R, T] (1 at t when token t+1 is a response token);
  old_logprobs: f32[S, R, T] (the sampler's, aligned like response_mask);
  advantages: f32[S, R] (RL advantage of the row); opd_beta: f32[S, R] (beta of the
  row's teacher, 0 for native rows); frames: f32[S, R, F, H, W, C].
  """
  tokens: jax.Array
  positions: jax.Array
  token_mask: jax.Array
  response_mask: jax.Array
  old_logprobs: jax.Array
  advantages: jax.Array
  opd_beta: jax.Array
  frames: jax.Array


# ------------------------------------------------------------------------ the update


def split_rows(x, size: int, group: int = 1):
  """x: [N, ...] -> [n, size, ...] micro-batches, n = ceil(N / size), rows past N zero.

  Micro-batch i holds rows i, i + n, i + 2n, ... (strided, not contiguous): an array whose
  row axis is block-sharded over devices stays spread over the same devices inside every
  micro-batch, instead of one micro-batch per device group. With group = G > 1 the unit is
  a prompt's G consecutive rows (size must be a multiple of G): groups are strided, the
  rows of a group stay together and in order."""
  if size % group or x.shape[0] % group:
    raise ValueError(f"split_rows: rows ({x.shape[0]}) and micro-batch size ({size}) must be "
                     f"multiples of the group size {group}")
  x = x.reshape((x.shape[0] // group, group) + x.shape[1:])
  per = size // group
  n = -(-x.shape[0] // per)
  pad = n * per - x.shape[0]
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  x = jnp.swapaxes(x.reshape((per, n) + x.shape[1:]), 0, 1)  # [n, per, G, ...]
  return x.reshape((n, size) + x.shape[3:])


def join_rows(x, count: int, group: int = 1):
  """The inverse of split_rows: [n, size, ...] -> [count, ...]."""
  n, size = x.shape[:2]
  x = jnp.swapaxes(x.reshape((n, size // group, group) + x.shape[2:]), 0, 1)
  return x.reshape((-1,) + x.shape[3:])[:count]


def map_row_micro_batches(fn: Callable, micro_batch_rows: int, *arrays, group: int = 1):
  """fn over micro-batches of rows (jax.lax.map: one micro-batch live at a time), results
  joined back. arrays: [N, ...] (None allowed); fn(*arrays) returns [rows, ...]. With
  micro_batch_rows 0 or >= N, fn runs once on all rows. group: see split_rows."""
  count = jax.tree_util.tree_leaves(arrays)[0].shape[0]
  if not micro_batch_rows or micro_batch_rows >= count:
    return fn(*arrays)
  chunks = jax.tree.map(lambda x: split_rows(x, micro_batch_rows, group), arrays)
  out = jax.lax.map(lambda chunk: fn(*chunk), chunks)
  return jax.tree.map(lambda x: join_rows(x, count, group), out)


def loss_columns(x, prompt_len: int):
  """The columns of a column-aligned row array [N, T, ...] that the loss reads: with a
  known prompt length P, the R = T - P columns P-1 .. T-2 whose hidden states predict the
  response tokens (the prompt columns carry no loss); with P = 0 (unknown) all T."""
  return x[:, prompt_len - 1:-1] if prompt_len else x


def loss_targets(tokens, prompt_len: int):
  """int32[N, W]: the token each loss column predicts (see loss_columns)."""
  return tokens[:, prompt_len:] if prompt_len else sampling.next_token_targets(tokens)


def _shared_prefix_hidden(params: Params, ucfg: UpdateConfig, prompt_tokens, prompt_positions,
                          prompt_mask, frames, tokens, positions):
  """Hidden states f32[N, R, D] that predict the R continuation tokens of N = B*G rows.

  prompt_*: [B, P] (frames [B, ...] or None); tokens, positions: int32[N, R], row b*G + j
  continues prompt b. Each prompt runs once for its G rows
  (model.forward_hidden_shared_prefix); the prompt's last column predicts token 0."""
  g = tokens.shape[0] // prompt_tokens.shape[0]
  prompt_hidden, hidden = model_lib.forward_hidden_shared_prefix(
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
    return model_lib.forward_hidden(params, ucfg.model, tokens, positions, token_mask, frames)
  p, g = prompt_len, ucfg.samples_per_prompt
  first = lambda x: None if x is None else first_of_groups(x, g)  # noqa: E731
  return _shared_prefix_hidden(params, ucfg, first(tokens[:, :p]), first(positions[:, :p]),
                               first(token_mask[:, :p]), first(frames),
                               tokens[:, p:], positions[:, p:])


def first_of_groups(x, group: int):
  """[B*G, ...] -> [B, ...]: the first row of every group of G consecutive rows. A reshape
  and an index, not a strided slice x[::G]: on a mesh whose devices hold blocks of rows the
  partitioner keeps this local (a strided slice made it move rows between devices)."""
  return x.reshape((x.shape[0] // group, group) + x.shape[1:])[:, 0]


def _sequence_logprobs(params: Params, ucfg: UpdateConfig, tokens, positions, token_mask,
                       frames, prompt_len: int = 0):
  """Sampled-token log-probs f32[N, W] of rows under one model, on the loss columns (no
  gradient use)."""
  hidden = _response_hidden(params, ucfg, tokens, positions, token_mask, frames, prompt_len)
  return kernels.sampled_token_logprobs(hidden, model_lib.lm_head(params, ucfg.model),
                                        loss_targets(tokens, prompt_len), kernel=ucfg.kernel)


def _continuation_logprobs(params: Params, ucfg: UpdateConfig, prompt_tokens, prompt_positions,
                           prompt_mask, frames, tokens, positions):
  """Log-probs f32[N, R] of the continuation tokens int32[N, R] (see _shared_prefix_hidden)."""
  hidden = _shared_prefix_hidden(params, ucfg, prompt_tokens, prompt_positions, prompt_mask,
                                 frames, tokens, positions)
  return kernels.sampled_token_logprobs(hidden, model_lib.lm_head(params, ucfg.model), tokens,
                                        kernel=ucfg.kernel)


def _identity(x):
  return x


def score_by_teachers(teacher_params: Params, rows: Rows, routing: dict, ucfg: UpdateConfig,
                      placement: tuple[Callable, Callable] | None = None,
                      cross_row_start: int = 0, prompt_len: int = 0):
  """Sampled-token log-probs of each cross row under its teacher, on the loss columns:
  f32[S, R, W] (W = T - P with prompt_len P > 0, else T; see loss_columns).

  The regroup is an all-to-all over the expert axis (see TeacherRouting):
    1. each student gathers, from its OWN rows, the rows it sends to each teacher into a
       buffer [S, J, C, ...] (a local gather: nothing crosses experts);
    2. swapping the first two axes, [S, J, C] -> [J, S, C], is the exchange: each device
       sends only its own rows' tokens;
    3. teacher j scores its [S*C] rows (one vmapped forward over teachers, in
       micro-batches of ucfg.micro_batch_rows rows);
    4. the scores swap back [J, S, C, W] -> [S, J, C, W] and each student unpacks its own.
  What crosses: token ids with the token mask packed in (-1 = masked), the frames once
  per prompt, and f32 log-probs of the loss columns. Positions are recomputed from
  the mask on the teacher side (rows' positions are positions_from_mask(token_mask), as
  sampling.rollout_to_sequences builds them).

  cross_row_start (static): rows before it are native rows, never sent (the local gather
    reads rows [cross_row_start:] only).
  prompt_len (static, 0 = unknown): the prompt columns P. With it the prompt tokens move
    once per prompt (not once per sample), the teacher runs each prompt once for its G
    rows (_response_hidden), and only the scores of the response columns travel back.
  placement: optional (exchange, compute) sharding constraints from
    parallel.RunSharding.regroup_placement: `exchange` pins a buffer [A, B, C, ...] to
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

  def local(x, index):  # x [S, R, ...], index [S, J, C'] -> [S, J, C', ...], per student
    return jax.vmap(lambda xk, ik: jnp.take(xk, ik, axis=0))(x[:, start:],
                                                            jnp.maximum(index - start, 0))

  def swap(x):  # the all-to-all over `expert`: [A, B, ...] -> [B, A, ...]
    return exchange(jnp.swapaxes(exchange(x), 0, 1))

  def teacher_rows(x):  # [J, S, C', ...] -> [J, S*C', ...] on the teachers' devices
    return compute(x.reshape((j, -1) + x.shape[3:]))

  packed = jnp.where(rows.token_mask, rows.tokens, -1)  # the mask travels inside the ids
  valid = jnp.swapaxes(routing["send_valid"], 0, 1)  # [J, S, C]
  frames = None
  if rows.frames is not None:  # once per prompt
    frames = teacher_rows(swap(local(rows.frames, prompt_row)))
  if prompt_len:
    p = prompt_len
    prompt = swap(local(packed[..., :p], prompt_row))  # [J, S, C // G, P]
    response = teacher_rows(swap(local(packed[..., p:], send_row)))  # [J, S*C, R]
    # Padding slots' prompts attend to their last column only: a finite, unused softmax.
    prompt_mask = teacher_rows(jnp.where(valid[:, :, ::g, None], prompt >= 0,
                                         jnp.arange(p) == p - 1))
    prompt_tokens = teacher_rows(jnp.maximum(prompt, 0))
    response_mask = response >= 0
    prompt_positions = model_lib.positions_from_mask(
        prompt_mask.reshape(-1, p)).reshape(prompt_mask.shape)
    counts = jnp.repeat(prompt_mask.sum(-1), g, axis=1)[..., None]  # [J, S*C, 1]
    response_positions = jnp.maximum(counts + jnp.cumsum(response_mask, -1) - 1, 0)

    def one_teacher(params, p_tok, p_pos, p_msk, frm, r_tok, r_pos):
      chunk = functools.partial(_continuation_logprobs, params, ucfg)
      return _map_prompt_micro_batches(chunk, ucfg.micro_batch_rows, g,
                                       (p_tok, p_pos, p_msk, frm), (r_tok, r_pos))

    scores = compute(jax.vmap(one_teacher, spmd_axis_name=teacher_axis)(
        jax.lax.stop_gradient(teacher_params), prompt_tokens, prompt_positions, prompt_mask,
        frames, jnp.maximum(response, 0), response_positions))  # [J, S*C, R]
  else:
    packed = swap(local(packed, send_row))  # [J, S, C, T]
    # Padding rows attend to their first column only, so their (unused) softmax stays finite.
    mask = teacher_rows(jnp.where(valid[..., None], packed >= 0, jnp.arange(t) == 0))
    tokens = teacher_rows(jnp.maximum(packed, 0))
    if frames is not None:
      frames = compute(jnp.repeat(frames.reshape((j, s, c // g) + frames.shape[2:]), g,
                                  axis=2).reshape((j, s * c) + frames.shape[2:]))

    def one_teacher(params, tok, msk, frm):
      def chunk(tk, mk, fr):
        return _sequence_logprobs(params, ucfg, tk, model_lib.positions_from_mask(mk), mk, fr)
      return map_row_micro_batches(chunk, ucfg.micro_batch_rows, tok, msk, frm)

    scores = compute(jax.vmap(one_teacher, spmd_axis_name=teacher_axis)(
        jax.lax.stop_gradient(teacher_params), tokens, mask, frames))  # [J, S*C, T]
  scores = swap(scores.reshape(j, s, c, -1)).reshape(s, j * c, -1)  # back to the students
  return jax.vmap(lambda x, slot: jnp.take(x, slot, axis=0))(scores, routing["receive_slot"])


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


def student_loss_sum(params: Params, rows: Rows, teacher_logprobs, ref_logprobs,
                     ucfg: UpdateConfig, prompt_len: int = 0):
  """One student's (loss_sum, (denominator, aux)) on its rows (Rows without the S axis):
  the pair whose sums over micro-batches give the exact full-batch loss. teacher_logprobs,
  ref_logprobs: f32[R, W] on the loss columns (or None); aux: [R, W] arrays. Only the loss
  columns are computed: the others have response_mask 0 and add nothing to the loss."""
  hidden = _response_hidden(params, ucfg, rows.tokens, rows.positions, rows.token_mask,
                            rows.frames, prompt_len)
  head = model_lib.lm_head(params, ucfg.model)
  response_mask = loss_columns(rows.response_mask, prompt_len)
  opd_beta = None
  if teacher_logprobs is not None:
    opd_beta = rows.opd_beta[:, None] * response_mask
  loss_sum, denominator, aux = kernels.sequence_policy_loss(
      hidden, head, loss_targets(rows.tokens, prompt_len), rows.advantages,
      loss_columns(rows.old_logprobs, prompt_len), response_mask, ref_logprobs=ref_logprobs,
      teacher_logprobs=teacher_logprobs, opd_beta=opd_beta, config=ucfg.loss, kernel=ucfg.kernel)
  return loss_sum, (denominator, aux)


def student_loss(params: Params, rows: Rows, teacher_logprobs, ref_logprobs, ucfg: UpdateConfig,
                 prompt_len: int = 0):
  """One student's token-mean loss on its rows. rows: Rows without the S axis."""
  loss_sum, (denominator, aux) = student_loss_sum(params, rows, teacher_logprobs, ref_logprobs,
                                                  ucfg, prompt_len)
  return objectives.mean_from_sum(loss_sum, denominator), aux


def student_grads(params: Params, rows: Rows, teacher_logprobs, ref_logprobs,
                  ucfg: UpdateConfig, prompt_len: int = 0):
  """(loss, aux of [R, W] arrays, grads) of one student, accumulated over micro-batches of
  ucfg.micro_batch_rows rows (jax.lax.scan; only one micro-batch's activations live; with
  a prompt length, micro-batches hold whole prompts).

  Exact: the loss is loss_sum / denominator with a denominator that does not depend on
  the parameters, so grad = (sum of micro-batch grad(loss_sum)) / (sum of denominators)."""
  count = rows.tokens.shape[0]
  size = ucfg.micro_batch_rows
  if not size or size >= count:
    (loss, aux), grads = jax.value_and_grad(student_loss, has_aux=True)(
        params, rows, teacher_logprobs, ref_logprobs, ucfg, prompt_len)
    return loss, aux, grads
  group = ucfg.samples_per_prompt if prompt_len else 1
  chunks = jax.tree.map(lambda x: split_rows(x, size, group),
                        (rows, teacher_logprobs, ref_logprobs))

  def accumulate(total, chunk):
    (loss_sum, (denominator, aux)), grads = jax.value_and_grad(student_loss_sum, has_aux=True)(
        params, *chunk, ucfg, prompt_len)
    return jax.tree.map(jnp.add, total, (grads, loss_sum, denominator)), aux

  zero = jnp.zeros((), jnp.float32)
  (grad_sum, loss_sum, denominator), aux = jax.lax.scan(
      accumulate, (jax.tree.map(jnp.zeros_like, params), zero, zero), chunks)
  scale = jnp.where(denominator > 0, 1.0 / jnp.maximum(denominator, 1e-30), 0.0)
  grads = jax.tree.map(lambda x: x * scale.astype(x.dtype), grad_sum)
  aux = jax.tree.map(lambda x: join_rows(x, count, group), aux)
  return objectives.mean_from_sum(loss_sum, denominator), aux, grads


def _branch_metrics(rows: Rows, prompt_len: int, aux: dict, teacher_logprobs, loss) -> dict:
  """Per-branch scalars from one student's rows (Rows without the S axis), its loss aux
  ([R, W] arrays on the loss columns, see loss_columns) and loss."""
  m = loss_columns(rows.response_mask, prompt_len)
  mean = lambda x, w=m: jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)
  out = {"loss": loss, "entropy": mean(aux["entropy"]),
         "clip_fraction": mean(aux["clipped_low"] + aux["clipped_high"]),
         "ratio": mean(aux["ratio"]),
         "sampler_logprob_gap": mean(jnp.abs(aux["logprobs"]
                                             - loss_columns(rows.old_logprobs, prompt_len))),
         "response_tokens": jnp.sum(m) / jnp.maximum(jnp.sum(jnp.any(m > 0, -1)), 1.0)}
  if teacher_logprobs is not None:
    cross = m * (rows.opd_beta[:, None] > 0)
    # The OPD advantage actually used: total advantage minus the RL part.
    opd_advantage = aux["advantages"] - rows.advantages[:, None]
    delta = opd_advantage / jnp.where(cross > 0, rows.opd_beta[:, None], 1.0)  # log p_t - log p_s
    out["opd/delta_mean"] = mean(delta, cross)
    out["opd/delta_std"] = jnp.sqrt(jnp.maximum(mean(delta ** 2, cross) - mean(delta, cross) ** 2, 0))
    out["opd/advantage_mean"] = mean(opd_advantage, cross)
    out["opd/tokens"] = jnp.sum(cross)
  return out


# No buffer donation: with live teachers the same params arrive as `teacher_params`.
@functools.partial(jax.jit, static_argnames=("ucfg", "optimizer", "distil", "prompt_len"))
def update(params: Params, opt_state, teacher_params: Params | None, rows: Rows,
           routing: dict | None, ref_params: Params | None = None, *, ucfg: UpdateConfig,
           optimizer: optax.GradientTransformation, distil: bool, prompt_len: int = 0):
  """One optimizer step for every student branch. Returns (params, opt_state, metrics).

  params, opt_state: stacked [S]; teacher_params: stacked [J] or None (live teachers:
  pass the same params — they are read before the update, under stop-gradient);
  rows: Rows [S, R, ...]; routing: TeacherRouting fields as arrays (distil steps only);
  ref_params: one single-model pytree (the base), required when ucfg.loss.kl_coef > 0.
  prompt_len: the prompt columns P of rows, or 0. With P > 0 every prompt runs once for its
    ucfg.samples_per_prompt rows and only the response columns go through the LM head and
    the loss (_response_hidden): the same loss as P = 0, for a fraction of the work.
  metrics: dict of f32[S].
  Single-device jit; parallel.RunSharding.update_fn jits `update_body` with explicit
  shardings instead.
  """
  return update_body(params, opt_state, teacher_params, rows, routing, ref_params, ucfg=ucfg,
                     optimizer=optimizer, distil=distil, prompt_len=prompt_len)


def update_body(params: Params, opt_state, teacher_params: Params | None, rows: Rows,
                routing: dict | None, ref_params: Params | None = None, *,
                ucfg: UpdateConfig, optimizer: optax.GradientTransformation, distil: bool,
                placement: tuple[Callable, Callable] | None = None, cross_row_start: int = 0,
                prompt_len: int = 0):
  """The traceable body of `update` (same arguments); placement, cross_row_start and
  prompt_len: see score_by_teachers. Gradients accumulate over micro-batches of
  ucfg.micro_batch_rows rows (student_grads)."""
  teacher_logprobs = None
  if distil:
    teacher_logprobs = score_by_teachers(teacher_params, rows, routing, ucfg, placement,
                                         cross_row_start, prompt_len)
  ref_lp = None
  if ucfg.loss.kl_coef > 0:
    if ref_params is None:
      raise ValueError("ref_params (the reference policy) are required when kl_coef > 0")
    ref_lp = reference_logprobs(ref_params, rows, ucfg, prompt_len)

  def one_branch(p, r, t_lp, ref):
    loss, aux, grads = student_grads(p, r, t_lp, ref, ucfg, prompt_len)
    metrics = _branch_metrics(r, prompt_len, aux, t_lp, loss)
    if ref is not None:
      m = loss_columns(r.response_mask, prompt_len)
      metrics["kl_to_reference"] = jnp.sum(aux["kl"] * m) / jnp.maximum(jnp.sum(m), 1.0)
    return grads, metrics

  # On a mesh the branch axis is `expert`: sharding constraints inside (the activation
  # constraint of parallel.RunSharding.constrain_rows) then keep it there.
  branch_axis = "expert" if placement is not None else None
  grads, metrics = jax.vmap(one_branch, spmd_axis_name=branch_axis)(params, rows,
                                                                   teacher_logprobs, ref_lp)
  metrics["grad_norm"] = jax.vmap(optax.tree_utils.tree_norm)(grads)
  updates, new_opt_state = jax.vmap(optimizer.update)(grads, opt_state, params)
  # How far the step moves each branch: the global norm of the update and its largest
  # entry (RL that does not learn often moves the weights by almost nothing).
  metrics["update_norm"] = jax.vmap(optax.tree_utils.tree_norm)(updates)
  metrics["update_max_abs"] = jax.vmap(
      lambda u: jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(u)])))(updates)
  new_params = optax.apply_updates(params, updates)
  # Per branch: apply the update only if its loss, gradient norm, new parameters and new
  # optimizer state are all finite; a branch whose step is not keeps its previous state,
  # and the other branches' updates are applied all the same. Finiteness of a tree is read
  # from its global norm (one reduction per branch): a NaN or inf anywhere makes the norm
  # non-finite. (An element-wise isfinite over every leaf feeding the select instead made
  # XLA:CPU compile the update 3-4x slower.) The norm also overflows for magnitudes
  # above ~1e19, which counts as diverged too.
  applied = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
             & jnp.isfinite(float_norm_per_branch(new_params))
             & jnp.isfinite(float_norm_per_branch(new_opt_state)))
  metrics["update_applied"] = applied.astype(jnp.float32)
  return (select_branches(applied, new_params, params),
          select_branches(applied, new_opt_state, opt_state), metrics)


def float_norm_per_branch(tree) -> jax.Array:
  """f32[S]: the global L2 norm of the float leaves of each branch of a stacked pytree
  (0 for a tree without float leaves, e.g. plain SGD's empty optimizer state)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.zeros((), jnp.float32)
  squares = [jnp.sum(jnp.square(x.reshape(x.shape[0], -1).astype(jnp.float32)), axis=1)
             for x in leaves]
  return jnp.sqrt(sum(squares))


def select_branches(take_new, new_tree, old_tree):
  """Branch s of new_tree where take_new[s] (bool[S]), else of old_tree (stacked [S])."""
  def pick(new, old):
    return jnp.where(take_new.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  return jax.tree.map(pick, new_tree, old_tree)


# ------------------------------------------------------------------------- host side


@dataclasses.dataclass
class DataContext:
  """What the host loop needs to draw and encode prompts."""
  tokenizer: Any
  encode_prompts: Callable[[Sequence[tasks.Example]], tasks.PromptBatch]
  # One endless train stream per capability with reserve() / load(index) (data.IndexedStream).
  streams: dict[str, Any]
  sampling: sampling.SamplingConfig


ExampleRef = tuple[str, int]  # (capability, index in its stream): an example not yet loaded


def draw_refs(ctx: DataContext, capabilities: Sequence[str], n: int,
              rng: np.random.Generator) -> list[ExampleRef]:
  """n positions in the train streams, each of a capability drawn uniformly from
  `capabilities`. Reserving advances the streams without loading anything."""
  picks = rng.integers(0, len(capabilities), size=n)
  return [(capabilities[i], ctx.streams[capabilities[i]].reserve()) for i in picks]


def load_example(ctx: DataContext, ref: ExampleRef) -> tasks.Example:
  capability, index = ref
  return ctx.streams[capability].load(index)


def draw_examples(ctx: DataContext, capabilities: Sequence[str], n: int,
                  rng: np.random.Generator) -> list[tasks.Example]:
  """n training examples, each from a capability drawn uniformly from `capabilities`."""
  return [load_example(ctx, ref) for ref in draw_refs(ctx, capabilities, n, rng)]


def stage_prompts(stage: Stage, ctx: DataContext, distil: bool, assignment: np.ndarray,
                  rng: np.random.Generator) -> tuple[list[list[ExampleRef]], np.ndarray]:
  """The prompts each student samples on this step, native first then cross, as stream
  positions (every process reserves the same global batch).

  Returns (refs[S][B_native (+ B_cross)], row_kind int32[S, B]: NATIVE, NO_TEACHER or the
  teacher index j of a cross prompt).
  """
  per_student, teachers = [], []
  for k, caps in enumerate(stage.student_data):
    refs = draw_refs(ctx, caps, stage.native_prompts, rng) if stage.native_prompts else []
    row_teacher = [NATIVE] * len(refs)
    if distil:
      for j in assignment[k]:
        # A student without teachers still fills its rows (masked out) to keep shapes.
        domain = stage.teacher_data[j] if j >= 0 else (caps or stage.teacher_data[0])
        refs.append(draw_refs(ctx, domain, 1, rng)[0])
        row_teacher.append(int(j))
    per_student.append(refs)
    teachers.append(row_teacher)
  return per_student, np.asarray(teachers, np.int32)


def load_local_examples(ctx: DataContext, refs: Sequence[Sequence[ExampleRef]],
                        local: np.ndarray) -> list[list[tasks.Example]]:
  """Loads the examples of the prompts this process holds (local: bool[S, B]). The other
  slots get a stand-in (one of the loaded examples): their encoded arrays are never read,
  because only a process's own shards go to its devices (parallel.put_global)."""
  loaded = {(k, b): load_example(ctx, ref) for k, row in enumerate(refs)
            for b, ref in enumerate(row) if local[k, b]}
  stand_in = next(iter(loaded.values()))
  return [[loaded.get((k, b), stand_in) for b in range(len(row))] for k, row in enumerate(refs)]


def verify_local(responses_of, examples, local_rows: np.ndarray, sharding,
                 stats: dict | None = None) -> np.ndarray:
  """Rewards f32[S, B*G] of the whole batch, each process verifying only its own rows.

  responses_of(rows) -> response strings of flat row indices; examples[S][B*G] (stand-ins
  outside local_rows); local_rows: bool[S, B*G]. Other processes' rewards arrive through
  one small all-gather; single-process runs verify everything locally. `stats`, if given,
  receives this process's verify/timeouts and verify/over_budget counts (answers that
  scored 0 because of the per-answer limit or the step budget, config.reward)."""
  s, n = local_rows.shape
  flat = np.flatnonzero(local_rows.reshape(-1))
  rewards = np.zeros(s * n, np.float32)
  rewards[flat], pool = verifiers.score(responses_of(flat), [examples[i // n][i % n] for i in flat])
  if stats is not None:
    stats.update({"verify/timeouts": float(pool.timeouts),
                  "verify/over_budget": float(pool.over_budget)})
  rewards = rewards.reshape(s, n)
  if sharding is None or jax.process_count() == 1:
    return rewards
  from jax.experimental import multihost_utils
  every_r, every_m = multihost_utils.process_allgather((rewards, local_rows))  # [P, S, B*G]
  # A row held by several processes (replicated) was verified identically by each.
  return (every_r * every_m).sum(0) / np.maximum(every_m.sum(0), 1)


def stack_prompt_batches(batches: Sequence[tasks.PromptBatch]):
  """Per-student PromptBatches -> (tokens [S, B, P], mask [S, B, P], frames
  [S, B, F, H, W, C] or None for a text-only model)."""
  frames = None if batches[0].frames is None else np.stack([b.frames for b in batches])
  return (np.stack([b.tokens for b in batches]), np.stack([b.mask for b in batches]), frames)


def group_advantages(rewards: np.ndarray, samples: int, scale_by_std: bool) -> tuple[np.ndarray, np.ndarray]:
  """rewards f32[S, B*G] -> (advantages f32[S, B*G], zero-variance flags bool[S, B])."""
  s, n = rewards.shape
  grouped = rewards.reshape(s * n // samples, samples)
  adv = objectives.grpo_advantages(grouped, scale_by_std=scale_by_std)
  zero = np.asarray(adv.zero_variance).reshape(s, -1)
  return np.asarray(adv.advantages).reshape(s, n), zero


def build_rows(prompt_tokens, prompt_mask, frames, rollout: sampling.Rollout,
               advantages, opd_beta, samples: int) -> Rows:
  """Stacked prompts [S, B, P] + rollout [S, B, G, R] -> Rows [S, B*G, P+R]."""
  tokens, positions, token_mask, response_mask = jax.vmap(sampling.rollout_to_sequences)(
      prompt_tokens, prompt_mask, rollout)
  old = jax.vmap(sampling.align_response_values, in_axes=(0, None))(
      rollout.raw_logprobs, prompt_tokens.shape[-1])
  return Rows(tokens=tokens, positions=positions, token_mask=token_mask,
              response_mask=response_mask, old_logprobs=old,
              advantages=jnp.asarray(advantages, jnp.float32),
              opd_beta=jnp.asarray(opd_beta, jnp.float32),
              frames=None if frames is None else jnp.repeat(jnp.asarray(frames), samples, axis=1))


@dataclasses.dataclass
class StepResult:
  params: Params
  opt_state: Any
  metrics: dict  # name -> np.ndarray[S] or float
  rollout_tokens: int
  # A few rollouts for the completion log (train_step's log_samples > 0), else empty.
  samples: list = dataclasses.field(default_factory=list)


def completion_samples(examples, row_teacher: np.ndarray, local: np.ndarray, responses_of,
                       rewards: np.ndarray, samples_per_prompt: int, per_kind: int) -> list[dict]:
  """The first sample of the first `per_kind` native and `per_kind` cross prompts of every
  branch that this process holds: {'branch' (index), 'row' ('native' | 'cross'),
  'teacher' (index, or None), 'prompt', 'answer', 'response', 'reward'}.

  examples[S][B]; row_teacher, local: [S, B]; rewards f32[S, B*G]; responses_of(flat row
  indices) decodes rows of the [S*B*G] rollout."""
  s_count, b_count = row_teacher.shape
  g = samples_per_prompt
  out = []
  for s in range(s_count):
    for kind, is_kind in (("native", row_teacher[s] == NATIVE), ("cross", row_teacher[s] >= 0)):
      picked = [b for b in np.flatnonzero(is_kind & local[s])][:per_kind]
      if not picked:
        continue
      rows = [(s * b_count + b) * g for b in picked]
      for b, row, response in zip(picked, rows, responses_of(np.array(rows))):
        ex = examples[s][b]
        out.append({"branch": s, "row": kind,
                    "teacher": int(row_teacher[s, b]) if kind == "cross" else None,
                    "prompt": ex.question, "answer": str(ex.answer), "response": response,
                    "reward": float(rewards[s, b * g])})
  return out


@dataclasses.dataclass
class Rollouts:
  """One step's scored rollouts of every student, ready for the update (collect_rollouts).

  rows: Rows [S, B*G, P + R]; distil: whether this step distils (rows carry teacher
  betas); prompt_len: P; rewards f32[S, B*G]; is_native / is_cross bool[S, B*G];
  zero_variance bool[S, B] (groups with equal rewards); examples [S][B]; row_teacher,
  local [S, B] (see stage_prompts / load_local_examples); responses_of(flat row indices)
  decodes rows of the [S*B*G] rollout; rollout_tokens: response tokens sampled;
  timings: seconds of sampling and verification; verify_stats: the verifier's counters
  (verify_local)."""
  rows: Rows
  distil: bool
  prompt_len: int
  rewards: np.ndarray
  is_native: np.ndarray
  is_cross: np.ndarray
  zero_variance: np.ndarray
  examples: list
  row_teacher: np.ndarray
  local: np.ndarray
  responses_of: Callable
  rollout_tokens: int
  timings: dict
  verify_stats: dict


def collect_rollouts(stage: Stage, step: int, params: Params, ctx: DataContext,
                     ucfg: UpdateConfig, key, rng: np.random.Generator, weight: float,
                     assignment: np.ndarray, sharding=None) -> Rollouts:
  """The rollout half of a step: draw prompts, sample G responses per prompt from every
  student, verify them, and build the rows with their advantages and teacher betas."""
  beta = schedules.teacher_matrix(stage.topology, stage.branch_beta, weight)  # [S, J]
  distil = stage.distils and weight > 0
  timings = {}
  t0 = time.perf_counter()
  refs, row_teacher = stage_prompts(stage, ctx, distil, assignment, rng)
  # Each process loads (and later verifies) only the prompts its devices hold.
  local = np.ones(row_teacher.shape, bool) if sharding is None else \
      sharding.local_prompt_mask(row_teacher.shape)
  examples = load_local_examples(ctx, refs, local)
  batches = [ctx.encode_prompts(ex) for ex in examples]
  prompt_tokens, prompt_mask, frames = stack_prompt_batches(batches)
  keys = jax.random.split(jax.random.fold_in(key, step), stage.num_students)
  if sharding is None:
    rollout = sampling.stacked_generate(params, ucfg.model, prompt_tokens, prompt_mask, frames,
                                       keys, ctx.sampling, stage.samples_per_prompt)
    rollout = jax.device_get(rollout)
  else:
    key_data = np.asarray(jax.random.key_data(keys))  # the same on every process
    sampling.check_stacked_generate_args(params, ucfg.model, prompt_tokens, prompt_mask,
                                         frames, key_data, ctx.sampling,
                                         stage.samples_per_prompt)
    generate = sharding.generate_fn(ucfg.model, ctx.sampling, stage.samples_per_prompt)
    rollout = sharding.to_host(generate(params, prompt_tokens, prompt_mask, frames, key_data))
  timings["time/sample_s"] = time.perf_counter() - t0

  t1 = time.perf_counter()
  g = stage.samples_per_prompt
  s, b = row_teacher.shape
  tokens, masks = rollout.tokens.reshape(s * b * g, -1), rollout.mask.reshape(s * b * g, -1)
  responses_of = lambda rows: decode_responses(tokens[rows], masks[rows], ctx.tokenizer)
  # Each example names its verifier (integer for the toy tasks; math / choice / exact for
  # record datasets).
  rewarded = [[ex for ex in exs for _ in range(g)] for exs in examples]  # [S][B*G]
  verify_stats = {}
  rewards = verify_local(responses_of, rewarded, np.repeat(local, g, axis=1), sharding,
                         verify_stats)
  advantages, zero_variance = group_advantages(rewards, g, ucfg.scale_by_std)
  row_teacher_g = np.repeat(row_teacher, g, axis=1)  # [S, B*G]
  is_native = row_teacher_g == NATIVE
  is_cross = row_teacher_g >= 0
  if not stage.cross_outcome_reward:
    advantages = np.where(is_native, advantages, 0.0)
  opd_beta = np.where(is_cross, beta[np.arange(s)[:, None], np.maximum(row_teacher_g, 0)], 0.0)
  rows = build_rows(prompt_tokens, prompt_mask, frames, rollout, advantages, opd_beta, g)
  if distil:
    # Cross slots of students without a teacher carry nothing: mask them out.
    dead = jnp.asarray(row_teacher_g == NO_TEACHER)
    rows.response_mask = jnp.where(dead[..., None], 0.0, rows.response_mask)
  timings["time/verify_s"] = time.perf_counter() - t1
  return Rollouts(rows, distil, int(prompt_tokens.shape[-1]), rewards, is_native, is_cross,
                  zero_variance, examples, row_teacher, local, responses_of,
                  int(np.asarray(rollout.lengths).sum()), timings, verify_stats)


def apply_update(stage: Stage, params: Params, opt_state, frozen_teachers: Params | None,
                 rollouts: Rollouts, ucfg: UpdateConfig, optimizer, routing: dict,
                 ref_params: Params | None = None, sharding=None):
  """The update half of a step: one optimizer step of every student on `rollouts`.
  Returns (params, opt_state, metrics as host arrays f32[S])."""
  distil, rows = rollouts.distil, rollouts.rows
  teachers = params if stage.live_teachers else frozen_teachers
  update_args = (params, opt_state, teachers if distil else None, rows,
                 routing if distil else None, ref_params if ucfg.loss.kl_coef > 0 else None)
  if sharding is None:
    params, opt_state, metrics = update(*update_args, ucfg=ucfg, optimizer=optimizer,
                                        distil=distil, prompt_len=rollouts.prompt_len)
    return params, opt_state, jax.device_get(metrics)
  # Rows and routing were built on the host: as numpy they enter through put_global.
  update_args = update_args[:3] + jax.device_get(update_args[3:5]) + update_args[5:]
  sharded_update = sharding.update_fn(ucfg, optimizer, distil, ucfg.loss.kl_coef > 0,
                                      cross_row_start=stage.native_prompts
                                      * stage.samples_per_prompt,
                                      prompt_len=rollouts.prompt_len)
  params, opt_state, metrics = sharded_update(*update_args)
  return params, opt_state, sharding.to_host(metrics)


def train_step(stage: Stage, step: int, params: Params, opt_state, frozen_teachers: Params | None,
               ctx: DataContext, ucfg: UpdateConfig, optimizer, key, rng: np.random.Generator,
               weight: float, assignment: np.ndarray, routing: dict,
               ref_params: Params | None = None, sharding=None,
               log_samples: int = 0) -> StepResult:
  """One CoPD step for every student (see the module docstring): collect_rollouts, then
  apply_update.

  log_samples: > 0 also returns that many native and cross rollouts per branch in
  StepResult.samples (completion_samples), for the completion log.

  sharding: a parallel.RunSharding, or None for the single-device path. With it, host
  arrays enter as global arrays (put_global), the sampler and the update run as jitted
  functions with explicit shardings, and rollouts / metrics come back with to_host; the
  returned params / opt_state stay sharded on the mesh."""
  got = collect_rollouts(stage, step, params, ctx, ucfg, key, rng, weight, assignment, sharding)
  t2 = time.perf_counter()
  params, opt_state, metrics = apply_update(stage, params, opt_state, frozen_teachers, got, ucfg,
                                            optimizer, routing, ref_params, sharding)
  timings = dict(got.timings, **{"time/update_s": time.perf_counter() - t2})

  native_mask = got.is_native.astype(np.float32)
  cross_mask = got.is_cross.astype(np.float32)
  rewards = got.rewards
  metrics["reward/native"] = (rewards * native_mask).sum(1) / np.maximum(native_mask.sum(1), 1)
  if got.distil:
    metrics["reward/cross"] = (rewards * cross_mask).sum(1) / np.maximum(cross_mask.sum(1), 1)
  if stage.native_prompts:  # fraction of native GRPO groups with equal rewards
    metrics["zero_variance_groups"] = got.zero_variance[:, :stage.native_prompts].mean(axis=1)
  metrics.update(timings)
  metrics.update(got.verify_stats)
  metrics["opd_weight"] = weight
  # Of the step's S*B prompts, how many this process loaded and verified (all of them in a
  # single-process run; its share of the batch in a multi-process one).
  metrics["data/prompts_loaded_by_this_process"] = float(got.local.sum())
  samples = completion_samples(got.examples, got.row_teacher, got.local, got.responses_of,
                               rewards, stage.samples_per_prompt,
                               log_samples) if log_samples else []
  return StepResult(params, opt_state, metrics, got.rollout_tokens, samples)


@functools.lru_cache(maxsize=None)
def make_optimizer(learning_rate: float, grad_clip_norm: float, weight_decay: float = 0.0):
  """Constant learning rate (the paper's), global-norm clipping per branch.

  Cached: the optimizer is a static argument of the jitted update, so equal settings must
  give the same object, or every stage and run would recompile."""
  return optax.chain(optax.clip_by_global_norm(grad_clip_norm),
                     optax.adamw(learning_rate, weight_decay=weight_decay))


def init_optimizer_state(optimizer, params: Params):
  return jax.vmap(optimizer.init)(params)


def merge_branches(stacked: Params, weights=None) -> Params:
  """The all-in-one model: a (uniform by default) parameter average of the branches."""
  return experts_lib.merge(stacked, weights)
