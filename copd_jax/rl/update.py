"""The device half of a step: losses, gradients and one optimizer step of every branch."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from copd_jax import kernels, losses
from copd_jax.models import lora, partitioning
from copd_jax.models.decoder import Params
from copd_jax.rl.rows import Rows, UpdateConfig, join_rows, loss_columns, loss_targets, split_rows
from copd_jax.rl.scoring import (
  Teachers,
  _response_hidden,
  lm_head,
  reference_logprobs,
  score_by_teachers,
)
from copd_jax.sharding import MeshProgram, RunSharding, place


@flax.struct.dataclass
class TrainState:
  """The students' stacked params [S, ...] and optimizer state: what a step changes."""
  params: Params
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class UpdateFn:
  """A run's update with its statics bound once, when the step is built (big_vision's
  update_fn(train_state, rng, batch)): the mesh, the update's settings and the optimizer.
  A step passes only what changes: update(fn, state, rows, teachers, ref_params).

  Hashable (the RunSharding by identity, the UpdateConfig and the cached optimizer of
  make_optimizer by value): it is the one static argument of the jitted program
  (update_program), so updates with equal settings share one compile."""
  run: RunSharding
  ucfg: UpdateConfig
  optimizer: optax.GradientTransformation

  def init_state(self, params: Params) -> TrainState:
    """The first TrainState of params (stacked [S]): them and a fresh optimizer state
    (init_optimizer_state), both placed on the run's mesh."""
    opt_state = init_optimizer_state(self.optimizer, params)
    # On the mesh before a checkpoint's restore target is taken from them.
    return TrainState(self.run.shard_params(params),
                      place(opt_state, self.run.opt_state(opt_state)))


@dataclasses.dataclass(frozen=True, eq=False)
class StageUpdate:
  """The device half of a stage's step, built once per stage (rl.step.StageTrainer):
  `apply_update(state, batch, teachers)` with the stage's statics closed over.

  fn: the run's UpdateFn (mesh, settings, the stage's optimizer); routing: the stage's
  TeacherRouting as host arrays (stages.teacher_routing); native_rows: the native rows
  per student (the routing's); ref_params: the KL reference (one model) when
  ucfg.loss.kl_coef > 0, else None."""
  fn: UpdateFn
  routing: dict
  native_rows: int
  ref_params: Params | None = None

  def init_state(self, params: Params) -> TrainState:
    """The stage's first TrainState (UpdateFn.init_state)."""
    return self.fn.init_state(params)

  def apply_update(self, state: TrainState, batch, teachers: Params | None):
    """One optimizer step of every student on `batch` (rollout.Rollouts: its rows [S, R,
    ...] and whether it distils); teachers: stacked [J] (the students' own params for
    live teachers, read before the update). Returns (new TrainState, metrics as host
    arrays f32[S])."""
    # Rows were built on the host: as numpy they enter through put_global.
    rows = jax.device_get(batch.rows)
    step_teachers = Teachers(teachers, self.routing, self.native_rows) if batch.distil else None
    new_state, metrics = update(self.fn, state, rows, step_teachers, self.ref_params)
    return new_state, self.fn.run.to_host(metrics)


def student_loss_sum(params: Params, rows: Rows, teacher_logprobs, ref_logprobs,
                     ucfg: UpdateConfig):
  """One student's (loss_sum, (denominator, aux)) on its rows (Rows without the S axis):
  the pair whose sums over micro-batches give the exact full-batch loss. teacher_logprobs,
  ref_logprobs: f32[R, W] on the loss columns (or None); for the top_k / full_vocab OPD
  estimators teacher_logprobs is the teacher's support (log-probs f32[R, W, k], ids
  int32[R, W, k]) (score_by_teachers); aux: [R, W] arrays. Only the loss columns are
  computed: the others have response_mask 0 and add nothing to the loss."""
  prompt_len = rows.prompt_len
  hidden = _response_hidden(params, ucfg, rows.inputs, prompt_len)
  head = lm_head(params, ucfg)
  response_mask = loss_columns(rows.response_mask, prompt_len)
  opd_beta = None
  if teacher_logprobs is not None:
    opd_beta = rows.opd_beta[:, None] * response_mask
  support = None
  if isinstance(teacher_logprobs, tuple):  # the teacher's top k: a KL term, not an advantage
    support, teacher_logprobs = teacher_logprobs, None
  loss_sum, denominator, aux = kernels.sequence_policy_loss(
      hidden, head, loss_targets(rows.tokens, prompt_len), rows.advantages,
      loss_columns(rows.old_logprobs, prompt_len), response_mask, ref_logprobs=ref_logprobs,
      teacher_logprobs=teacher_logprobs, opd_beta=opd_beta, teacher_support=support,
      config=ucfg.loss, kernel=ucfg.kernel)
  return loss_sum, (denominator, aux)


