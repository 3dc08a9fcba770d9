"""One training step: collect rollouts on the host, then apply the jitted update."""
from __future__ import annotations
import dataclasses
import time
from typing import Any
import jax
import numpy as np
from copd_jax.rl.rollout import DataContext, Params, Rollouts, collect_rollouts, completion_samples
from copd_jax.rl.rows import UpdateConfig
from copd_jax.rl.stages import Stage
from copd_jax.rl.update import update


@dataclasses.dataclass
class StepResult:
  params: Params
  opt_state: Any
  metrics: dict  # name -> np.ndarray[S] or float
  rollout_tokens: int
  # A few rollouts for the completion log (train_step's log_samples > 0), else empty.
  samples: list = dataclasses.field(default_factory=list)


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
