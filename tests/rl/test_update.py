"""The CoPD update: teacher routing, OPD learning signal, independence of branches,
merge, and the overlap diagnostic."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from copd_jax.config_lib import spec_of
from copd_jax import default_config, kernels, losses, policy_setup, sampling
from tiny_model import one_device_run
from copd_jax.data import toy_tasks as tasks
from copd_jax.models import decoder as model_lib, stacked as experts, stacked as stacked_lib
from copd_jax.rl import (
  diagnostics,
  rollout as trainer,
  rows as rows_lib,
  schedules,
  scoring as scoring_lib,
  stages,
  update as update_lib,
)


@pytest.fixture(scope="module")
def setup():
  cfg = default_config.get("copd", "micro")
  return cfg, policy_setup.build_setup(spec_of(cfg))


def ucfg_for(setup_obj, **loss):
  return rows_lib.UpdateConfig(model=setup_obj.model_cfg,
                              loss=losses.PolicyLossConfig(**loss),
                              kernel=kernels.KernelConfig(backend="chunked", vocab_tile=32,
                                                          token_tile=64))


def fixed_rows(setup_obj, params, caps, n_prompts=2, g=2, seed=0, opd_beta=0.0):
  """Rollouts of each stacked branch on its capability's prompts, as rows_lib.Rows whose
  prompt length is unknown (prompt_len 0: every column scored), as the tests below want
  unless they set it."""
  batches = [setup_obj.encode_prompts(
      [tasks.make_example(c, i, seed=seed, difficulty=1, **setup_obj.example_kwargs)
       for i in range(n_prompts)]) for c in caps]
  prompts = trainer.stack_prompt_batches(batches)
  s = len(caps)
  sampler = sampling.Sampler(
      setup_obj.model_cfg,
      sampling.SamplingConfig(max_new_tokens=6, stop_token_ids=(2,),
                              banned_token_ids=policy_setup.never_generated_ids(
                                  setup_obj.tokenizer)), g)
  rollout = sampling.stacked_generate(one_device_run(setup_obj.model_cfg), params, sampler,
                                      prompts, jax.random.split(jax.random.key(seed), s))
  rows = trainer.build_rows(prompts, rollout, np.zeros((s, n_prompts * g)),
                            np.full((s, n_prompts * g), opd_beta))
  return dataclasses.replace(rows, prompt_len=0)


def update_fn(ucfg, optimizer):
  """The update's statics on one device."""
  return update_lib.UpdateFn(one_device_run(ucfg.model), ucfg, optimizer)


def test_cross_assignment_and_routing_hub():
  stage = stages.Stage(
      name="t", steps=1, student_data=(("text",), ("image",), ("video",)),
      teacher_data=(("text",), ("image",), ("video",)), live_teachers=True,
      topology=schedules.topology_matrix(3, "hub", hub=0), branch_beta=np.ones(3),
      schedule=schedules.OPDSchedule(kind="cycle"), native_prompts=2, cross_prompts=4,
      samples_per_prompt=2)
  assignment = stages.cross_teacher_assignment(stage)
  np.testing.assert_array_equal(assignment, [[1, 2, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]])
  routing = stages.teacher_routing(assignment, 3, samples=2, native_rows=4)
  # Teacher 0 (the hub) scores both spokes' 8 rows; spokes score 4 hub rows each.
  assert routing.send_valid.sum(axis=(0, 2)).tolist() == [16, 4, 4]
  # Slots are as wide as the largest (student, teacher) pair: a spoke's 8 rows to the hub.
  assert routing.send_row.shape == (3, 3, 8) and routing.samples == 2
  # ... but only the exchange pads: each teacher scores its own rows (8 + 8, 4, 4), and on
  # an expert mesh (calls of one shape) the hub's 8 prompts are cut into chunks of 2 and
  # its overflow runs on the spokes' lanes: 3 lanes x 2 rounds x 2 prompts x G, no padding
  # (padding every teacher to the hub's load would compute 48).
  assert routing.teacher_loads() == [16, 4, 4]
  assert routing.teacher_forward_rows() == 24
  assert routing.teacher_forward_rows(equal_loads=True) == 24
  # The hub received [student 0's 4 prompt slots (padding) | student 1's 4 | student 2's 4]
  # and compacts them to the spokes' 8 real prompts; a spoke keeps the hub's first 2.
  np.testing.assert_array_equal(routing.teacher_prompts[0], np.arange(4, 12))
  np.testing.assert_array_equal(routing.teacher_prompts[1], [0, 1])
  np.testing.assert_array_equal(routing.teacher_row_back[0, 8:], np.arange(16))
  np.testing.assert_array_equal(routing.teacher_row_back[1, :4], np.arange(4))
  # Round trip: every cross row is sent once, to its own teacher, and its score comes back
  # to it; native rows are never sent.
  for k in range(3):
    sent = routing.send_row[k][routing.send_valid[k]]
    np.testing.assert_array_equal(np.sort(sent), np.arange(4, 12))
    flat = routing.send_row[k].reshape(-1)
    np.testing.assert_array_equal(flat[routing.receive_slot[k, 4:]], np.arange(4, 12))
    teacher_of_slot = routing.receive_slot[k, 4:] // 8
    np.testing.assert_array_equal(teacher_of_slot, np.repeat(assignment[k], 2))
  # A prompt's G rows share one prompt entry (its first row), in row order.
  np.testing.assert_array_equal(routing.send_prompt_row[0, 1, :2], [4, 8])
  np.testing.assert_array_equal(routing.send_row[0, 1, :4], [4, 5, 8, 9])
  with pytest.raises(ValueError, match="teacher ids outside"):
    stages.teacher_routing(np.array([[3]]), 3, samples=2)


