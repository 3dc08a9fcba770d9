"""One CoPD training step. Every method (experts, mixed RLVR, static OPD, MOPD, CoPD) is a
`Stage` of this one step; `copd_jax.rl.methods` says which stages a method runs.

One step, for S student branches held as one stacked pytree (leading axis S):

  1. beta[k, j] = the teacher matrix for this step (`schedules`): topology x per-branch
     rate x schedule weight. It is data, not code: no recompilation when it changes.
  2. Sampling, one vmapped call over students: branch k draws G responses for B_native
     prompts of its own data (its GRPO batch) and, when its row of beta is non-zero,
     for B_cross prompts of its teachers' data (the cross batch of the paper's Phase II).
  3. Host: verifiers -> rewards -> group-normalised advantages for native rows
     (steps 2-3: rl.rollout.StageRollout, StageTrainer.rollout).
  4. `rl.update.StageUpdate` (one jitted program on the run's mesh, all branches at once;
     StageTrainer.update):
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

A `StageTrainer` is built once per stage (rl.loop.run_stage); the stage's statics (who
learns from whom, the data, the update's settings, the mesh, the frozen teachers and the
KL reference) are closed over then, as in big_vision's update_fn(train_state, rng,
batch). A step passes only what changes: the TrainState, the step index, the OPD weight
and the host RNG. Evaluation, diagnostics, logs and checkpoints are the loop's hooks.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from copd_jax.models.decoder import Params
from copd_jax.rl.rollout import Rollouts, StageRollout, completion_samples
from copd_jax.rl.stages import Stage
from copd_jax.rl.update import StageUpdate, TrainState

__all__ = ["StageTrainer", "StepResult", "TrainState", "step_metrics"]


@dataclasses.dataclass
class StepResult:
  """state: the students after the step; metrics: name -> np.ndarray[S] or float;
  rollouts: the step's scored rollouts (for the completion log: samples())."""
  state: TrainState
  metrics: dict
  rollouts: Rollouts

  @property
  def rollout_tokens(self) -> int:
    return self.rollouts.rollout_tokens

  def samples(self, per_kind: int) -> list[dict]:
    """The first sample of `per_kind` native and cross prompts of every branch
    (rollout.completion_samples)."""
    return completion_samples(self.rollouts, per_kind)


@dataclasses.dataclass(frozen=True, eq=False)
class StageTrainer:
  """One stage's step, built once per stage: rollout (host: prompts, samples, rewards,
  advantages), then update (device: teacher scoring, losses, optimizer).

  stage: who learns from which data and teachers; rollout: the stage's
  rollout.StageRollout (owns the sampler); update: its update.StageUpdate;
  frozen_teachers: stacked params of frozen teachers, or None (live teachers are the
  students themselves)."""
  stage: Stage
  rollout_fn: StageRollout
  update_fn: StageUpdate
  frozen_teachers: Params | None = None

  def init_state(self, params: Params) -> TrainState:
    """The stage's first TrainState of params (stacked [S]), on the run's mesh."""
    return self.update_fn.init_state(params)

  def rollout(self, state: TrainState, step: int, weight: float,
              rng: np.random.Generator) -> Rollouts:
    """The students' scored rollouts of step `step` (sampling key fold_in(key, step)) at
    OPD weight `weight`; rng: the host RNG that draws prompts (advanced in place)."""
    return self.rollout_fn.collect_rollouts(state.params, step, weight, rng)

  def teachers(self, state: TrainState) -> Params | None:
    """The teachers of a step: the current students (live) or the frozen ones."""
    return state.params if self.stage.live_teachers else self.frozen_teachers

  def update(self, state: TrainState, rollouts: Rollouts, teachers: Params | None):
    """One optimizer step of every student on `rollouts`. Returns (new TrainState,
    metrics as host arrays f32[S])."""
    return self.update_fn.apply_update(state, rollouts, teachers)

  def step(self, state: TrainState, step: int, weight: float,
           rng: np.random.Generator) -> StepResult:
    """One CoPD step for every student: rollout, then update (see the module doc)."""
    got = self.rollout(state, step, weight, rng)
    t2 = time.perf_counter()
    new_state, metrics = self.update(state, got, self.teachers(state))
    got.timings["time/update_s"] = time.perf_counter() - t2
    return StepResult(new_state, step_metrics(self.stage, got, metrics, weight), got)


def step_metrics(stage: Stage, got: Rollouts, metrics: dict, weight: float) -> dict:
  """The update's metrics plus the step's rewards, zero-variance groups, timings,
  verifier counters and OPD weight (f32[S] per branch, or floats)."""
  native_mask = got.is_native.astype(np.float32)
  cross_mask = got.is_cross.astype(np.float32)
  rewards = got.rewards
  metrics["reward/native"] = (rewards * native_mask).sum(1) / np.maximum(native_mask.sum(1), 1)
  if got.distil:
    metrics["reward/cross"] = (rewards * cross_mask).sum(1) / np.maximum(cross_mask.sum(1), 1)
  if stage.native_prompts:  # fraction of native GRPO groups with equal rewards
    metrics["zero_variance_groups"] = got.zero_variance[:, :stage.native_prompts].mean(axis=1)
  metrics.update(got.timings)
  metrics.update(got.verify_stats)
  metrics["opd_weight"] = weight
  # Of the step's S*B prompts, how many this process loaded and verified (all of them in a
  # single-process run; its share of the batch in a multi-process one).
  metrics["data/prompts_loaded_by_this_process"] = float(got.local.sum())
  return metrics
