"""Non-finite updates are skipped per branch, counted and bounded (issue 13.10).

Each case reproduces a failure found by trying the project with bad input and injected faults,
and checks the behaviour that replaced it. Expected values are written out by hand."""
import numpy as np
import pytest

import micro_runs
from copd_jax.config_lib import spec_of
from copd_jax import default_config
from copd_jax.data import toy_tasks as tasks


@pytest.fixture(scope="module")
def micro_base():
  return micro_runs.micro_base()


# ------------------------------------------- 13.10 non-finite updates, per branch

def _poison_optimizer():
  """SGD whose update is multiplied by a scale held in the optimizer state (one per
  branch once stacked): an inf scale makes that branch's new parameters non-finite while
  its loss and gradient norm stay finite."""
  import jax
  import jax.numpy as jnp
  import optax

  def init(params):
    return {"scale": jnp.ones(())}

  def update(updates, state, params=None):
    return jax.tree.map(lambda u: u * state["scale"], updates), state

  return optax.chain(optax.sgd(0.1), optax.GradientTransformation(init, update))


def test_update_with_non_finite_new_params_is_not_applied_to_that_branch_only():
  import jax
  import jax.numpy as jnp

  from copd_jax import kernels, policy_setup, sampling
  from copd_jax.models import stacked as experts
  from copd_jax import losses
  import dataclasses

  from copd_jax.rl import rollout as trainer, rows as rows_lib, update as update_lib
  cfg = default_config.get("copd", "micro")
  s = policy_setup.build_setup(spec_of(cfg))
  params = experts.init_stacked(s.model_cfg, jax.random.split(jax.random.key(4), 2))
  caps = ("text", "image")
  batches = [s.encode_prompts([tasks.make_example(c, i, seed=0, difficulty=1, **s.example_kwargs)
                               for i in range(2)]) for c in caps]
  prompts = trainer.stack_prompt_batches(batches)
  from tiny_model import one_device_run
  sampler = sampling.Sampler(s.model_cfg,
                             sampling.SamplingConfig(max_new_tokens=6, stop_token_ids=(2,)), 2)
  rollout = sampling.stacked_generate(one_device_run(s.model_cfg), params, sampler, prompts,
                                      jax.random.split(jax.random.key(0), 2))
  advantages = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
  rows = trainer.build_rows(prompts, rollout, advantages, np.zeros((2, 4)))
  rows = dataclasses.replace(rows, prompt_len=0)  # every column scored
  ucfg = rows_lib.UpdateConfig(model=s.model_cfg, loss=losses.PolicyLossConfig(),
                              kernel=kernels.KernelConfig(backend="chunked", vocab_tile=32,
                                                          token_tile=64))
  optimizer = _poison_optimizer()
  opt_state = update_lib.init_optimizer_state(optimizer, params)
  opt_state = (opt_state[0], {"scale": jnp.array([1.0, jnp.inf])})  # branch 1 blows up
  new_state, metrics = update_lib.update(
      update_lib.UpdateFn(one_device_run(ucfg.model), ucfg, optimizer),
      update_lib.TrainState(params, opt_state), rows)
  new_params = new_state.params
  assert np.isfinite(np.asarray(metrics["loss"])).all()
  assert np.isfinite(np.asarray(metrics["grad_norm"])).all()
  np.testing.assert_array_equal(np.asarray(metrics["update_applied"]), [1.0, 0.0])
  for old, new in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
    np.testing.assert_array_equal(np.asarray(new[1]), np.asarray(old[1]))  # kept
    assert np.isfinite(np.asarray(new)).all()
  assert any(not np.array_equal(np.asarray(n[0]), np.asarray(o[0]))  # branch 0 updated
             for o, n in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)))


def _poison_advantages(monkeypatch, bad):
  """bad: {step: [branch, ...]}: those branches' GRPO advantages are NaN on that step."""
  from copd_jax.rl import rollout as trainer
  real, calls = trainer.group_advantages, []

  def poisoned(rewards, samples, scale_by_std):
    advantages, zero = real(rewards, samples, scale_by_std)
    advantages = np.array(advantages)
    for branch in bad.get(len(calls), ()):
      advantages[branch] = np.nan
    calls.append(1)
    return advantages, zero
  monkeypatch.setattr(trainer, "group_advantages", poisoned)


def test_summary_reports_applied_and_skipped_updates(tmp_path, micro_base, monkeypatch):
  _poison_advantages(monkeypatch, {0: [1]})  # step 1 of 2: branch 'image' only
  summary = micro_runs.run_method(micro_runs.experts_config(tmp_path), micro_base)
  assert summary["steps"] == 2
  assert summary["optimizer_steps"] == 1  # step 1 skipped a branch's update
  assert summary["updates"] == {"experts": {
      "text": {"applied": 2, "skipped": 0}, "image": {"applied": 1, "skipped": 1},
      "video": {"applied": 2, "skipped": 0}}}


def test_total_non_finite_budget_stops_a_run_that_never_fails_in_a_row(tmp_path, micro_base,
                                                                      monkeypatch):
  from copd_jax import train_checkpoint
  _poison_advantages(monkeypatch, {0: [1], 2: [1], 4: [2]})  # never twice in a row
  cfg = micro_runs.experts_config(tmp_path, steps=6, max_nonfinite_steps_in_row=2,
                     max_nonfinite_steps_total=3)
  with pytest.raises(train_checkpoint.NonFiniteTrainingError,
                     match=r"3 non-finite updates in total.*last: step 5, branch\(es\) \['video'\]"):
    micro_runs.run_method(cfg, micro_base)
