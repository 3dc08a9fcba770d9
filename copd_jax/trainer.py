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
       a. teacher scoring: the cross rows are regrouped by teacher (token ids move to the
          teacher, parameters stay) and every teacher scores its rows in ONE vmapped
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
from typing import Any, Callable, Iterator, Sequence

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
  """Static regrouping of cross rows by teacher (computed once per stage on the host).

  Rows per student are [native rows | cross rows].
  gather_student, gather_row: int32[J, M] — teacher j's m-th row is row gather_row of
    student gather_student's rows; gather_valid: bool[J, M] (padding rows).
  slot: int32[S, R] — where each row's score lands in the flattened [J*M] (native rows: 0,
    unused because their beta is 0).
  """
  gather_student: np.ndarray
  gather_row: np.ndarray
  gather_valid: np.ndarray
  slot: np.ndarray

  def as_arrays(self) -> dict:
    """The fields as device arrays, the `routing` argument of `update`."""
    return {k: jnp.asarray(v) for k, v in dataclasses.asdict(self).items()}


def teacher_routing(assignment: np.ndarray, num_teachers: int, samples: int,
                    native_rows: int = 0) -> TeacherRouting:
  """assignment: int32[S, B_cross] (per prompt) -> routing for rows laid out as
  [native_rows native rows | B_cross*G cross rows] per student."""
  row_teacher = np.repeat(assignment, samples, axis=1)  # [S, R_cross]
  row_teacher = np.pad(row_teacher, ((0, 0), (native_rows, 0)), constant_values=NATIVE)
  s, r = row_teacher.shape
  per_teacher = [np.argwhere(row_teacher == j) for j in range(num_teachers)]
  m = max(1, max(len(rows) for rows in per_teacher))
  gather_student = np.zeros((num_teachers, m), np.int32)
  gather_row = np.zeros((num_teachers, m), np.int32)
  gather_valid = np.zeros((num_teachers, m), bool)
  slot = np.zeros((s, r), np.int32)
  for j, rows in enumerate(per_teacher):
    gather_student[j, :len(rows)] = rows[:, 0]
    gather_row[j, :len(rows)] = rows[:, 1]
    gather_valid[j, :len(rows)] = True
    slot[rows[:, 0], rows[:, 1]] = j * m + np.arange(len(rows))
  return TeacherRouting(gather_student, gather_row, gather_valid, slot)


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


def score_by_teachers(teacher_params: Params, rows: Rows, routing: dict, ucfg: UpdateConfig,
                      placement: tuple[Callable, Callable] | None = None,
                      cross_row_start: int = 0):
  """Sampled-token log-probs of each cross row under its teacher: f32[S, R, T].

  Token ids (not parameters) are regrouped by teacher: teacher j sees [M, T] rows.
  cross_row_start (static): rows before it are native rows that no teacher reads, so only
    rows [cross_row_start:] take part in the regroup (less to move between devices).
  placement: optional (sources, regrouped) sharding constraints from
    parallel.RunSharding.regroup_placement: `sources` pins the cross rows [S, Rc, ...]
    before the gather, `regrouped` pins teacher j's rows [J, M, ...] (and the scores coming
    back) to teacher j's devices, so the partitioner moves int tokens to the teacher rather
    than the teacher's parameters.
  """
  sources, regrouped = placement or ((lambda x: x), (lambda x: x))
  gs = routing["gather_student"]
  gr = jnp.maximum(routing["gather_row"] - cross_row_start, 0)  # padding rows point at 0
  pick = lambda x: regrouped(sources(x[:, cross_row_start:])[gs, gr])  # [S, R] -> [J, M]
  place = regrouped
  tokens, positions, frames = pick(rows.tokens), pick(rows.positions), pick(rows.frames)
  # Padding rows (a teacher with fewer rows than M) attend to their first column only,
  # so their (unused) softmax stays finite.
  only_first = jnp.zeros(tokens.shape, bool).at[..., 0].set(True)
  mask = place(jnp.where(routing["gather_valid"][..., None], pick(rows.token_mask), only_first))

  def one_teacher(params, tok, pos, msk, frm):
    hidden = model_lib.forward_hidden(params, ucfg.model, tok, pos, msk, frm)
    head = model_lib.lm_head(params, ucfg.model)
    return kernels.sampled_token_logprobs(hidden, head, sampling.next_token_targets(tok),
                                          kernel=ucfg.kernel)

  scores = place(jax.vmap(one_teacher)(jax.lax.stop_gradient(teacher_params), tokens,
                                       positions, mask, frames))  # [J, M, T]
  return scores.reshape(-1, scores.shape[-1])[routing["slot"]]


