"""Every method config runs a few steps on the micro config; CoPD with beta = 0 is
exactly the independent experts."""
import json

import jax
import numpy as np
import pytest

from copd_jax.config_lib import spec_of
from copd_jax import config_lib, default_config, policy_setup
from copd_jax.models import decoder as model_lib, stacked as experts
from copd_jax.rl import loop, methods, stages as stages_lib
from copd_jax.run_log import MetricsWriter


def micro(method, tmp_path, **rl):
  cfg = default_config.get(method, "micro")
  cfg.workdir = str(tmp_path / method)
  cfg.rl.update(rl)
  config_lib.validate_config(cfg)
  return cfg


@pytest.fixture(scope="module")
def base():
  cfg = default_config.get("experts", "micro")
  s = policy_setup.build_setup(spec_of(cfg))
  return s, model_lib.init_params(s.model_cfg, jax.random.key(0))


def run(cfg, base):
  s, params = base
  writer = MetricsWriter(cfg.workdir)
  try:
    return methods.run_rl_method(spec_of(cfg), s, params, writer)
  finally:
    writer.close()


def test_every_method_runs_and_reports(tmp_path, base):
  summaries = {}
  summaries["experts"] = run(micro("experts", tmp_path), base)
  experts_dir = str(tmp_path / "experts")
  for method in ("mixed_rlvr", "copd", "mopd", "static_opd"):
    summaries[method] = run(micro(method, tmp_path, experts_dir=experts_dir), base)
  assert set(summaries["experts"]["branches"]) == {"text", "image", "video"}
  assert summaries["mixed_rlvr"]["optimizer_steps"] == 3 * 2  # sum of the experts' steps
  assert set(summaries["copd"]) >= {"merged", "final"}
  assert summaries["mopd"]["optimizer_steps"] == 2  # experts reused, only distillation
  assert set(summaries["static_opd"]["branches"]) == {"image"}
  for summary in summaries.values():
    for acc in summary["branches"].values():
      assert 0.0 <= acc["accuracy/overall"] <= 1.0
  # CoPD logged OPD statistics on its distillation step and overlap at evaluation.
  records = [json.loads(l) for l in open(tmp_path / "copd" / "metrics.jsonl")]
  keys = set().union(*records)
  assert "train/text/opd/delta_mean" in keys
  assert "eval/overlap/text|image" in keys and "eval/sym_kl/image|text" in keys
  assert "eval/merged/accuracy/overall" in keys
  assert any(r.get("train/opd_weight") == 1.0 for r in records)


def test_copd_with_zero_beta_equals_independent_experts(tmp_path, base):
  s, base_params = base
  results = []
  for method, rl in (("experts", {}), ("copd", {"opd": {"beta": 0.0}})):
    cfg = micro(method, tmp_path)
    cfg.rl.opd.beta = 0.0 if method == "copd" else cfg.rl.opd.beta
    # Rewards of a random micro policy are all 0 (zero GRPO advantage); an entropy bonus
    # makes sure the parameters really move, so equality is not vacuous.
    cfg.rl.loss.entropy_coef = 0.01
    writer = MetricsWriter(cfg.workdir)
    ctx = loop.RunContext(spec_of(cfg), s, base_params, {"text": []}, writer,
                          methods.run_sharding(spec_of(cfg), s.model_cfg))
    ctx.eval_sets = {c: e[:2] for c, e in policy_setup.held_out_sets(spec_of(cfg), s).items()}
    stage = (stages_lib.experts_stage if method == "experts" else stages_lib.copd_stage)(
        cfg.rl, list(cfg.rl.capabilities))
    params = experts.broadcast_params(base_params, stage.num_students)
    results.append(loop.run_stage(ctx, stage, params, seed_offset=1))
    writer.close()
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  changed = any(not np.array_equal(np.asarray(a), np.asarray(b)[None].repeat(3, 0))
                for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(base_params)))
  assert changed