def student_loss(params: Params, rows: Rows, teacher_logprobs, ref_logprobs, ucfg: UpdateConfig):
  """One student's token-mean loss on its rows. rows: Rows without the S axis."""
  loss_sum, (denominator, aux) = student_loss_sum(params, rows, teacher_logprobs, ref_logprobs,
                                                  ucfg)
  return losses.mean_from_sum(loss_sum, denominator), aux


def student_grads(params: Params, rows: Rows, teacher_logprobs, ref_logprobs,
                  ucfg: UpdateConfig):
  """(loss, aux of [R, W] arrays, grads) of one student, accumulated over micro-batches of
  ucfg.micro_batch_rows rows (jax.lax.scan; only one micro-batch's activations live; with
  a prompt length, micro-batches hold whole prompts).

  Exact: the loss is loss_sum / denominator with a denominator that does not depend on
  the parameters, so grad = (sum of micro-batch grad(loss_sum)) / (sum of denominators)."""
  count = rows.tokens.shape[0]
  size = ucfg.micro_batch_rows
  prompt_len = rows.prompt_len
  # Gradients of what trains only: a LoRA branch's adapters (its base is frozen), else
  # every parameter.
  weights = lora.trainable(params)

  def loss_of(trained, *args):
    return student_loss(lora.with_trainable(params, trained), *args)

  def loss_sum_of(trained, *args):
    return student_loss_sum(lora.with_trainable(params, trained), *args)

  if not size or size >= count:
    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(
        weights, rows, teacher_logprobs, ref_logprobs, ucfg)
    return loss, aux, grads
  group = ucfg.samples_per_prompt if prompt_len else 1
  chunks = jax.tree.map(lambda x: split_rows(x, size, group),
                        (rows, teacher_logprobs, ref_logprobs))

  def accumulate(total, chunk):
    (loss_sum, (denominator, aux)), grads = jax.value_and_grad(loss_sum_of, has_aux=True)(
        weights, *chunk, ucfg)
    return jax.tree.map(jnp.add, total, (grads, loss_sum, denominator)), aux

  zero = jnp.zeros((), jnp.float32)
  (grad_sum, loss_sum, denominator), aux = jax.lax.scan(
      accumulate, (jax.tree.map(jnp.zeros_like, weights), zero, zero), chunks)
  scale = jnp.where(denominator > 0, 1.0 / jnp.maximum(denominator, 1e-30), 0.0)
  grads = jax.tree.map(lambda x: x * scale.astype(x.dtype), grad_sum)
  aux = jax.tree.map(lambda x: join_rows(x, count, group), aux)
  return losses.mean_from_sum(loss_sum, denominator), aux, grads


def _branch_metrics(rows: Rows, aux: dict, teacher_logprobs, loss, tis_cap: float = 0.0) -> dict:
  """Per-branch scalars from one student's rows (Rows without the S axis), its loss aux
  ([R, W] arrays on the loss columns, see loss_columns) and loss. With TIS (tis_cap > 0):
  tis/applied (1), tis/weight_mean and tis/clipped_fraction over the response tokens."""
  prompt_len = rows.prompt_len
  m = loss_columns(rows.response_mask, prompt_len)
  mean = lambda x, w=m: jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)
  out = {"loss": loss, "entropy": mean(aux["entropy"]),
         "clip_fraction": mean(aux["clipped_low"] + aux["clipped_high"]),
         "ratio": mean(aux["ratio"]),
         "sampler_logprob_gap": mean(jnp.abs(aux["logprobs"]
                                             - loss_columns(rows.old_logprobs, prompt_len))),
         "response_tokens": jnp.sum(m) / jnp.maximum(jnp.sum(jnp.any(m > 0, -1)), 1.0)}
  if tis_cap > 0:
    out["tis/applied"] = jnp.ones((), jnp.float32)
    out["tis/weight_mean"] = mean(aux["tis_weight"])
    out["tis/clipped_fraction"] = mean(aux["tis_clipped"])
  if isinstance(teacher_logprobs, tuple):  # top_k / full_vocab: the KL on the support
    cross = m * (rows.opd_beta[:, None] > 0)
    out["opd/kl_mean"] = mean(aux["opd_kl"], cross)
    out["opd/tokens"] = jnp.sum(cross)
  elif teacher_logprobs is not None:
    cross = m * (rows.opd_beta[:, None] > 0)
    # The OPD advantage actually used: total advantage minus the RL part.
    opd_advantage = aux["advantages"] - rows.advantages[:, None]
    delta = opd_advantage / jnp.where(cross > 0, rows.opd_beta[:, None], 1.0)  # log p_t - log p_s
    out["opd/delta_mean"] = mean(delta, cross)
    out["opd/delta_std"] = jnp.sqrt(jnp.maximum(mean(delta ** 2, cross) - mean(delta, cross) ** 2, 0))
    out["opd/advantage_mean"] = mean(opd_advantage, cross)
    out["opd/tokens"] = jnp.sum(cross)
  return out