def test_teacher_scoring_matches_direct_per_pair_scoring(setup):
  cfg, s = setup
  params = experts.init_stacked(s.model_cfg, jax.random.split(jax.random.key(1), 3))
  rows = fixed_rows(s, params, ("text", "image", "video"))
  # Every row is a cross row: student k's rows scored by teacher (k + 1) % 3.
  assignment = np.array([[1, 1], [2, 2], [0, 0]], np.int32)
  routing = stages.teacher_routing(assignment, 3, samples=2)
  arrays = routing.as_arrays()
  ucfg = ucfg_for(s)
  got = scoring_lib.score_by_teachers(scoring_lib.Teachers(params, arrays), rows, ucfg)
  for k in range(3):
    j = (k + 1) % 3
    teacher = experts.take_expert(params, j)
    hidden = model_lib.forward_hidden(teacher, s.model_cfg, rows.tokens[k], rows.positions[k],
                                      rows.token_mask[k], rows.frames[k])
    want = kernels.sampled_token_logprobs(hidden, model_lib.lm_head(teacher, s.model_cfg),
                                          rows_lib.next_token_targets(rows.tokens[k]))
    m = np.asarray(rows.response_mask[k]) > 0
    np.testing.assert_allclose(np.asarray(got[k])[m], np.asarray(want)[m], atol=1e-5)


def sampled_reverse_kl(student, teacher, rows_k, model_cfg):
  """mean over the student's sampled tokens of log p_student - log p_teacher."""
  def lp(p):
    h = model_lib.forward_hidden(p, model_cfg, rows_k.tokens, rows_k.positions,
                                 rows_k.token_mask, rows_k.frames)
    return kernels.sampled_token_logprobs(h, model_lib.lm_head(p, model_cfg),
                                          rows_lib.next_token_targets(rows_k.tokens))
  m = rows_k.response_mask
  return float(jnp.sum((lp(student) - lp(teacher)) * m) / jnp.sum(m))


def test_opd_only_update_lowers_reverse_kl_to_teacher(setup):
  cfg, s = setup
  student = experts.init_stacked(s.model_cfg, jax.random.split(jax.random.key(2), 1))
  teacher = experts.init_stacked(s.model_cfg, jax.random.split(jax.random.key(3), 1))
  rows = fixed_rows(s, student, ("text",), n_prompts=4, g=2, opd_beta=1.0)
  routing = stages.teacher_routing(np.zeros((1, 4), np.int32), 1, samples=2)
  arrays = routing.as_arrays()
  ucfg = ucfg_for(s)
  optimizer = update_lib.make_optimizer(3e-3, 1.0)
  fn = update_fn(ucfg, optimizer)
  state = update_lib.TrainState(student, update_lib.init_optimizer_state(optimizer, student))
  one = lambda tree: jax.tree.map(lambda x: x[0], tree)
  before = sampled_reverse_kl(one(student), one(teacher), one(rows), s.model_cfg)
  for _ in range(5):  # fixed rollouts: advantages are 0, only the OPD signal acts
    state, metrics = update_lib.update(fn, state, rows, scoring_lib.Teachers(teacher, arrays))
  after = sampled_reverse_kl(one(state.params), one(teacher), one(rows), s.model_cfg)
  assert before > 0.1
  assert after < 0.8 * before, (before, after)
  assert float(metrics["opd/tokens"][0]) > 0