def reference_logprobs(ref_params: Params, rows: Rows, ucfg: UpdateConfig):
  """Sampled-token log-probs of every student's rows under one frozen reference policy
  (the shared base): f32[S, R, T], for the KL-to-reference penalty."""
  ref_params = jax.lax.stop_gradient(ref_params)

  def one_student(r):
    hidden = model_lib.forward_hidden(ref_params, ucfg.model, r.tokens, r.positions,
                                      r.token_mask, r.frames)
    return kernels.sampled_token_logprobs(hidden, model_lib.lm_head(ref_params, ucfg.model),
                                          sampling.next_token_targets(r.tokens),
                                          kernel=ucfg.kernel)
  return jax.vmap(one_student)(rows)


def student_loss(params: Params, rows: Rows, teacher_logprobs, ref_logprobs, ucfg: UpdateConfig):
  """One student's token-mean loss on its rows. rows: Rows without the S axis."""
  hidden = model_lib.forward_hidden(params, ucfg.model, rows.tokens, rows.positions,
                                    rows.token_mask, rows.frames)
  head = model_lib.lm_head(params, ucfg.model)
  opd_beta = None
  if teacher_logprobs is not None:
    opd_beta = rows.opd_beta[:, None] * rows.response_mask
  loss_sum, denominator, aux = kernels.sequence_policy_loss(
      hidden, head, sampling.next_token_targets(rows.tokens), rows.advantages,
      rows.old_logprobs, rows.response_mask, ref_logprobs=ref_logprobs,
      teacher_logprobs=teacher_logprobs, opd_beta=opd_beta, config=ucfg.loss, kernel=ucfg.kernel)
  return objectives.mean_from_sum(loss_sum, denominator), aux


