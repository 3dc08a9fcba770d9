"""Runs a stage top to bottom: steps, evaluation, diagnostics, logs and checkpoints."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Any

import jax
import numpy as np
from orbax.checkpoint import utils as ocp_utils

from copd_jax import (
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
  hooks as hooks_lib,
  rollout as rollout_lib,
  rows as rows_lib,
  schedules,
  stages as stages_lib,
  step as step_lib,
  update as update_lib,
)
from copd_jax.rl.hooks import StageRun, UpdateCounts, _log_branch_arrays, completions_to_log
from copd_jax.rl.stages import branch_names
from copd_jax.run_log import MetricsWriter, Phase, branch_line
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
  prompts = rollout_lib.stack_prompt_batches(batches)
  domains = [caps or tuple(cfg.rl.capabilities) for caps in stage.student_data]
  keys = diagnostics.fixed_sampling_keys(cfg.tasks.seed, domains)
  # The training sampler; the rest traced on the run's mesh: the Pallas kernels (loss,
  # splash) then run inside shard_map (kernels/sharded.py), as XLA cannot partition them.
  sampler = sampling.Sampler(setup.model_cfg, sampling_config(cfg, setup), 1)
  rollout = sampling.stacked_generate(ctx.sharding, params, sampler, prompts, keys)
  with jax.set_mesh(ctx.sharding.mesh):
    rows = rollout_lib.build_rows(prompts, rollout, np.zeros((stage.num_students, n)),
                                  np.zeros((stage.num_students, n)))
    models = stacked_lib.append_model(params, ctx.base_params)
    diag = diagnostics.pairwise_diagnostics(
        models, setup.model_cfg, rows.tokens, rows.positions, rows.token_mask,
        rows.response_mask, rows.frames, kernel=cfg.rl.kernel,
        prompt_len=rows.prompt_len if setup.policy.needs_prompt_len else 0)
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


def stage_trainer(ctx: RunContext, stage: stages_lib.Stage, frozen_teachers,
                  data: rollout_lib.DataContext, seed_offset: int) -> step_lib.StageTrainer:
  """The stage's StageTrainer: its statics (routing, update settings, optimizer, the
  stage's PRNG key, the mesh, the frozen teachers and the KL reference) fixed here."""
  cfg = ctx.cfg
  ucfg = rows_lib.update_config(cfg, ctx.setup.model_cfg)
  assignment = stages_lib.cross_teacher_assignment(stage)
  routing = stages_lib.teacher_routing(
      assignment, len(stage.teacher_data), stage.samples_per_prompt,
      native_rows=stage.native_prompts * stage.samples_per_prompt).as_arrays()
  # Derived, not stored: a pure function of the seed; steps fold in their index.
  key = jax.random.key(cfg.seed * 7919 + seed_offset)
  rollout = rollout_lib.StageRollout(stage, data, ctx.sharding, ucfg.model, key, assignment,
                                     ucfg.scale_by_std)
  update_fn = update_lib.UpdateFn(ctx.sharding, ucfg,
                                  update_lib.optimizer_for_stage(cfg.rl, stage.steps))
  update = update_lib.StageUpdate(
      update_fn, jax.device_get(routing), stage.native_prompts * stage.samples_per_prompt,
      ctx.base_params if ucfg.loss.kl_coef > 0 else None)
  if frozen_teachers is not None:
    frozen_teachers = ctx.sharding.shard_params(frozen_teachers)
  return step_lib.StageTrainer(stage, rollout, update, frozen_teachers)


def initial_run(ctx: RunContext, trainer: step_lib.StageTrainer, params,
                seed_offset: int) -> StageRun:
  """The stage's first StageRun: the trainer's first state of params (stacked [S]) and
  the prompt RNG of (seed, seed_offset)."""
  return StageRun(trainer.init_state(params), 0,
                  np.random.default_rng([ctx.cfg.seed, seed_offset]),
                  schedules.ScheduleState(), UpdateCounts.zeros(trainer.stage.num_students))


