"""The stage loop's hooks (rl.loop.train_loop calls them): a hook's start(run) runs once
before a stage's first step (not when resuming it) and its after_step(run, result) after
every step, in the order loop.run_stage lists them: StepLog, Diagnostics, Evaluation,
Checkpointing, Preemption. `run` (StageRun) is what the loop carries from step to step;
`ctx` is the run's loop.RunContext (settings, writer, global step, checkpoints, stop
request)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from copd_jax import train_checkpoint
from copd_jax.rl import schedules, stages as stages_lib
from copd_jax.rl.stages import branch_names
from copd_jax.rl.step import StepResult, TrainState
from copd_jax.run_log import Phase, ProgressLine


@dataclasses.dataclass
class StageRun:
  """What a stage's loop carries from step to step: the students' TrainState and the host
  state a checkpoint restores (the prompt RNG, the schedule's state, the last measured
  overlap, the update counts). step: the steps of the stage done so far."""
  state: TrainState
  step: int
  rng: np.random.Generator
  schedule: schedules.ScheduleState
  counts: UpdateCounts
  last_overlap: float | None = None


@dataclasses.dataclass
class UpdateCounts:
  """Per branch of a stage: updates applied, skipped as non-finite, and skipped in a row
  just now (update_lib.update applies each branch's update only when it is finite)."""
  applied: list
  skipped: list
  in_row: list
  steps_with_skips: int = 0  # steps in which some branch's update was skipped

  @classmethod
  def zeros(cls, n: int) -> "UpdateCounts":
    return cls([0] * n, [0] * n, [0] * n)

  def record(self, applied: np.ndarray) -> list[int]:
    """applied: [S] flags of this step -> the indices of the branches skipped."""
    bad = [k for k, ok in enumerate(np.atleast_1d(applied)) if not ok]
    for k in range(len(self.applied)):
      if k in bad:
        self.skipped[k] += 1
        self.in_row[k] += 1
      else:
        self.applied[k] += 1
        self.in_row[k] = 0
    self.steps_with_skips += bool(bad)
    return bad

  def by_branch(self, names) -> dict:
    return {n: {"applied": a, "skipped": s}
            for n, a, s in zip(names, self.applied, self.skipped)}


def _check_nonfinite_budget(rl, stage, step: int, counts: UpdateCounts, bad, names, metrics):
  """Raises NonFiniteTrainingError when a branch skipped rl.max_nonfinite_steps_in_row
  updates in a row, or the stage skipped rl.max_nonfinite_steps_total in all."""
  total = sum(counts.skipped)
  limit_total = rl.max_nonfinite_steps_total
  in_row = max(counts.in_row)
  if in_row < rl.max_nonfinite_steps_in_row and (limit_total is None or total < limit_total):
    return
  why = (f"{in_row} non-finite updates in a row for branch "
         f"{names[counts.in_row.index(in_row)]!r}" if in_row >= rl.max_nonfinite_steps_in_row
         else f"{total} non-finite updates in total (config.rl.max_nonfinite_steps_total="
              f"{limit_total})")
  raise train_checkpoint.NonFiniteTrainingError(
      f"stage {stage.name}: {why} (last: step {step + 1}, branch(es) "
      f"{[names[k] for k in bad]}, loss {np.asarray(metrics['loss']).tolist()}, grad_norm "
      f"{np.asarray(metrics['grad_norm']).tolist()}); stopping. Lower "
      "config.rl.learning_rate or check the data")


def _log_branch_arrays(names, metrics: dict) -> dict:
  out = {}
  for key, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      out[key] = float(value)
    else:
      for name, v in zip(names, value):
        out[f"{name}/{key}"] = float(v)
  return out



def completions_to_log(cfg) -> int:
  """config.log.completions: prompts per capability / branch in the completion log."""
  return int(cfg.log.completions)


def train_completion_records(names, teacher_names, samples: list[dict], metrics: dict) -> list[dict]:
  """rollout_lib.completion_samples with branch / teacher names; cross rows of an OPD step
  carry the branch's mean teacher-student log-ratio on its cross tokens (opd/delta_mean)."""
  delta = metrics.get("opd/delta_mean")
  out = []
  for sample in samples:
    record = dict(sample, branch=names[sample["branch"]])
    if sample["teacher"] is not None:
      record["teacher"] = teacher_names[sample["teacher"]]
      if delta is not None:
        record["teacher_log_ratio"] = float(np.atleast_1d(delta)[sample["branch"]])
    out.append(record)
  return out




class StepLog:
  """Counts applied / skipped updates, writes the step's train/ metrics and completions,
  stops the run past the non-finite budget, and prints the progress line."""

  def __init__(self, ctx, stage: stages_lib.Stage, start_step: int):
    self.ctx, self.stage, self.names = ctx, stage, branch_names(stage)
    self.teacher_names = ["+".join(caps) for caps in stage.teacher_data]
    self.progress = ProgressLine(stage.name, stage.steps, ctx.cfg.rl.log_every,
                                 start_step=start_step)

  def start(self, run: StageRun) -> None:
    pass

  def after_step(self, run: StageRun, result: StepResult) -> None:
    ctx, stage, names, metrics = self.ctx, self.stage, self.names, result.metrics
    # The update applied each branch's update only where it was finite (a skipped branch
    # keeps its previous params and optimizer state; the others moved on).
    bad = run.counts.record(np.asarray(metrics["update_applied"]) > 0.5)
    ctx.update_counts[stage.name] = (names, run.counts)
    scalars = _log_branch_arrays(names, metrics)
    step_time = sum(v for k, v in metrics.items() if k.startswith("time/"))
    scalars["throughput/rollout_tokens_per_s"] = result.rollout_tokens / max(step_time, 1e-9)
    scalars["nonfinite_skipped"] = float(len(bad))
    scalars["nonfinite_skipped_total"] = float(sum(run.counts.skipped))
    ctx.writer.write(ctx.global_step, {f"train/{k}": v for k, v in scalars.items()})
    every = int(ctx.cfg.log.completions_every)
    samples = result.samples(completions_to_log(ctx.cfg)) if (
        completions_to_log(ctx.cfg) and every and run.step % every == 0) else []
    if samples:
      ctx.writer.write_completions(ctx.global_step, "train", train_completion_records(
          names, self.teacher_names, samples, metrics))
    _check_nonfinite_budget(ctx.cfg.rl, stage, run.step - 1, run.counts, bad, names, metrics)
    if bad:
      print(f"warning: stage {stage.name} step {run.step}: non-finite update of "
            f"branch(es) {[names[k] for k in bad]} not applied (the other branches' were; "
            f"{sum(run.counts.skipped)} skipped in this stage)", flush=True)
    self._progress(run, result)

  def _progress(self, run: StageRun, result: StepResult) -> None:
    key = "reward/native" if self.stage.native_prompts else "reward/cross"
    rewards = np.atleast_1d(result.metrics[key])
    per_branch = {}
    if len(self.names) > 1:  # each branch's native (or cross) reward as it is measured
      per_branch = {f"reward/{n}": float(r) for n, r in zip(self.names, rewards)}
    self.progress.update(run.step, result.rollout_tokens,
                         loss=float(np.mean(result.metrics["loss"])),
                         reward=float(np.mean(result.metrics[key])), **per_branch,
                         opd=result.metrics["opd_weight"])


def due(step: int, every: int, last: int) -> bool:
  """A periodic hook's turn: every `every` steps and at the stage's last step."""
  return step % every == 0 or step == last


class Diagnostics:
  """Overlap and symmetric KL between branches at the start, every rl.diagnostics_every
  steps and at the end; the adaptive schedule reads the last one. measure(params) ->
  {name: float} (loop.branch_diagnostics)."""

  def __init__(self, ctx, stage: stages_lib.Stage, measure: Callable[[Any], dict]):
    self.ctx, self.stage, self.measure = ctx, stage, measure

  def start(self, run: StageRun) -> None:
    self._measure(run)

  def after_step(self, run: StageRun, result) -> None:
    if due(run.step, self.ctx.cfg.rl.diagnostics_every, self.stage.steps):
      self._measure(run)

  def _measure(self, run: StageRun) -> None:
    ctx = self.ctx
    with Phase(f"diagnostics (overlap, symmetric KL) at step {ctx.global_step}"):
      scalars = self.measure(run.state.params)
    # The adaptive schedule watches the pairs that exchange (hub <-> spokes).
    run.last_overlap = scalars.get("overlap/linked_mean", scalars.get(
        "overlap/branches_mean", scalars["overlap/with_base_mean"]))
    ctx.writer.write(ctx.global_step, {f"eval/{k}": v for k, v in scalars.items()})


class Evaluation:
  """Held-out accuracy at the start, every rl.eval_every steps and at the end.
  evaluate(params) -> {name: float} (loop.evaluate_branches on the first
  rl.eval_examples of each capability)."""

  def __init__(self, ctx, stage: stages_lib.Stage, evaluate: Callable[[Any], dict]):
    self.ctx, self.stage, self.evaluate = ctx, stage, evaluate

  def start(self, run: StageRun) -> None:
    self._evaluate(run)

  def after_step(self, run: StageRun, result) -> None:
    if due(run.step, self.ctx.cfg.rl.eval_every, self.stage.steps):
      self._evaluate(run)

  def _evaluate(self, run: StageRun) -> None:
    ctx = self.ctx
    scalars = self.evaluate(run.state.params)
    ctx.writer.write(ctx.global_step, {f"eval/{k}": v for k, v in scalars.items()})


class Checkpointing:
  """Saves the stage every checkpoint.every_steps steps, at its end, and when a stop was
  requested (SIGTERM); the params, optimizer state and the host state that resumes it."""

  def __init__(self, ctx, stage: stages_lib.Stage, ckpt, streams: dict):
    self.ctx, self.stage, self.ckpt, self.streams = ctx, stage, ckpt, streams

  def start(self, run: StageRun) -> None:
    pass

  def after_step(self, run: StageRun, result) -> None:
    every = self.ctx.checkpoints.every_steps
    last = run.step == self.stage.steps
    if last or _stop_requested(self.ctx) or (every and run.step % every == 0):
      self.save(run, finished=last)

  def save(self, run: StageRun, finished: bool) -> None:
    ctx, counts = self.ctx, run.counts
    host = train_checkpoint.HostState(
        stage_step=run.step, global_step=ctx.global_step, finished=finished,
        numpy_rng=run.rng.bit_generator.state, schedule=dataclasses.asdict(run.schedule),
        last_overlap=run.last_overlap, streams=train_checkpoint.streams_state(self.streams),
        nonfinite_total=sum(counts.skipped), nonfinite_in_row=max(counts.in_row),
        metrics_offset=ctx.writer.jsonl_size(), applied_per_branch=counts.applied,
        skipped_per_branch=counts.skipped, in_row_per_branch=counts.in_row,
        steps_with_skips=counts.steps_with_skips)
    how = " (asynchronous: continues in the background)" if ctx.checkpoints.async_save else ""
    with Phase(f"checkpoint {self.stage.name} step {run.step}{how}"):
      self.ckpt.save({"params": run.state.params, "opt_state": run.state.opt_state}, host,
                     branch_names(self.stage))


class Preemption:
  """On a stop request (SIGTERM), after the step's checkpoint: waits for the save and
  raises Preempted."""

  def __init__(self, ctx, stage: stages_lib.Stage, ckpt):
    self.ctx, self.stage, self.ckpt = ctx, stage, ckpt

  def start(self, run: StageRun) -> None:
    pass

  def after_step(self, run: StageRun, result) -> None:
    if _stop_requested(self.ctx):
      self.ckpt.wait()
      raise train_checkpoint.Preempted(self.stage.name, run.step, self.ckpt.directory,
                                       self.ctx.stop.signal_name)


def _stop_requested(ctx) -> bool:
  return ctx.stop is not None and ctx.stop.requested