def test_reused_experts_must_cover_the_capabilities(tmp_path, base):
  cfg = micro("experts", tmp_path)
  cfg.rl.capabilities = ("text", "image")
  cfg.num_experts = 2
  run(cfg, base)
  bad = micro("mopd", tmp_path, experts_dir=str(tmp_path / "experts"))
  with pytest.raises(ValueError, match=r"experts_dir=.* holds experts for \('text', 'image'\), not \['video'\]"):
    run(bad, base)


@pytest.mark.parametrize("method, field, value, message", [
    ("copd", "num_experts", 2, r"config\.num_experts must equal the number of rl\.capabilities"),
    ("copd", "rl.opd.hub", "audio", r"config\.rl\.opd\.hub must be one of"),
    ("copd", "rl.opd.topology", "star", r"config\.rl\.opd\.topology must be one of"),
    ("copd", "rl.opd.schedule.kind", "often", r"config\.rl\.opd\.schedule: schedule\.kind"),
    ("copd", "rl.loss.eps_low", 1.5, r"config\.rl\.loss: PolicyLossConfig\.eps_low"),
    ("copd", "rl.kernel.backend", "cuda", r"config\.rl\.kernel: KernelConfig\.backend"),
    ("copd", "rl.samples_per_prompt", 0, r"config\.rl\.samples_per_prompt must be a positive"),
    ("mixed_rlvr", "num_experts", 3, r"config\.num_experts must be 1 for method 'mixed_rlvr'"),
    ("static_opd", "rl.static_opd.student", "text", r"config\.rl\.static_opd\.student must differ"),
    ("static_opd", "rl.static_opd.teacher", "video", r"config\.rl\.static_opd\.teacher must be one of"),
    ("copd", "checkpoint.every_steps", -1, r"config\.checkpoint\.every_steps must be a non-negative"),
    ("copd", "checkpoint.max_to_keep", 0, r"config\.checkpoint\.max_to_keep must be a positive"),
    ("copd", "rl.max_nonfinite_steps_in_row", 0,
     r"config\.rl\.max_nonfinite_steps_in_row must be a positive"),
])
def test_rl_config_errors_name_the_field(method, field, value, message):
  cfg = default_config.get(method, "micro")
  default_config.set_field(cfg, field, value)
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(cfg)


# ----------------------------------------------------- non-finite steps and resuming


def poison_steps(monkeypatch, bad_steps, branch=1):
  """Makes the GRPO advantages of `branch` NaN on `bad_steps`, so its loss (and update) is
  not finite there; update_lib.update must then keep that branch's params. Wraps
  StageTrainer.step to return the (params, opt_state) each call received."""
  from copd_jax.rl import rollout as trainer, step as step_lib
  real_step, real_advantages, seen = step_lib.StageTrainer.step, trainer.group_advantages, []

  def poisoned_advantages(rewards, samples, scale_by_std):
    advantages, zero = real_advantages(rewards, samples, scale_by_std)
    if len(seen) - 1 in bad_steps:
      advantages = np.array(advantages)
      advantages[branch] = np.nan
    return advantages, zero

  def recording(self, state, *args, **kwargs):
    seen.append((state.params, state.opt_state))
    return real_step(self, state, *args, **kwargs)
  monkeypatch.setattr(trainer, "group_advantages", poisoned_advantages)
  monkeypatch.setattr(step_lib.StageTrainer, "step", recording)
  return seen


