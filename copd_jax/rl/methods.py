"""Every method as stages of the one trainer (copd_jax/rl/step.py), plus the run loop.

| method     | stages                                                                    |
|------------|---------------------------------------------------------------------------|
| experts    | E branches from the base, GRPO on their own capability, beta = 0           |
| mixed_rlvr | 1 branch, GRPO on all capabilities, E x steps                             |
| copd       | E branches, RL/OPD cycles, live hub-and-spoke teachers, merge at the end |
| static_opd | experts stage (2 branches); then the student expert keeps RL and distils  |
|            | from the frozen teacher expert, one way                                   |
| mopd       | experts stage; then a student from the base distils from all frozen       |
|            | experts, each prompt routed to its domain's teacher                       |
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax

from copd_jax import checkpoint, policy_setup, sharding as sharding_lib, train_checkpoint
from copd_jax.models import stacked as stacked_lib
from copd_jax.policy_setup import RunSetup
from copd_jax.rl import evaluation, stages as stages_lib
from copd_jax.rl.loop import (
  RunContext,
  branch_names,
  completions_to_log,
  eval_completion_records,
  merged_params,
  merged_progress,
  run_stage,
)
from copd_jax.rl.stages import copd_stage, experts_stage, mixed_stage, mopd_stage, static_opd_stage
from copd_jax.run_log import Phase, branch_line
from copd_jax.run_spec import RunSpec


def load_or_train_experts(ctx: RunContext, caps) -> Any:
  """Stage-1 experts for the two-stage baselines: reused from rl.experts_dir or trained."""
  rl = ctx.cfg.rl
  stage = experts_stage(rl, caps)
  if rl.experts_dir:
    directory = os.path.join(rl.experts_dir, "final_params")
    metadata = checkpoint.read_metadata(directory)
    if metadata.get("method") != "experts":
      raise checkpoint.CheckpointMismatchError(
          f"config.rl.experts_dir={rl.experts_dir} holds a {metadata.get('method')!r} run, "
          "not an 'experts' run")
    stored = tuple(metadata.get("branches", ()))
    missing = [c for c in caps if c not in stored]
    if missing:
      raise checkpoint.CheckpointMismatchError(
          f"config.rl.experts_dir={rl.experts_dir} holds experts for {stored}, not {missing}")
    abstract = jax.eval_shape(lambda p: initial_branches(ctx, len(stored), p), ctx.base_params)
    stacked = checkpoint.load_policy(
        directory, abstract, allow_unverified=bool(ctx.cfg.checkpoint.allow_unverified))
    index = [stored.index(c) for c in caps]
    return stacked_lib.select_experts(stacked, index)
  params = initial_branches(ctx, len(caps))
  return run_stage(ctx, stage, params, seed_offset=1)


def initial_branches(ctx: RunContext, num: int, base=None):
  """`num` branches that start at the base (ctx.base_params unless `base` is given): full
  copies, or with config.model.lora.rank > 0 LoRA adapters on the one shared base."""
  return stacked_lib.initial_branches(ctx.base_params if base is None else base, num,
                                      ctx.cfg.lora,
                                      jax.random.key(ctx.cfg.seed))


def run_sharding(cfg: RunSpec, model_cfg) -> sharding_lib.RunSharding:
  """The run's mesh from config.mesh, with the parameter axes model_cfg's layers declare.
  Mesh sizes that are all 1 give a mesh of one device (this process's first): the same
  programs as on a pod, on that device."""
  sizes = sharding_lib.check_mesh_config(cfg.mesh.sizes(), cfg.num_experts)
  axes = policy_setup.declared_param_axes(model_cfg)
  if all(v == 1 for v in sizes.values()):
    return sharding_lib.RunSharding.one_device(axes)
  return sharding_lib.RunSharding.from_config(cfg.mesh.sizes(), cfg.num_experts,
                                              param_axes=axes)


def run_rl_method(cfg: RunSpec, setup: RunSetup, base_params, writer) -> dict:
  """Runs cfg.method; returns {'final/...', 'branches': [...]} accuracies (full eval set).

  Methods are paired on data: the first stage of every method (experts, mixed RLVR, CoPD)
  draws from the same prompt streams and sampling keys (seed offset 1), and every
  distillation stage uses offset 2, so with beta = 0 CoPD *is* the experts run."""
  caps = list(cfg.rl.capabilities)
  eval_sets = {c: s for c, s in policy_setup.held_out_sets(cfg, setup).items() if c in caps}
  checkpoints = train_checkpoint.RunCheckpoints(
      cfg.workdir, cfg.checkpoint, method=cfg.method, num_experts=cfg.num_experts,
      seed=cfg.seed, config_json=cfg.config_json)
  sharding = run_sharding(cfg, setup.model_cfg)
  # The base (reference policy, merge partner) lives on the mesh too.
  base_params = sharding.shard_params(base_params, stacked=False)
  ctx = RunContext(cfg, setup, base_params, eval_sets, writer, sharding,
                   checkpoints=checkpoints)
  # A restart that finds no checkpoint drops what a killed run logged since RL began.
  ctx.log_rewind_offset = checkpoints.log_start_offset(writer.jsonl_size())
  ctx.log_rewind_step = 0
  start = time.perf_counter()
  with train_checkpoint.stop_on_signals(cfg.checkpoint.save_on_sigterm,
                                        grace_s=checkpoints.sigterm_grace_s) as stop:
    ctx.stop = stop
    final, stage = _train_method(ctx, caps)
  train_seconds = time.perf_counter() - start
  ctx.rewind_log()  # every stage was restored finished: rewrite the final lines
  return _final_report(ctx, stage, final, train_seconds)


def _train_experts(ctx: RunContext, caps):
  stage = experts_stage(ctx.cfg.rl, caps)
  params = initial_branches(ctx, len(caps))
  return run_stage(ctx, stage, params, seed_offset=1), stage


def _train_mixed_rlvr(ctx: RunContext, caps):
  stage = mixed_stage(ctx.cfg.rl, caps)
  params = initial_branches(ctx, 1)
  return run_stage(ctx, stage, params, seed_offset=1), stage


def _train_copd(ctx: RunContext, caps):
  stage = copd_stage(ctx.cfg.rl, caps)
  params = initial_branches(ctx, len(caps))
  return run_stage(ctx, stage, params, seed_offset=1, merge_at_eval=True), stage


def _train_static_opd(ctx: RunContext, caps):
  rl = ctx.cfg.rl
  teachers = load_or_train_experts(ctx, caps)
  stage = static_opd_stage(rl, caps)
  pick = lambda cap: stacked_lib.select_experts(teachers, [caps.index(cap)])  # noqa: E731
  final = run_stage(ctx, stage, pick(rl.static_opd.student), pick(rl.static_opd.teacher),
                    seed_offset=2)
  return final, stage


def _train_mopd(ctx: RunContext, caps):
  teachers = load_or_train_experts(ctx, caps)
  stage = mopd_stage(ctx.cfg.rl, caps)
  params = initial_branches(ctx, 1)
  return run_stage(ctx, stage, params, teachers, seed_offset=2), stage


# config.method -> train(ctx, capabilities) -> (final stacked params, last stage).
METHODS = {"experts": _train_experts, "mixed_rlvr": _train_mixed_rlvr, "copd": _train_copd,
           "static_opd": _train_static_opd, "mopd": _train_mopd}


def _train_method(ctx: RunContext, caps) -> tuple[Any, stages_lib.Stage]:
  """Runs the stages of ctx.cfg.method; returns (final stacked params, last stage)."""
  if ctx.cfg.method not in METHODS:
    raise ValueError(f"config.method {ctx.cfg.method!r} is not an RL method")
  return METHODS[ctx.cfg.method](ctx, caps)


def _final_report(ctx: RunContext, stage: stages_lib.Stage, final, train_seconds: float) -> dict:
  """Full-eval accuracies of the final branches (and merge); saves final_params."""
  cfg, setup, eval_sets, writer = ctx.cfg, ctx.setup, ctx.eval_sets, ctx.writer
  method = cfg.method
  # The final evaluation adds pass@k (config.eval.pass_samples > 0) next to greedy accuracy.
  merging = stage.num_students > 1
  phase = Phase("final evaluation", total=len(eval_sets) * (1 + merging))
  kwargs = dict(run=ctx.sharding, max_new_tokens=cfg.sampling.max_new_tokens,
                batch_size=cfg.eval.batch_size, progress=phase.advance,
                **evaluation.pass_at_k_kwargs(cfg))
  responses, branch_rewards = {}, {}
  with phase:
    branch_acc = evaluation.evaluate_stacked(final, setup, eval_sets, responses_out=responses,
                                             rewards_out=branch_rewards, **kwargs)
    names = branch_names(stage)
    # Per-item rewards of every final model, for paired comparisons between methods.
    per_example = {f"branch/{n}": {c: r[i] for c, r in branch_rewards.items()}
                   for i, n in enumerate(names)}
    if completions_to_log(cfg):
      writer.write_completions(ctx.global_step, "final", eval_completion_records(
          names, eval_sets, responses, completions_to_log(cfg), setup.rewards))
    # steps: every step run; optimizer_steps: those in which every branch's update was
    # applied; updates: per stage and branch, the updates applied and skipped (non-finite).
    skipped_steps = sum(c.steps_with_skips for _, c in ctx.update_counts.values())
    summary = {"train_seconds": round(train_seconds, 1), "steps": ctx.global_step,
               "optimizer_steps": ctx.global_step - skipped_steps,
               "updates": {stage_name: c.by_branch(branch_names_)
                           for stage_name, (branch_names_, c) in ctx.update_counts.items()},
               "branches": {n: {k: float(v[i]) for k, v in branch_acc.items()}
                            for i, n in enumerate(names)}}
    if stage.num_students > 1:
      merged = merged_params(cfg, stage, final)
      merged_rewards = {}
      merged_acc = evaluation.evaluate_stacked(jax.tree.map(lambda x: x[None], merged), setup,
                                               eval_sets, rewards_out=merged_rewards,
                                               **merged_progress(kwargs))
      summary["merged"] = {k: float(v[0]) for k, v in merged_acc.items()}
      per_example["merged"] = {c: r[0] for c, r in merged_rewards.items()}
  print(branch_line("final held-out accuracy", {
      **{n: d["accuracy/overall"] for n, d in summary["branches"].items()},
      **({"merged": summary["merged"]["accuracy/overall"]} if "merged" in summary else {})}),
      flush=True)
  # The method's deliverable: the merged model (CoPD), the single branch (mixed RLVR,
  # static OPD and MOPD students); experts deliver one model per capability.
  if method == "copd":
    summary["final"] = summary["merged"]
  elif stage.num_students == 1:
    summary["final"] = summary["branches"][names[0]]
  writer.write(ctx.global_step, {f"final/{n}/{k}": v for n, d in summary["branches"].items()
                                 for k, v in d.items()})
  if jax.process_index() == 0:
    evaluation.save_eval_rewards(os.path.join(cfg.workdir, "eval_rewards.npz"), per_example)
  meta = {"method": method, "branches": names}
  checkpoint.save_policy(os.path.join(cfg.workdir, "final_params"), final, meta)
  return summary