def _branch_metrics(rows: Rows, aux: dict, teacher_logprobs, loss) -> dict:
  """Per-branch scalars from one student's rows and loss aux ([R, T] arrays)."""
  m = rows.response_mask
  mean = lambda x, w=m: jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)
  out = {"loss": loss, "entropy": mean(aux["entropy"]),
         "clip_fraction": mean(aux["clipped_low"] + aux["clipped_high"]),
         "ratio": mean(aux["ratio"]),
         "sampler_logprob_gap": mean(jnp.abs(aux["logprobs"] - rows.old_logprobs)),
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
@functools.partial(jax.jit, static_argnames=("ucfg", "optimizer", "distil"))
def update(params: Params, opt_state, teacher_params: Params | None, rows: Rows,
           routing: dict | None, ref_params: Params | None = None, *, ucfg: UpdateConfig,
           optimizer: optax.GradientTransformation, distil: bool):
  """One optimizer step for every student branch. Returns (params, opt_state, metrics).

  params, opt_state: stacked [S]; teacher_params: stacked [J] or None (live teachers:
  pass the same params — they are read before the update, under stop-gradient);
  rows: Rows [S, R, ...]; routing: TeacherRouting fields as arrays (distil steps only);
  ref_params: one single-model pytree (the base), required when ucfg.loss.kl_coef > 0.
  metrics: dict of f32[S].
  Single-device jit; parallel.RunSharding.update_fn jits `update_body` with explicit
  shardings instead.
  """
  return update_body(params, opt_state, teacher_params, rows, routing, ref_params, ucfg=ucfg,
                     optimizer=optimizer, distil=distil)


def update_body(params: Params, opt_state, teacher_params: Params | None, rows: Rows,
                routing: dict | None, ref_params: Params | None = None, *,
                ucfg: UpdateConfig, optimizer: optax.GradientTransformation, distil: bool,
                placement: tuple[Callable, Callable] | None = None, cross_row_start: int = 0):
  """The traceable body of `update` (same arguments); placement and cross_row_start: see
  score_by_teachers."""
  teacher_logprobs = None
  if distil:
    teacher_logprobs = score_by_teachers(teacher_params, rows, routing, ucfg, placement,
                                         cross_row_start)
  ref_lp = None
  if ucfg.loss.kl_coef > 0:
    if ref_params is None:
      raise ValueError("ref_params (the reference policy) are required when kl_coef > 0")
    ref_lp = reference_logprobs(ref_params, rows, ucfg)

  def one_branch(p, r, t_lp, ref):
    (loss, aux), grads = jax.value_and_grad(student_loss, has_aux=True)(p, r, t_lp, ref, ucfg)
    metrics = _branch_metrics(r, aux, t_lp, loss)
    if ref is not None:
      metrics["kl_to_reference"] = jnp.sum(aux["kl"] * r.response_mask) / jnp.maximum(
          jnp.sum(r.response_mask), 1.0)
    return grads, metrics

  grads, metrics = jax.vmap(one_branch)(params, rows, teacher_logprobs, ref_lp)
  metrics["grad_norm"] = jax.vmap(optax.tree_utils.tree_norm)(grads)
  updates, opt_state = jax.vmap(optimizer.update)(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, metrics


# ------------------------------------------------------------------------- host side


@dataclasses.dataclass
class DataContext:
  """What the host loop needs to draw and encode prompts."""
  tokenizer: Any
  encode_prompts: Callable[[Sequence[tasks.Example]], tasks.PromptBatch]
  streams: dict[str, Iterator[tasks.Example]]  # one endless train stream per capability
  sampling: sampling.SamplingConfig


def draw_examples(ctx: DataContext, capabilities: Sequence[str], n: int,
                  rng: np.random.Generator) -> list[tasks.Example]:
  """n training examples, each from a capability drawn uniformly from `capabilities`."""
  picks = rng.integers(0, len(capabilities), size=n)
  return [next(ctx.streams[capabilities[i]]) for i in picks]


def stage_prompts(stage: Stage, ctx: DataContext, distil: bool, assignment: np.ndarray,
                  rng: np.random.Generator) -> tuple[list[list[tasks.Example]], np.ndarray]:
  """The examples each student samples on this step, native first then cross.

  Returns (examples[S][B_native (+ B_cross)], row_kind int32[S, B]: NATIVE, NO_TEACHER or
  the teacher index j of a cross prompt).
  """
  per_student, teachers = [], []
  for k, caps in enumerate(stage.student_data):
    native = draw_examples(ctx, caps, stage.native_prompts, rng) if stage.native_prompts else []
    row_teacher = [NATIVE] * len(native)
    if distil:
      for j in assignment[k]:
        # A student without teachers still fills its rows (masked out) to keep shapes.
        domain = stage.teacher_data[j] if j >= 0 else (caps or stage.teacher_data[0])
        native.append(draw_examples(ctx, domain, 1, rng)[0])
        row_teacher.append(int(j))
    per_student.append(native)
    teachers.append(row_teacher)
  return per_student, np.asarray(teachers, np.int32)


def stack_prompt_batches(batches: Sequence[tasks.PromptBatch]):
  return (np.stack([b.tokens for b in batches]), np.stack([b.mask for b in batches]),
          np.stack([b.frames for b in batches]))


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
              frames=jnp.repeat(jnp.asarray(frames), samples, axis=1))


@dataclasses.dataclass
class StepResult:
  params: Params
  opt_state: Any
  metrics: dict  # name -> np.ndarray[S] or float
  rollout_tokens: int


def train_step(stage: Stage, step: int, params: Params, opt_state, frozen_teachers: Params | None,
               ctx: DataContext, ucfg: UpdateConfig, optimizer, key, rng: np.random.Generator,
               weight: float, assignment: np.ndarray, routing: dict,
               ref_params: Params | None = None, sharding=None) -> StepResult:
  """One CoPD step for every student (see the module docstring).

  sharding: a parallel.RunSharding, or None for the single-device path. With it, host
  arrays enter as global arrays (put_global), the sampler and the update run as jitted
  functions with explicit shardings, and rollouts / metrics come back with to_host; the
  returned params / opt_state stay sharded on the mesh."""
  beta = schedules.teacher_matrix(stage.topology, stage.branch_beta, weight)  # [S, J]
  distil = stage.distils and weight > 0
  timings = {}
  t0 = time.perf_counter()
  examples, row_teacher = stage_prompts(stage, ctx, distil, assignment, rng)
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
  responses = decode_responses(rollout.tokens.reshape(s * b * g, -1),
                               rollout.mask.reshape(s * b * g, -1), ctx.tokenizer)
  answers = [ex.answer for exs in examples for ex in exs for _ in range(g)]
  rewards = verifiers.batch_rewards(responses, answers).reshape(s, b * g)
  advantages, zero_var_all = group_advantages(rewards, g, ucfg.scale_by_std)
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

  t2 = time.perf_counter()
  teachers = params if stage.live_teachers else frozen_teachers
  update_args = (params, opt_state, teachers if distil else None, rows,
                 routing if distil else None, ref_params if ucfg.loss.kl_coef > 0 else None)
  if sharding is None:
    params, opt_state, metrics = update(*update_args, ucfg=ucfg, optimizer=optimizer,
                                        distil=distil)
    metrics = jax.device_get(metrics)
  else:
    # Rows and routing were built on the host: as numpy they enter through put_global.
    update_args = update_args[:3] + jax.device_get(update_args[3:5]) + update_args[5:]
    sharded_update = sharding.update_fn(ucfg, optimizer, distil, ucfg.loss.kl_coef > 0,
                                        cross_row_start=stage.native_prompts * g)
    params, opt_state, metrics = sharded_update(*update_args)
    metrics = sharding.to_host(metrics)
  timings["time/update_s"] = time.perf_counter() - t2

  native_mask = is_native.astype(np.float32)
  cross_mask = is_cross.astype(np.float32)
  metrics["reward/native"] = (rewards * native_mask).sum(1) / np.maximum(native_mask.sum(1), 1)
  if distil:
    metrics["reward/cross"] = (rewards * cross_mask).sum(1) / np.maximum(cross_mask.sum(1), 1)
  if stage.native_prompts:  # fraction of native GRPO groups with equal rewards
    metrics["zero_variance_groups"] = zero_var_all[:, :stage.native_prompts].mean(axis=1)
  metrics.update(timings)
  metrics["opd_weight"] = weight
  return StepResult(params, opt_state, metrics, int(np.asarray(rollout.lengths).sum()))


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