def restore(ctx: RunContext, ckpt, run: StageRun, data: rollout_lib.DataContext):
  """Restores `run` (and the data streams) from the stage's latest checkpoint, if any.
  Returns its train_checkpoint.HostState, or None without a checkpoint."""
  abstract = jax.tree.map(ocp_utils.to_shape_dtype_struct,
                          {"params": run.state.params, "opt_state": run.state.opt_state})
  try:
    restored = ckpt.restore_latest(abstract, ctx.checkpoints.fallback_on_corrupt)
  except Exception:
    # Close the manager before the error leaves: its background threads would otherwise
    # print a traceback each at interpreter exit and bury this error.
    ckpt.close()
    raise
  if restored is None:
    return None
  state, host = restored
  n = len(run.counts.applied)
  run.state = step_lib.TrainState(state["params"], state["opt_state"])
  run.rng.bit_generator.state = host.numpy_rng
  run.schedule = schedules.ScheduleState(**host.schedule)
  run.last_overlap = host.last_overlap
  train_checkpoint.restore_streams(data.streams, host.streams)
  run.step, ctx.global_step = host.stage_step, host.global_step
  if host.applied_per_branch is not None:
    run.counts = UpdateCounts(list(host.applied_per_branch), list(host.skipped_per_branch),
                              list(host.in_row_per_branch), host.steps_with_skips)
  else:  # a checkpoint from before per-branch counts
    run.counts = UpdateCounts([run.step] * n, [0] * n, [0] * n)
  ctx.log_rewind_offset = host.metrics_offset
  ctx.log_rewind_step = host.global_step + 1  # lines at the saved step are kept
  return host


def stage_hooks(ctx: RunContext, stage: stages_lib.Stage, start_step: int, checkpoints,
                merge_at_eval: bool) -> list:
  """The stage's hooks in the order they run after a step: the step's log first (it
  counts the update and stops a run past the non-finite budget), then diagnostics (the
  adaptive schedule reads them next step), evaluation, and, with checkpoints = (the
  stage's checkpoint manager, the data streams), the save before a preemption that
  waits for it."""
  short_eval = {c: ex[:ctx.cfg.rl.eval_examples] for c, ex in ctx.eval_sets.items()}
  hooks = [hooks_lib.StepLog(ctx, stage, start_step),
           hooks_lib.Diagnostics(ctx, stage, lambda p: branch_diagnostics(ctx, stage, p)),
           hooks_lib.Evaluation(ctx, stage, lambda p: evaluate_branches(
               ctx, stage, p, short_eval, merge=merge_at_eval))]
  if checkpoints is not None:
    ckpt, streams = checkpoints
    hooks += [hooks_lib.Checkpointing(ctx, stage, ckpt, streams),
              hooks_lib.Preemption(ctx, stage, ckpt)]
  return hooks


def train_loop(ctx: RunContext, trainer: step_lib.StageTrainer, run: StageRun,
               hooks: list) -> None:
  """Steps `run` to the end of its stage, calling the hooks before the first step and
  after every step."""
  stage = trainer.stage
  if run.step == 0:
    for hook in hooks:
      hook.start(run)
  first = run.step
  for step in range(first, stage.steps):
    weight = schedules.opd_weight(stage.schedule, step, run.schedule, run.last_overlap)
    # The first step of a stage compiles the sampler and the update for its shapes.
    compiling = Phase(f"{stage.name} step {step + 1}: compiling and running") \
        if step == first else contextlib.nullcontext()
    with compiling:
      result = trainer.step(run.state, step, weight, run.rng)
    run.state, run.step = result.state, step + 1
    ctx.global_step += 1
    for hook in hooks:
      hook.after_step(run, result)


def run_stage(ctx: RunContext, stage: stages_lib.Stage, params, frozen_teachers=None, *,
              seed_offset: int = 0, merge_at_eval: bool = False):
  """Trains `params` (stacked [S]) through `stage`; logs every step, evaluates every
  rl.eval_every steps (accuracy per branch, merged accuracy, overlap, symmetric KL).

  With ctx.checkpoints: resumes from the stage's latest checkpoint (a finished stage is
  restored, not re-run), saves every checkpoint.every_steps steps and at the end, and on
  a stop request (SIGTERM) saves at the step boundary and raises Preempted.
  A step whose loss or gradient norm is not finite is not applied (counted; too many in
  a row raise NonFiniteTrainingError)."""
  data = data_context(ctx.cfg, ctx.setup, seed_offset)
  trainer = stage_trainer(ctx, stage, frozen_teachers, data, seed_offset)
  run = initial_run(ctx, trainer, params, seed_offset)
  ckpt = None
  if ctx.checkpoints is not None:
    train_checkpoint.check_streams_checkpointable(data.streams)
    ckpt = ctx.checkpoints.for_stage(stage.name, branch_names(stage))
    host = restore(ctx, ckpt, run, data)
    if host is not None:
      ctx.update_counts[stage.name] = (branch_names(stage), run.counts)
      print(f"resumed stage {stage.name} at step {run.step}/{stage.steps}"
            + (" (finished)" if host.finished else "") + f" from {ckpt.directory}",
            flush=True)
      if host.finished:
        ckpt.close()
        return run.state.params
  hooks = stage_hooks(ctx, stage, run.step,
                      None if ckpt is None else (ckpt, data.streams), merge_at_eval)
  ctx.rewind_log()
  try:
    train_loop(ctx, trainer, run, hooks)
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
  return run.state.params


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
