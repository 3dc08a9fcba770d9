"""Runs a stage top to bottom: steps, evaluation, diagnostics, logs and checkpoints."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint import utils as ocp_utils

from copd_jax import (
  kernels,
  run_log,
  sampling,
  sharding as sharding_lib,
  train_checkpoint,
)
from copd_jax.data import streams as data_lib
from copd_jax.data.examples import decode_responses
from copd_jax.models import stacked as stacked_lib
from copd_jax.policy_setup import RunSetup
from copd_jax.rl import (
  diagnostics,
  evaluation,
  rollout as rollout_lib,
  rows as rows_lib,
  schedules,
  stages as stages_lib,
  step as step_lib,
  update as update_lib,
)
from copd_jax.run_log import MetricsWriter, Phase, ProgressLine, branch_line
from copd_jax.run_spec import RunSpec


@dataclasses.dataclass
class RunContext:
  cfg: RunSpec  # the run's settings (config_lib.build), never the ConfigDict
  setup: RunSetup
  base_params: Any
  eval_sets: dict            # capability -> held-out examples (during training: a prefix)
  writer: MetricsWriter
  # The device mesh and shardings (methods.run_sharding; one device: a mesh of size 1).
  sharding: sharding_lib.RunSharding
  global_step: int = 0       # optimizer steps over all stages (x-axis of every log)
  # Training-state checkpoints (None: no checkpoints, e.g. a unit test of one stage).
  checkpoints: train_checkpoint.RunCheckpoints | None = None
  stop: train_checkpoint.StopRequest | None = None  # set by SIGTERM
  # metrics.jsonl size to rewind to before the next write (set when resuming), and the
  # first step TensorBoard and completions.jsonl drop (tensorboardX purge_step).
  log_rewind_offset: int | None = None
  log_rewind_step: int | None = None
  # stage -> (branch names, UpdateCounts) of the stages run or restored (for the summary).
  update_counts: dict = dataclasses.field(default_factory=dict)
  # (domains, n) -> the fixed diagnostic prompts [S][n] (loop.diagnostic_prompts).
  diagnostic_examples: dict = dataclasses.field(default_factory=dict)

  def rewind_log(self) -> None:
    """Drops log lines a killed run wrote after the state this run resumed from."""
    if self.log_rewind_offset is not None:
      if not self.writer.rewind_jsonl(self.log_rewind_offset, self.log_rewind_step):
        print(f"warning: metrics.jsonl is shorter than the checkpoint's offset "
              f"{self.log_rewind_offset}; not rewinding it", flush=True)
      self.log_rewind_offset = self.log_rewind_step = None


def data_context(cfg, setup: RunSetup, seed_offset: int) -> rollout_lib.DataContext:
  return data_context_at(cfg, setup, cfg.tasks.seed + cfg.seed * 1000 + seed_offset)


def data_context_at(cfg, setup: RunSetup, seed: int) -> rollout_lib.DataContext:
  """Train streams of task seed `seed` (data_context: the run's own)."""
  # grain iterators (get_state / set_state), so a resumed run continues them. Every
  # process draws the same global prompts (cheap, deterministic in seed and step) and
  # moves only its own shards to its devices (sharding_lib.put_global).
  streams = data_lib.make_streams(cfg, setup.example_kwargs, seed)
  return rollout_lib.DataContext(setup.tokenizer, setup.encode_prompts, streams,
                                 sampling_config(cfg, setup), setup.rewards)


def sampling_config(cfg, setup: RunSetup) -> sampling.SamplingConfig:
  """The run's rollout sampling (config.sampling, the tokenizer's stop token)."""
  return sampling.SamplingConfig(
      max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
      top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p,
      stop_token_ids=(setup.tokenizer.eos_id,),
      banned_token_ids=setup.banned_token_ids)


def branch_names(stage: stages_lib.Stage) -> list[str]:
  return ["+".join(caps) if caps else "student" for caps in stage.student_data]


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


def diagnostic_prompts(ctx: RunContext, stage: stages_lib.Stage) -> list[list]:
  """The stage's fixed diagnostic prompts, [S][rl.diagnostic_prompts] examples: the same
  at every step and in every run (diagnostics.fixed_prompts); drawn once per stage."""
  cfg, setup = ctx.cfg, ctx.setup
  domains = tuple(caps or tuple(cfg.rl.capabilities) for caps in stage.student_data)
  cache_key = (domains, int(cfg.rl.diagnostic_prompts))
  if cache_key not in ctx.diagnostic_examples:
    def draw(seed, caps, n, rng):
      return rollout_lib.draw_examples(data_context_at(cfg, setup, seed), caps, n, rng)
    ctx.diagnostic_examples[cache_key] = diagnostics.fixed_prompts(
        cfg.tasks.seed, domains, cfg.rl.diagnostic_prompts, draw)
  return ctx.diagnostic_examples[cache_key]


def branch_diagnostics(ctx: RunContext, stage: stages_lib.Stage, params) -> dict:
  """Top-10 overlap and symmetric KL of each branch with every other branch and the base,
  on the branch's own rollouts of its fixed diagnostic prompts (the paper's definition),
  and on the toy suite each branch's rate of flawed-procedure and of right answers there.

  Fixed prompts and sampling keys (diagnostics.fixed_prompts / fixed_sampling_keys), apart
  from training's, so how often it runs never changes the training data and every step's
  measurement pairs with every other's."""
  cfg, setup = ctx.cfg, ctx.setup
  n = cfg.rl.diagnostic_prompts
  examples = diagnostic_prompts(ctx, stage)
  batches = [setup.encode_prompts(exs) for exs in examples]
  prompt_tokens, prompt_mask, frames = rollout_lib.stack_prompt_batches(batches)
  domains = [caps or tuple(cfg.rl.capabilities) for caps in stage.student_data]
  keys = diagnostics.fixed_sampling_keys(cfg.tasks.seed, domains)
  # The training sampler; the rest traced on the run's mesh: the Pallas kernels (loss,
  # splash) then run inside shard_map (kernels/sharded.py), as XLA cannot partition them.
  rollout = sampling.stacked_generate(ctx.sharding, params, setup.model_cfg, prompt_tokens,
                                      prompt_mask, frames, keys, sampling_config(cfg, setup), 1)
  with jax.set_mesh(ctx.sharding.mesh):
    rows = rollout_lib.build_rows(prompt_tokens, prompt_mask, frames, rollout,
                                  np.zeros((stage.num_students, n)),
                                  np.zeros((stage.num_students, n)), 1)
    models = stacked_lib.append_model(params, ctx.base_params)
    diag = diagnostics.pairwise_diagnostics(
        models, setup.model_cfg, rows.tokens, rows.positions, rows.token_mask,
        rows.response_mask, rows.frames, kernel=cfg.rl.kernel,
        prompt_len=prompt_tokens.shape[-1] if setup.policy.needs_prompt_len else 0)
  diag = sharding_lib.to_host(diag)  # global arrays in a multi-process run
  out = _answer_rate_scalars(branch_names(stage), examples, ctx.sharding.to_host(rollout),
                             setup.tokenizer)
  overlap, sym_kl = np.asarray(diag["overlap"]), np.asarray(diag["sym_kl"])
  names = branch_names(stage) + ["base"]
  for s, student in enumerate(names[:-1]):
    for m, other in enumerate(names):
      if m != s:
        out[f"overlap/{student}|{other}"] = float(overlap[s, m])
        out[f"sym_kl/{student}|{other}"] = float(sym_kl[s, m])
  pairs = [(s, m) for s in range(stage.num_students) for m in range(stage.num_students) if s != m]
  if pairs:
    out["overlap/branches_mean"] = float(np.mean([overlap[s, m] for s, m in pairs]))
    out["sym_kl/branches_mean"] = float(np.mean([sym_kl[s, m] for s, m in pairs]))
  if stage.live_teachers and stage.topology.any():  # the pairs that actually distil
    linked = np.argwhere(stage.topology > 0)
    out["overlap/linked_mean"] = float(np.mean([overlap[s, m] for s, m in linked]))
    out["sym_kl/linked_mean"] = float(np.mean([sym_kl[s, m] for s, m in linked]))
  out["overlap/with_base_mean"] = float(overlap[:, -1].mean())
  out["sym_kl/with_base_mean"] = float(sym_kl[:, -1].mean())
  return out


def _answer_rate_scalars(names, examples, rollout, tokenizer) -> dict:
  """{'flawed_rate/<branch>', 'correct_rate/<branch>', ..._mean}: each branch's answers to
  its fixed prompts judged (diagnostics.answer_rates); {} off the toy suite, and no
  flawed_rate of a branch none of whose prompts tells the procedures apart.
  rollout: host arrays, tokens / mask [S, n, 1, R]."""
  out, flawed, correct = {}, [], []
  for s, (name, exs) in enumerate(zip(names, examples)):
    responses = decode_responses(np.asarray(rollout.tokens[s, :, 0]),
                                 np.asarray(rollout.mask[s, :, 0]), tokenizer)
    rates = diagnostics.answer_rates(exs, responses)
    if rates is None:
      return {}
    if rates["flaw_judged"] > 0:
      out[f"flawed_rate/{name}"] = rates["flawed_rate"]
      flawed.append(rates["flawed_rate"])
    out[f"correct_rate/{name}"] = rates["correct_rate"]
    correct.append(rates["correct_rate"])
  if flawed:
    out["flawed_rate/branches_mean"] = float(np.mean(flawed))
  out["correct_rate/branches_mean"] = float(np.mean(correct))
  return out


def completions_to_log(cfg) -> int:
  """config.log.completions: prompts per capability / branch in the completion log."""
  return int(cfg.log.completions)


def eval_completion_records(names, eval_sets, responses: dict, count: int,
                            rewards) -> list[dict]:
  """The first `count` held-out examples of every capability with each branch's greedy
  response and its reward (rewards: the run's reward_fns.Rewards).
  responses: {cap: responses[branch][example]}."""
  records = []
  for cap, examples in eval_sets.items():
    for i, ex in enumerate(examples[:count]):
      for branch, answers in zip(names, responses[cap]):
        records.append({"branch": branch, "capability": cap, "prompt": ex.question,
                        "answer": str(ex.answer), "response": answers[i],
                        "reward": float(rewards.rewards_for([answers[i]], [ex])[0])})
  return records


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


def evaluate_branches(ctx: RunContext, stage: stages_lib.Stage, params, eval_sets, merge=False) -> dict:
  """Held-out accuracy of every branch (and of the merged model when `merge`); logs the
  first config.log.completions responses of every capability as completions. The
  terminal shows the evaluation's progress and then each branch's accuracy."""
  merging = merge and stage.num_students > 1
  phase = Phase(f"eval at step {ctx.global_step}", total=len(eval_sets) * (1 + merging))
  kwargs = dict(run=ctx.sharding, max_new_tokens=ctx.cfg.sampling.max_new_tokens,
                batch_size=ctx.cfg.eval.batch_size, progress=phase.advance)
  responses = {}
  with phase:
    out = _evaluate_branches(ctx, stage, params, eval_sets, merging, kwargs, responses)
  overall = {k.split("/")[0]: v for k, v in out.items() if k.endswith("/accuracy/overall")}
  print(branch_line(f"held-out accuracy at step {ctx.global_step}", overall), flush=True)
  return out


def merged_progress(kwargs: dict) -> dict:
  """evaluate_stacked kwargs whose progress callback labels the merged model's parts."""
  progress = kwargs.get("progress")
  if progress is None:
    return kwargs
  return dict(kwargs, progress=lambda cap: progress(f"merged {cap}"))


def _evaluate_branches(ctx, stage, params, eval_sets, merge, kwargs, responses) -> dict:
  acc = evaluation.evaluate_stacked(params, ctx.setup, eval_sets, responses_out=responses, **kwargs)
  count = completions_to_log(ctx.cfg)
  if count:
    ctx.writer.write_completions(ctx.global_step, "eval", eval_completion_records(
        branch_names(stage), eval_sets, responses, count, ctx.setup.rewards))
  out = _log_branch_arrays(branch_names(stage), acc)
  if merge:
    merged = merged_params(ctx.cfg, stage, params)
    merged_acc = evaluation.evaluate_stacked(jax.tree.map(lambda x: x[None], merged), ctx.setup,
                                             eval_sets, **merged_progress(kwargs))
    out.update({f"merged/{k}": float(v[0]) for k, v in merged_acc.items()})
  return out


def merged_params(cfg, stage: stages_lib.Stage, params):
  weights = None
  if cfg.rl.merge_weights:
    weights = [cfg.rl.merge_weights.get(c[0], 0.0) for c in stage.student_data]
  return stacked_lib.merge(params, weights)


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


def run_stage(ctx: RunContext, stage: stages_lib.Stage, params, frozen_teachers=None, *,
              seed_offset: int = 0, merge_at_eval: bool = False):
  """Trains `params` (stacked [S]) through `stage`; logs every step, evaluates every
  rl.eval_every steps (accuracy per branch, merged accuracy, overlap, symmetric KL).

  With ctx.checkpoints: resumes from the stage's latest checkpoint (a finished stage is
  restored, not re-run), saves every checkpoint.every_steps steps and at the end, and on
  a stop request (SIGTERM) saves at the step boundary and raises Preempted.
  A step whose loss or gradient norm is not finite is not applied (counted; too many in
  a row raise NonFiniteTrainingError)."""
  cfg, rl = ctx.cfg, ctx.cfg.rl
  ucfg = rows_lib.update_config(cfg, ctx.setup.model_cfg)
  optimizer = update_lib.optimizer_for_stage(rl, stage.steps)
  opt_state = update_lib.init_optimizer_state(optimizer, params)
  # On the mesh before the restore target is taken.
  params = ctx.sharding.shard_params(params)
  opt_state = sharding_lib.place(opt_state, ctx.sharding.opt_state(opt_state))
  if frozen_teachers is not None:
    frozen_teachers = ctx.sharding.shard_params(frozen_teachers)
  data = data_context(cfg, ctx.setup, seed_offset)
  rng = np.random.default_rng([cfg.seed, seed_offset])
  # Derived, not stored: a pure function of the seed; steps fold in their index.
  key = jax.random.key(cfg.seed * 7919 + seed_offset)
  assignment = stages_lib.cross_teacher_assignment(stage)
  routing = stages_lib.teacher_routing(
      assignment, len(stage.teacher_data), stage.samples_per_prompt,
      native_rows=stage.native_prompts * stage.samples_per_prompt).as_arrays()
  sched_state = schedules.ScheduleState()
  names = branch_names(stage)
  short_eval = {c: ex[: rl.eval_examples] for c, ex in ctx.eval_sets.items()}
  last_overlap = None
  start_step = 0
  counts = UpdateCounts.zeros(len(names))

  ckpt = None
  if ctx.checkpoints is not None:
    train_checkpoint.check_streams_checkpointable(data.streams)
    ckpt = ctx.checkpoints.for_stage(stage.name, names)
    abstract = jax.tree.map(ocp_utils.to_shape_dtype_struct,
                            {"params": params, "opt_state": opt_state})
    try:
      restored = ckpt.restore_latest(abstract, ctx.checkpoints.fallback_on_corrupt)
    except Exception:
      # Close the manager before the error leaves: its background threads would otherwise
      # print a traceback each at interpreter exit and bury this error.
      ckpt.close()
      raise
    if restored is not None:
      state, host = restored
      params, opt_state = state["params"], state["opt_state"]
      rng.bit_generator.state = host.numpy_rng
      sched_state = schedules.ScheduleState(**host.schedule)
      last_overlap = host.last_overlap
      train_checkpoint.restore_streams(data.streams, host.streams)
      start_step, ctx.global_step = host.stage_step, host.global_step
      if host.applied_per_branch is not None:
        counts = UpdateCounts(list(host.applied_per_branch), list(host.skipped_per_branch),
                              list(host.in_row_per_branch), host.steps_with_skips)
      else:  # a checkpoint from before per-branch counts
        counts = UpdateCounts([start_step] * len(names), [0] * len(names), [0] * len(names))
      ctx.update_counts[stage.name] = (names, counts)
      ctx.log_rewind_offset = host.metrics_offset
      ctx.log_rewind_step = host.global_step + 1  # lines at the saved step are kept
      print(f"resumed stage {stage.name} at step {start_step}/{stage.steps}"
            + (" (finished)" if host.finished else "") + f" from {ckpt.directory}", flush=True)
      if host.finished:
        ckpt.close()
        return params

  def save(step: int, finished: bool):
    host = train_checkpoint.HostState(
        stage_step=step, global_step=ctx.global_step, finished=finished,
        numpy_rng=rng.bit_generator.state, schedule=dataclasses.asdict(sched_state),
        last_overlap=last_overlap, streams=train_checkpoint.streams_state(data.streams),
        nonfinite_total=sum(counts.skipped), nonfinite_in_row=max(counts.in_row),
        metrics_offset=ctx.writer.jsonl_size(), applied_per_branch=counts.applied,
        skipped_per_branch=counts.skipped, in_row_per_branch=counts.in_row,
        steps_with_skips=counts.steps_with_skips)
    how = " (asynchronous: continues in the background)" if ctx.checkpoints.async_save else ""
    with Phase(f"checkpoint {stage.name} step {step}{how}"):
      ckpt.save({"params": params, "opt_state": opt_state}, host, names)

  def measure_overlap():
    nonlocal last_overlap
    with Phase(f"diagnostics (overlap, symmetric KL) at step {ctx.global_step}"):
      scalars = branch_diagnostics(ctx, stage, params)
    # The adaptive schedule watches the pairs that exchange (hub <-> spokes).
    last_overlap = scalars.get("overlap/linked_mean", scalars.get(
        "overlap/branches_mean", scalars["overlap/with_base_mean"]))
    ctx.writer.write(ctx.global_step, {f"eval/{k}": v for k, v in scalars.items()})

  def evaluate_accuracy():
    scalars = evaluate_branches(ctx, stage, params, short_eval, merge=merge_at_eval)
    ctx.writer.write(ctx.global_step, {f"eval/{k}": v for k, v in scalars.items()})

  ctx.rewind_log()
  progress = ProgressLine(stage.name, stage.steps, rl.log_every, start_step=start_step)
  try:
    if start_step == 0:
      evaluate_accuracy()
      measure_overlap()
    completions_every = int(cfg.log.completions_every)
    teacher_names = ["+".join(caps) for caps in stage.teacher_data]
    plan = step_lib.StepPlan(stage=stage, data=data, ucfg=ucfg, optimizer=optimizer, key=key,
                             assignment=assignment, routing=routing, sharding=ctx.sharding,
                             frozen_teachers=frozen_teachers, ref_params=ctx.base_params)
    for step in range(start_step, stage.steps):
      weight = schedules.opd_weight(stage.schedule, step, sched_state, last_overlap)
      log_samples = completions_to_log(cfg) if (
          completions_every and (step + 1) % completions_every == 0) else 0
      # The first step of a stage compiles the sampler and the update for its shapes.
      compiling = Phase(f"{stage.name} step {step + 1}: compiling and running") \
          if step == start_step else contextlib.nullcontext()
      with compiling:
        result = step_lib.train_step(plan, step_lib.TrainState(params, opt_state), step, weight,
                                     rng, log_samples)
      # update_lib.update applied each branch's update only where it was finite (a skipped
      # branch keeps its previous params and optimizer state; the others moved on).
      params, opt_state = result.state.params, result.state.opt_state
      bad = counts.record(np.asarray(result.metrics["update_applied"]) > 0.5)
      ctx.update_counts[stage.name] = (names, counts)
      ctx.global_step += 1
      scalars = _log_branch_arrays(names, result.metrics)
      step_time = sum(v for k, v in result.metrics.items() if k.startswith("time/"))
      scalars["throughput/rollout_tokens_per_s"] = result.rollout_tokens / max(step_time, 1e-9)
      scalars["nonfinite_skipped"] = float(len(bad))
      scalars["nonfinite_skipped_total"] = float(sum(counts.skipped))
      ctx.writer.write(ctx.global_step, {f"train/{k}": v for k, v in scalars.items()})
      if result.samples:
        ctx.writer.write_completions(ctx.global_step, "train", train_completion_records(
            names, teacher_names, result.samples, result.metrics))
      _check_nonfinite_budget(rl, stage, step, counts, bad, names, result.metrics)
      if bad:
        print(f"warning: stage {stage.name} step {step + 1}: non-finite update of "
              f"branch(es) {[names[k] for k in bad]} not applied (the other branches' were; "
              f"{sum(counts.skipped)} skipped in this stage)", flush=True)
      loss = float(np.mean(result.metrics["loss"]))
      reward = float(np.mean(result.metrics["reward/native" if stage.native_prompts
                                            else "reward/cross"]))
      per_branch = {}
      if len(names) > 1:  # each branch's native (or cross) reward as it is measured
        rewards = np.atleast_1d(result.metrics["reward/native" if stage.native_prompts
                                               else "reward/cross"])
        per_branch = {f"reward/{n}": float(r) for n, r in zip(names, rewards)}
      progress.update(step + 1, result.rollout_tokens, loss=loss, reward=reward, **per_branch,
                      opd=weight)
      last = step + 1 == stage.steps
      if (step + 1) % rl.diagnostics_every == 0 or last:
        measure_overlap()
      if (step + 1) % rl.eval_every == 0 or last:
        evaluate_accuracy()
      if ckpt is None:
        continue
      stopping = ctx.stop is not None and ctx.stop.requested
      every = ctx.checkpoints.every_steps
      if last or stopping or (every and (step + 1) % every == 0):
        save(step + 1, finished=last)
      if stopping:
        ckpt.wait()
        raise train_checkpoint.Preempted(stage.name, step + 1, ckpt.directory,
                                         ctx.stop.signal_name)
  except (run_log.LogWriteError, train_checkpoint.CheckpointWriteError) as e:
    raise _storage_failure(e, ckpt) from e
  finally:
    failing = sys.exc_info()[0] is not None  # an error is already on its way out
    if ckpt is not None:
      try:
        ckpt.close()  # waits for an asynchronous save in flight
      except train_checkpoint.CheckpointWriteError:
        if not failing:  # else the error already propagating is the one to report
          raise
  return params


def _storage_failure(err: OSError, ckpt) -> train_checkpoint.StorageError:
  """The error that stops a run whose log or checkpoint could not be written: it names
  the file and the newest complete checkpoint (after letting a save in flight finish,
  if it can), from which the same command resumes once there is space."""
  newest = "none"
  if ckpt is not None:
    try:
      ckpt.wait()
    except train_checkpoint.CheckpointWriteError:
      pass  # that save failed too; orbax kept the previous complete step
    step = ckpt.latest_step()
    newest = "none" if step is None else os.path.join(ckpt.directory, str(step))
  return train_checkpoint.StorageError(
      err.errno, f"{err.strerror}; stopping the run. Newest complete checkpoint: {newest} "
      "(free space and run the same command to resume from it)", err.filename)