def test_branches_update_independently_like_separate_runs(setup):
  """Vmapped RL update of E branches == each branch updated alone (no cross-talk)."""
  cfg, s = setup
  params = experts.init_stacked(s.model_cfg, jax.random.split(jax.random.key(4), 2))
  rows = fixed_rows(s, params, ("text", "image"))
  rows.advantages = jnp.asarray(np.random.default_rng(0).normal(size=rows.advantages.shape),
                                jnp.float32)
  ucfg = ucfg_for(s)
  # Plain SGD: Adam's normalisation would amplify float noise in near-zero gradients.
  optimizer = optax.sgd(0.1)
  fn = update_fn(ucfg, optimizer)
  state_of = lambda p: update_lib.TrainState(p, update_lib.init_optimizer_state(optimizer, p))
  both = update_lib.update(fn, state_of(params), rows)[0].params
  for k in range(2):
    pick = lambda tree: jax.tree.map(lambda x: x[k:k + 1], tree)
    alone = update_lib.update(fn, state_of(pick(params)), pick(rows))[0].params
    for a, b in zip(jax.tree.leaves(pick(both)), jax.tree.leaves(alone)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  # And the update did change the parameters.
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(both), jax.tree.leaves(params)))
  assert moved > 1e-5


def test_merge_of_identical_branches_is_identity(setup):
  cfg, s = setup
  base = model_lib.init_params(s.model_cfg, jax.random.key(5))
  merged = stacked_lib.merge(experts.broadcast_params(base, 3))
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def brute_force_overlap(logits_a, logits_b, mask, k):
  total, count = 0.0, 0
  for i in range(logits_a.shape[0]):
    if mask[i]:
      top_a = set(np.argsort(-logits_a[i])[:k].tolist())
      top_b = set(np.argsort(-logits_b[i])[:k].tolist())
      total += len(top_a & top_b) / k
      count += 1
  return total / count


def test_overlap_matches_brute_force_and_is_one_for_identical():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 30, 40)).astype(np.float32)
  mask = rng.random(30) > 0.3
  ids = lambda x: jax.lax.top_k(jnp.asarray(x), 10)[1]
  got = float(diagnostics.top_k_overlap(ids(a), ids(b), mask))
  assert got == pytest.approx(brute_force_overlap(a, b, mask, 10), abs=1e-6)
  assert float(diagnostics.top_k_overlap(ids(a), ids(a), mask)) == pytest.approx(1.0)


def test_pairwise_diagnostics_identical_policies(setup):
  cfg, s = setup
  base = model_lib.init_params(s.model_cfg, jax.random.key(6))
  params = experts.broadcast_params(base, 2)
  rows = fixed_rows(s, params, ("text", "image"))
  models = experts.broadcast_params(base, 3)
  diag = diagnostics.pairwise_diagnostics(models, s.model_cfg, rows.tokens, rows.positions,
                                          rows.token_mask, rows.response_mask, rows.frames, k=10)
  np.testing.assert_allclose(np.asarray(diag["overlap"]), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(diag["sym_kl"]), 0.0, atol=1e-5)
  other = model_lib.init_params(s.model_cfg, jax.random.key(7))
  models = jax.tree.map(lambda x, y: x.at[2].set(y), models, other)
  diag = diagnostics.pairwise_diagnostics(models, s.model_cfg, rows.tokens, rows.positions,
                                          rows.token_mask, rows.response_mask, rows.frames, k=10)
  assert float(diag["overlap"][0, 2]) < 1.0
  assert float(diag["sym_kl"][0, 2]) > 1e-3


def test_kl_to_reference_is_zero_against_itself_and_positive_after_drift(setup):
  cfg, s = setup
  params = experts.init_stacked(s.model_cfg, jax.random.split(jax.random.key(8), 1))
  rows = fixed_rows(s, params, ("text",))
  ucfg = ucfg_for(s, kl_coef=0.1)
  optimizer = optax.sgd(1.0)
  reference = jax.tree.map(lambda x: x[0], params)
  fn = update_fn(ucfg, optimizer)
  state = update_lib.TrainState(params, update_lib.init_optimizer_state(optimizer, params))
  rows.advantages = jnp.ones_like(rows.advantages)
  moved, metrics = update_lib.update(fn, state, rows, None, reference)
  assert abs(float(metrics["kl_to_reference"][0])) < 1e-5
  _, metrics = update_lib.update(fn, moved, rows, None, reference)
  assert float(metrics["kl_to_reference"][0]) > 1e-4
  with pytest.raises(ValueError, match="ref_params"):
    update_lib.update(fn, state, rows, None, None)