def update(fn: UpdateFn, state: TrainState, rows: Rows, teachers: Teachers | None = None,
           ref_params: Params | None = None):
  """One optimizer step for every student branch, on fn.run's mesh (one device: a mesh of
  size 1). Returns (new TrainState, metrics), global arrays on the mesh.

  state: the students' stacked [S] params and optimizer state; rows: Rows [S, R, ...]
  (device or host arrays; rows.prompt_len P > 0 runs each prompt once, see Rows);
  teachers: the step's Teachers when it distils, else None; ref_params: one
  single-model pytree (the base), required when fn.ucfg.loss.kl_coef > 0.
  metrics: dict of f32[S]."""
  return update_program(fn)(state, rows, teachers, ref_params)


def update_body(fn: UpdateFn, state: TrainState, rows: Rows, teachers: Teachers | None,
                ref_params: Params | None):
  """The traceable body of `update` (same arguments), traced on fn.run's mesh
  (_update_on_mesh): teacher scoring (score_by_teachers, its rows placed by
  RunSharding.regroup_placement), the losses and the optimizer step. Gradients accumulate
  over micro-batches of ucfg.micro_batch_rows rows (student_grads)."""
  ucfg, params, opt_state = fn.ucfg, state.params, state.opt_state
  teacher_logprobs = None
  if teachers is not None:
    teacher_logprobs = score_by_teachers(teachers, rows, ucfg, fn.run.regroup_placement())
  ref_lp = None
  if ucfg.loss.kl_coef > 0:
    if ref_params is None:
      raise ValueError("ref_params (the reference policy) are required when kl_coef > 0")
    ref_lp = reference_logprobs(ref_params, rows, ucfg)

  def one_branch(p, r, t_lp, ref):
    loss, aux, grads = student_grads(p, r, t_lp, ref, ucfg)
    metrics = _branch_metrics(r, aux, t_lp, loss, ucfg.loss.tis_cap)
    if ref is not None:
      m = loss_columns(r.response_mask, r.prompt_len)
      metrics["kl_to_reference"] = jnp.sum(aux["kl"] * m) / jnp.maximum(jnp.sum(m), 1.0)
    return grads, metrics

  # The branch axis is `expert`: sharding constraints inside (the activation constraint
  # of sharding.RunSharding.constrain_rows) then keep it there. On a multi-device mesh
  # whose expert axis is 1 the branches run one after another (map_over_branches).
  grads, metrics = partitioning.map_over_branches(one_branch, params, rows, teacher_logprobs,
                                                  ref_lp, spmd_axis_name="expert")
  metrics["grad_norm"] = jax.vmap(optax.tree_utils.tree_norm)(grads)
  # What the optimizer steps: every parameter, or a LoRA run's adapters (lora.trainable).
  trained = lora.trainable(params)
  updates, new_opt_state = jax.vmap(fn.optimizer.update)(grads, opt_state, trained)
  # How far the step moves each branch: the global norm of the update and its largest
  # entry (RL that does not learn often moves the weights by almost nothing).
  metrics["update_norm"] = jax.vmap(optax.tree_utils.tree_norm)(updates)
  metrics["update_max_abs"] = jax.vmap(
      lambda u: jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(u)])))(updates)
  new_trained = optax.apply_updates(trained, updates)
  # Per branch: apply the update only if its loss, gradient norm, new parameters and new
  # optimizer state are all finite; a branch whose step is not keeps its previous state,
  # and the other branches' updates are applied all the same. Finiteness of a tree is read
  # from its global norm (one reduction per branch): a NaN or inf anywhere makes the norm
  # non-finite. (An element-wise isfinite over every leaf feeding the select instead made
  # XLA:CPU compile the update 3-4x slower.) The norm also overflows for magnitudes
  # above ~1e19, which counts as diverged too.
  applied = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
             & jnp.isfinite(float_norm_per_branch(new_trained))
             & jnp.isfinite(float_norm_per_branch(new_opt_state)))
  metrics["update_applied"] = applied.astype(jnp.float32)
  new_state = TrainState(lora.with_trainable(params, select_branches(applied, new_trained, trained)),
                         select_branches(applied, new_opt_state, opt_state))
  return new_state, metrics


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