def experts_ctx(tmp_path, base, **rl):
  s, base_params = base
  cfg = micro("experts", tmp_path, **rl)
  cfg.rl.loss.entropy_coef = 0.01  # rewards of a random policy are 0: make params move
  writer = MetricsWriter(cfg.workdir)
  eval_sets = {c: e[:2] for c, e in policy_setup.held_out_sets(spec_of(cfg), s).items()}
  ctx = loop.RunContext(spec_of(cfg), s, base_params, eval_sets, writer,
                        methods.run_sharding(spec_of(cfg), s.model_cfg))
  return ctx, stages_lib.experts_stage(spec_of(cfg).rl, list(cfg.rl.capabilities))


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nonfinite_step_is_skipped_counted_and_training_continues(tmp_path, base, monkeypatch):
  seen = poison_steps(monkeypatch, bad_steps={0})
  ctx, stage = experts_ctx(tmp_path, base)
  start = experts.broadcast_params(ctx.base_params, stage.num_students)
  final = loop.run_stage(ctx, stage, start, seed_offset=1)
  ctx.writer.close()
  assert len(seen) == 2
  branch = lambda tree, k: jax.tree.map(lambda x: x[k], tree)
  # step 0 not applied to branch 1: same params and optimizer state ...
  assert_trees_equal(branch(seen[1][0], 1), branch(seen[0][0], 1))
  assert_trees_equal(branch(seen[1][1], 1), branch(seen[0][1], 1))
  # ... but applied to the other branches
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(branch(seen[1][0], 0)), jax.tree.leaves(branch(seen[0][0], 0))))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(final))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))  # step 1 applied
             for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(seen[1][0])))
  train = [r for r in map(json.loads, open(tmp_path / "experts" / "metrics.jsonl"))
           if "train/nonfinite_skipped" in r]
  assert [r["train/nonfinite_skipped"] for r in train] == [1.0, 0.0]
  assert [r["train/nonfinite_skipped_total"] for r in train] == [1, 1]


def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path, base, monkeypatch):
  poison_steps(monkeypatch, bad_steps={0, 1, 2})
  ctx, stage = experts_ctx(tmp_path, base, steps=3, max_nonfinite_steps_in_row=2)
  start = experts.broadcast_params(ctx.base_params, stage.num_students)
  with pytest.raises(FloatingPointError,
                     match=r"2 non-finite updates in a row for branch 'image' \(last: step 2, "
                           r"branch\(es\) \['image'\]"):
    loop.run_stage(ctx, stage, start, seed_offset=1)
  ctx.writer.close()


def crash_at_call(monkeypatch, n):
  """Makes the n-th (1-based) StageTrainer.step call raise, like a crash mid-run."""
  from copd_jax.rl import step as step_lib
  real, calls = step_lib.StageTrainer.step, []

  def crashing(*args, **kwargs):
    calls.append(1)
    if len(calls) == n:
      raise RuntimeError("simulated crash")
    return real(*args, **kwargs)
  monkeypatch.setattr(step_lib.StageTrainer, "step", crashing)


def static_opd_cfg(tmp_path, name):
  cfg = micro("static_opd", tmp_path)
  cfg.workdir = str(tmp_path / name)
  cfg.checkpoint.every_steps = 1
  return cfg


def timing_free_log(workdir):
  return [{k: v for k, v in json.loads(line).items()
           if not k.startswith(("train/time/", "train/throughput/"))}
          for line in open(f"{workdir}/metrics.jsonl")]


@pytest.mark.parametrize("crash_call", [2, 4])  # stage 1 (experts) step 2 / stage 2 step 2
def test_two_stage_method_resumes_exactly_in_either_stage(tmp_path, base, monkeypatch,
                                                          crash_call):
  import orbax.checkpoint as ocp
  reference = static_opd_cfg(tmp_path, "reference")
  want = run(reference, base)
  cfg = static_opd_cfg(tmp_path, "crashed")
  with monkeypatch.context() as patch:
    crash_at_call(patch, crash_call)
    with pytest.raises(RuntimeError, match="simulated crash"):
      run(cfg, base)
  got = run(cfg, base)
  for key in ("branches", "final", "optimizer_steps"):
    assert got[key] == want[key]
  assert timing_free_log(cfg.workdir) == timing_free_log(reference.workdir)
  restore = lambda d: ocp.StandardCheckpointer().restore(f"{d}/final_params/params")
  assert_trees_equal(restore(cfg.workdir), restore(reference.workdir))
  # Finished stages are restored, not re-run: a third run trains nothing.
  with monkeypatch.context() as patch:
    crash_at_call(patch, 1)
    assert run(cfg, base)["branches"] == want["branches"]
  assert timing_free_log(cfg.workdir) == timing_free_log(reference.workdir)