def test_banned_tokens_are_never_sampled(setup):
  cfg, s = setup
  params = experts.init_stacked(s.model_cfg, jax.random.split(jax.random.key(9), 1))
  batch = s.encode_prompts([tasks.make_example("image", i, seed=0, difficulty=1,
                                               **s.example_kwargs) for i in range(2)])
  banned = policy_setup.never_generated_ids(s.tokenizer)
  config = sampling.SamplingConfig(max_new_tokens=8, temperature=3.0, banned_token_ids=banned)
  rollout = sampling.generate(jax.tree.map(lambda x: x[0], params),
                              sampling.Sampler(s.model_cfg, config, 16),
                              sampling.Prompts(batch.tokens, batch.mask, batch.frames),
                              jax.random.key(0))
  sampled = np.asarray(rollout.tokens)[np.asarray(rollout.mask) > 0]
  assert sampled.size > 100
  assert not np.isin(sampled, banned).any()
  with pytest.raises(ValueError, match="banned_token_ids must not contain a stop token"):
    sampling.SamplingConfig(max_new_tokens=4, stop_token_ids=(2,), banned_token_ids=(2,))


def test_micro_batched_remat_update_equals_full_batch(setup):
  """Gradient accumulation over row micro-batches (with padding: 6 rows in micro-batches of
  4), chunked teacher / reference scoring, prompt-once exchange and per-layer remat give
  the full-batch update."""
  cfg, s = setup
  params = experts.init_stacked(s.model_cfg, jax.random.split(jax.random.key(11), 2))
  rows = fixed_rows(s, params, ("text", "image"), n_prompts=3, g=2, opd_beta=0.5)
  rows.advantages = jnp.asarray(np.random.default_rng(1).normal(size=rows.advantages.shape),
                                jnp.float32)
  prompt_len = rows.tokens.shape[-1] - 6  # fixed_rows samples 6 new tokens
  routing = stages.teacher_routing(np.array([[1, 1, 1], [0, 0, 0]], np.int32), 2,
                                    samples=2).as_arrays()
  reference = jax.tree.map(lambda x: x[1], params)
  optimizer = optax.sgd(0.1)
  state = update_lib.TrainState(params, update_lib.init_optimizer_state(optimizer, params))
  teachers = scoring_lib.Teachers(params, routing)
  full_cfg = ucfg_for(s, kl_coef=0.05)
  remat_model = dataclasses.replace(s.model_cfg, remat=True)
  micro_cfg = dataclasses.replace(full_cfg, model=remat_model, micro_batch_rows=4,
                                  samples_per_prompt=2)
  # Remat keeps the parameter names.
  assert jax.tree.structure(model_lib.init_params(remat_model, jax.random.key(0))) == \
      jax.tree.structure(jax.tree.map(lambda x: x[0], params))
  run = lambda ucfg, p_len: update_lib.update(
      update_fn(ucfg, optimizer), state, dataclasses.replace(rows, prompt_len=p_len), teachers,
      reference)
  want_state, want = run(full_cfg, 0)
  got_state, got = run(micro_cfg, prompt_len)
  want_params, got_params = want_state.params, got_state.params
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(want_params), jax.tree.leaves(params)))
  assert moved > 1e-4
  for a, b in zip(jax.tree.leaves(want_params), jax.tree.leaves(got_params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)
  assert float(np.min(want["opd/tokens"])) > 0
  for name in want:
    np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-4,
                               atol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match="micro_batch_rows"):
    dataclasses.replace(full_cfg, micro_batch_rows=-1)


def test_cosine_learning_rate_decays_over_the_stage_and_holds():
  """Adam's first step moves a weight by the learning rate; with a cosine schedule over 10
  steps from 1.0 to 0.1 the k-th step's rate is 0.1 + 0.9 * (1 + cos(pi k / 10)) / 2."""
  optimizer = update_lib.make_optimizer(
      update_lib.learning_rate_schedule(1.0, "cosine", 10, 0.1), 1e9)
  params = {"w": jnp.zeros(())}
  state = optimizer.init(params)
  rates = []
  for _ in range(12):
    updates, state = optimizer.update({"w": jnp.ones(())}, state, params)
    rates.append(-float(updates["w"]))  # constant gradient: Adam's step is exactly the rate
  want = [0.1 + 0.9 * (1 + np.cos(np.pi * min(k, 10) / 10)) / 2 for k in range(12)]
  np.testing.assert_allclose(rates, want, rtol=1e-4)
  constant = update_lib.make_optimizer(1.0, 1e9)
  state = constant.init(params)
  for _ in range(3):
    updates, state = constant.update({"w": jnp.ones(())}, state, params)
  assert abs(-float(updates["w"]) - 1.0) < 1e-4
  with pytest.raises(ValueError, match="schedule"):
    update_lib.learning_rate_schedule(1.0, "linear", 10)