@functools.lru_cache(maxsize=None)
def learning_rate_schedule(learning_rate: float, schedule: str = "constant",
                           decay_steps: int = 0, end_fraction: float = 0.0):
  """The learning rate of each optimizer step: "constant" (the paper's) keeps
  `learning_rate` (returned as the float); "cosine" decays it from `learning_rate` to
  `end_fraction * learning_rate` over `decay_steps` optimizer steps (a stage's length) and
  holds it there (an optax schedule). The step count lives in the optimizer state, so a
  resumed stage continues on the same curve. Cached, as make_optimizer is."""
  if schedule == "constant":
    return learning_rate
  if schedule == "cosine":
    if decay_steps < 1:
      raise ValueError(f"a cosine learning-rate schedule needs decay_steps >= 1, got {decay_steps}")
    return optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_fraction)
  raise ValueError(f"unknown learning-rate schedule {schedule!r}; use 'constant' or 'cosine'")


@functools.lru_cache(maxsize=None)
def make_optimizer(learning_rate, grad_clip_norm: float, weight_decay: float = 0.0):
  """AdamW with global-norm clipping per branch. learning_rate: a float or a
  learning_rate_schedule.

  Cached: the optimizer is part of the jitted update's static argument (UpdateFn), so
  equal settings must give the same object, or every stage and run would recompile."""
  return optax.chain(optax.clip_by_global_norm(grad_clip_norm),
                     optax.adamw(learning_rate, weight_decay=weight_decay))


def optimizer_for_stage(rl, steps: int):
  """The optimizer of a stage of `steps` optimizer steps under config.rl's settings."""
  rate = learning_rate_schedule(rl.learning_rate, rl.lr_schedule, max(int(steps), 1),
                                float(rl.lr_end_fraction))
  return make_optimizer(rate, rl.grad_clip_norm, rl.weight_decay)


def init_optimizer_state(optimizer, params: Params):
  """Stacked [S] optimizer state of what trains (lora.trainable: a LoRA run's adapters;
  its shared base has none)."""
  return jax.vmap(optimizer.init)(lora.trainable(params))


def _update_on_mesh(fn: UpdateFn, state: TrainState, rows: Rows, teachers: Teachers | None,
                    ref_params: Params | None):
  """update_body with the policy's residual stream pinned to the mesh (the activation
  constraint of RunSharding.constrain_rows, which exists only while traced on it)."""
  on_mesh = dataclasses.replace(fn, ucfg=fn.ucfg.with_constraint(fn.run.constrain_rows))
  return update_body(on_mesh, state, rows, teachers, ref_params)


def update_program(fn: UpdateFn) -> MeshProgram:
  """`update` as a program on fn.run's mesh: program(state, rows, teachers, ref_params)
  (None where unused) runs it, program.lower(...) lowers it (arguments may be
  jax.ShapeDtypeStruct). Parameters and optimizer state shard as the model's layers
  declare them (and come back so), rows expert x batch, the teachers' routing
  replicated, metrics f32[S] over expert. No buffer donation: with live teachers the
  same params arrive as the teachers' params."""
  run = fn.run

  def shardings(args):
    state, rows, teachers, ref = args
    state_sh = TrainState(run.stacked_params(state.params), run.opt_state(state.opt_state))
    s = jax.tree_util.tree_leaves(lora.trainable(state.params))[0].shape[0]
    teachers_sh = None if teachers is None else teachers.replace(
        params=run.stacked_params(teachers.params), routing=run.replicated)
    return ((state_sh, run.rows(rows), teachers_sh,
             None if ref is None else run.stacked_params(ref, stacked=False)),
            (state_sh, run.per_branch((s,))))
  return MeshProgram(_update_on_mesh, (fn,), run.mesh, shardings)
