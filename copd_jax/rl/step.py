"""One CoPD training step. Every method (experts, mixed RLVR, static OPD, MOPD, CoPD) is a
`Stage` of this one step; `copd_jax.rl.methods` says which stages a method runs.

One step, for S student branches held as one stacked pytree (leading axis S):

  1. beta[k, j] = the teacher matrix for this step (`schedules`): topology x per-branch
     rate x schedule weight. It is data, not code: no recompilation when it changes.
  2. Sampling, one vmapped call over students: branch k draws G responses for B_native
     prompts of its own data (its GRPO batch) and, when its row of beta is non-zero,
     for B_cross prompts of its teachers' data (the cross batch of the paper's Phase II).
  3. Host: verifiers -> rewards -> group-normalised advantages for native rows
     (steps 2-3: rl.rollout.collect_rollouts).
  4. `rl.update.update` (one jitted program on the run's mesh, all branches at once;
     apply_update here):
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
import time
from typing import Any

import flax.struct
import jax
import numpy as np

from copd_jax.models.decoder import Params
from copd_jax.rl.rollout import DataContext, Rollouts, collect_rollouts, completion_samples
from copd_jax.rl.rows import UpdateConfig
from copd_jax.rl.stages import Stage
from copd_jax.rl.update import update
from copd_jax.sharding import RunSharding


@dataclasses.dataclass(frozen=True, eq=False)
class StepPlan:
  """What every step of a stage shares (built once per stage by rl.loop.run_stage).

  stage: who learns from which data and teachers; data: where prompts come from
  (rollout.DataContext); ucfg / optimizer: the update's settings; key: the stage's PRNG
  key (step k samples with fold_in(key, k)); assignment int[S, B]: each prompt slot's
  teacher (stages.cross_teacher_assignment); routing: its TeacherRouting as arrays;
  sharding: the run's sharding.RunSharding (one device: a mesh of size 1). Host arrays
  enter as global arrays, the sampler and the update run on its mesh, and rollouts /
  metrics come back to the host; params stay on the mesh;
  frozen_teachers: stacked params of frozen teachers, or None (live teachers are the
  students themselves); ref_params: the KL reference (one model), or None.
  """
  stage: Stage
  data: DataContext
  ucfg: UpdateConfig
  optimizer: Any
  key: Any
  assignment: np.ndarray
  routing: dict
  sharding: RunSharding
  frozen_teachers: Params | None = None
  ref_params: Params | None = None


@flax.struct.dataclass
class TrainState:
  """The students' stacked params [S, ...] and optimizer state: what a step changes."""
  params: Params
  opt_state: Any


@dataclasses.dataclass
class StepResult:
  state: TrainState
  metrics: dict  # name -> np.ndarray[S] or float
  rollout_tokens: int
  # A few rollouts for the completion log (train_step's log_samples > 0), else empty.
  samples: list = dataclasses.field(default_factory=list)


def apply_update(plan: StepPlan, state: TrainState, rollouts: Rollouts):
  """The update half of a step: one optimizer step of every student on `rollouts`.
  Returns (new TrainState, metrics as host arrays f32[S])."""
  stage, distil = plan.stage, rollouts.distil
  teachers = state.params if stage.live_teachers else plan.frozen_teachers
  kl = plan.ucfg.loss.kl_coef > 0
  # Rows and routing were built on the host: as numpy they enter through put_global.
  rows, routing = jax.device_get((rollouts.rows, plan.routing))
  params, opt_state, metrics = update(
      state.params, state.opt_state, teachers, rows, routing, plan.ref_params if kl else None,
      run=plan.sharding, ucfg=plan.ucfg, optimizer=plan.optimizer, distil=distil,
      cross_row_start=stage.native_prompts * stage.samples_per_prompt,
      prompt_len=rollouts.prompt_len)
  return TrainState(params, opt_state), plan.sharding.to_host(metrics)


def train_step(plan: StepPlan, state: TrainState, step: int, weight: float,
               rng: np.random.Generator, log_samples: int = 0) -> StepResult:
  """One CoPD step for every student: collect_rollouts (host: prompts, samples, rewards,
  advantages), then apply_update (device: teacher scoring, losses, optimizer).

  step: the step index within the stage; weight: the OPD weight of this step (schedules);
  rng: the host RNG that draws prompts (advanced in place).
  log_samples: > 0 also returns that many native and cross rollouts per branch in
  StepResult.samples (completion_samples), for the completion log."""
  stage = plan.stage
  got = collect_rollouts(plan, state.params, step, weight, rng)
  t2 = time.perf_counter()
  state, metrics = apply_update(plan, state, got)
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
  return StepResult(state, metrics, got.rollout_tokens, samples)
