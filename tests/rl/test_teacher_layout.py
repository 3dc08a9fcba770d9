"""Teacher scoring without padded work: each teacher scores only the cross rows assigned to
it, and every (student row, teacher) log-prob equals a plain per-pair oracle.

The oracle is written here: for each student k and each of its cross prompts, the
hand-written teacher of that prompt (hub / full topology, 3 branches that differ) runs its
forward over the student's whole rows, and a dense log-softmax picks the next tokens. No
routing table, no prompt-once path, no kernel from copd_jax.kernels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import IMG, tiny_config

from copd_jax import kernels, losses, sharding
from copd_jax.analysis import teacher_rows as teacher_rows_audit
from copd_jax.models import decoder, stacked
from copd_jax.rl import rows as rows_lib, schedules, scoring, stages, teacher_lanes

S, G, NATIVE, CROSS, P, R = 3, 2, 1, 4, 12, 5
VISION = dict(image_size=8, patch_size=4, num_frames=2, tubelet=2, width=16, depth=1,
              num_heads=2, mlp_dim=32)  # 4 placeholder tokens per prompt
# Each student's teacher per cross prompt, written by hand (hub = branch 1: the hub
# student alternates over its spokes 0 and 2, the spokes learn from the hub only).
TEACHERS = {"hub": [[1, 1, 1, 1], [0, 2, 0, 2], [1, 1, 1, 1]],
            "full": [[1, 2, 1, 2], [0, 2, 0, 2], [0, 1, 0, 1]]}


def _stage(kind: str) -> stages.Stage:
  return stages.Stage(
      name="t", steps=1, student_data=(("a",), ("b",), ("c",)),
      teacher_data=(("a",), ("b",), ("c",)), live_teachers=True,
      topology=schedules.topology_matrix(S, kind, hub=1), branch_beta=np.ones(S, np.float32),
      schedule=schedules.OPDSchedule(kind="cycle"), native_prompts=NATIVE,
      cross_prompts=CROSS, samples_per_prompt=G)


@pytest.fixture(scope="module")
def problem():
  """Three differing branches and rows [S, (NATIVE + CROSS) * G, P + R]: left-padded
  prompts with image placeholders and media per prompt, responses that stop early."""
  cfg = tiny_config(num_layers=1, vision=VISION)
  params = stacked.init_stacked(cfg, jax.random.split(jax.random.key(7), S))
  rng = np.random.default_rng(3)
  b, t = NATIVE + CROSS, P + R
  tokens = rng.integers(4, cfg.vocab_size, (S, b, G, t)).astype(np.int32)
  mask = np.ones((S, b, G, t), bool)
  pad = rng.integers(0, 3, (S, b))  # left padding of each prompt
  for k in range(S):
    for i in range(b):
      tokens[k, i, :, :P] = tokens[k, i, 0, :P]  # the G samples share their prompt
      mask[k, i, :, :pad[k, i]] = False
      tokens[k, i, :, 4:8] = IMG
      for j in range(G):
        stop = rng.integers(2, R + 1)
        mask[k, i, j, P + stop:] = False
  frames = rng.normal(size=(S, b, 1, VISION["num_frames"], 8, 8, 3)).astype(np.float32)
  frames = np.repeat(frames, G, axis=2)
  n = b * G
  tokens, mask = tokens.reshape(S, n, t), mask.reshape(S, n, t)
  positions = np.asarray(decoder.positions_from_mask(jnp.asarray(mask.reshape(-1, t))))
  response = np.zeros((S, n, t), np.float32)
  response[:, :, P - 1:t - 1] = mask[:, :, P:]
  zeros = np.zeros((S, n), np.float32)
  rows = rows_lib.Rows(tokens=jnp.asarray(tokens),
                       positions=jnp.asarray(positions.reshape(S, n, t)),
                       token_mask=jnp.asarray(mask), response_mask=jnp.asarray(response),
                       old_logprobs=jnp.zeros((S, n, t)), advantages=jnp.asarray(zeros),
                       opd_beta=jnp.asarray(zeros),
                       frames=jnp.asarray(frames.reshape((S, n) + frames.shape[3:])),
                       prompt_len=P)
  ucfg = rows_lib.UpdateConfig(
      model=cfg, loss=losses.PolicyLossConfig(),
      kernel=kernels.KernelConfig(backend="chunked", vocab_tile=16, token_tile=8),
      samples_per_prompt=G)
  return cfg, params, rows, ucfg


def oracle_logprobs(cfg, params, rows, teachers) -> np.ndarray:
  """f32[S, CROSS*G, R]: the log-prob of each cross row's response tokens under its
  hand-assigned teacher, one (student, prompt, teacher) forward at a time, whole rows."""
  out = np.zeros((S, CROSS * G, R), np.float32)
  for k in range(S):
    for b in range(CROSS):
      teacher = jax.tree.map(lambda x: x[teachers[k][b]], params)
      sl = slice((NATIVE + b) * G, (NATIVE + b + 1) * G)
      hidden = decoder.forward_hidden(teacher, cfg, rows.tokens[k, sl], rows.positions[k, sl],
                                      rows.token_mask[k, sl], rows.frames[k, sl])
      logits = hidden[:, P - 1:-1] @ decoder.lm_head(teacher, cfg)
      logp = jax.nn.log_softmax(logits, axis=-1)
      out[k, b * G:(b + 1) * G] = np.take_along_axis(
          np.asarray(logp), np.asarray(rows.tokens[k, sl, P:])[..., None], -1)[..., 0]
  return out


def scored(params, rows, routing, ucfg, **kw) -> np.ndarray:
  """score_by_teachers' cross rows f32[S, CROSS*G, R] (the native rows carry no score)."""
  fn = jax.jit(lambda p, r, ro: scoring.score_by_teachers(
      scoring.Teachers(p, ro, NATIVE * G), r, ucfg, **kw))
  return np.asarray(fn(params, rows, routing))[:, NATIVE * G:]


def assert_matches_oracle(got, want, rows):
  # Compared where the response token exists (tokens past a stop are never scored).
  valid = np.asarray(rows.token_mask)[:, NATIVE * G:, P:]
  assert valid.sum() > 0.5 * valid.size
  np.testing.assert_allclose(got[valid], want[valid], rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", ["hub", "full"])
def test_teacher_layout_matches_per_pair_oracle(problem, kind):
  cfg, params, rows, ucfg = problem
  assignment = stages.cross_teacher_assignment(_stage(kind))
  np.testing.assert_array_equal(assignment, TEACHERS[kind])
  routing = stages.teacher_routing(assignment, S, G, native_rows=NATIVE * G)
  want = oracle_logprobs(cfg, params, rows, TEACHERS[kind])
  # The branches differ enough that another teacher's scores would fail the comparison.
  wrong = oracle_logprobs(cfg, params, rows, [[(j + 1) % S for j in t] for t in TEACHERS[kind]])
  assert np.abs(wrong - want).max() > 0.05
  for one_shape in (False, True):  # one call per load (one device) / one call at the max
    got = scored(params, rows, routing.as_arrays(), ucfg, one_shape=one_shape)
    assert_matches_oracle(got, want, rows)
  # Only the assigned rows are computed, per load (one device) and in calls of one shape
  # (an expert mesh's lanes): hub 16 + 4 + 4 rows per spoke pair.
  for one_shape in (False, True):
    rows_computed, _ = teacher_rows_audit.traced_teacher_rows(
        lambda p, r, ro, one_shape=one_shape: scoring.score_by_teachers(
            scoring.Teachers(p, ro, NATIVE * G), r, ucfg, one_shape=one_shape),
        params, rows, routing.as_arrays())
    assert rows_computed == S * CROSS * G


def test_top_k_through_the_compacted_layout(problem):
  """top-k OPD: each cross row gets its own teacher's top k ids and log-probs."""
  cfg, params, rows, ucfg = problem
  ucfg = rows_lib.UpdateConfig(
      model=cfg, loss=losses.PolicyLossConfig(opd_estimator="top_k", opd_top_k=4),
      kernel=ucfg.kernel, samples_per_prompt=G)
  routing = stages.teacher_routing(np.array(TEACHERS["hub"], np.int32), S, G,
                                   native_rows=NATIVE * G)
  lp, ids = scoring.score_by_teachers(
      scoring.Teachers(params, routing.as_arrays(), NATIVE * G), rows, ucfg)
  for k in range(S):
    for b in range(CROSS):
      teacher = jax.tree.map(lambda x: x[TEACHERS["hub"][k][b]], params)
      sl = slice((NATIVE + b) * G, (NATIVE + b + 1) * G)
      hidden = decoder.forward_hidden(teacher, cfg, rows.tokens[k, sl], rows.positions[k, sl],
                                      rows.token_mask[k, sl], rows.frames[k, sl])
      dense = jax.nn.log_softmax(hidden[:, P - 1:-1] @ decoder.lm_head(teacher, cfg), -1)
      want_lp, want_ids = jax.lax.top_k(dense, 4)
      valid = np.asarray(rows.token_mask[k, sl, P:])
      np.testing.assert_array_equal(np.asarray(ids[k, sl])[valid], np.asarray(want_ids)[valid])
      np.testing.assert_allclose(np.asarray(lp[k, sl])[valid], np.asarray(want_lp)[valid],
                                 atol=2e-5)


@pytest.mark.parametrize("kind", ["hub", "full"])
def test_teacher_layout_on_an_expert_mesh_matches_oracle(problem, kind):
  """The same scores on 6 simulated devices (expert=3 x data=2: conftest's XLA_FLAGS give
  the test process 8): one teacher per expert group, exchanged by all-to-all."""
  cfg, params, rows, ucfg = problem
  assert len(jax.devices()) >= 6, "needs --xla_force_host_platform_device_count >= 6"
  run = sharding.RunSharding(sharding.make_mesh(dict(expert=3, data=2, fsdp=1, tensor=1),
                                                jax.devices()[:6]),
                             param_axes=decoder.param_axes(cfg))
  routing = stages.teacher_routing(np.array(TEACHERS[kind], np.int32), S, G,
                                   native_rows=NATIVE * G)

  def score(p, r, ro):
    assert scoring.teachers_share_one_shape()  # the mesh's layout: one call, largest load
    return scoring.score_by_teachers(scoring.Teachers(p, ro, NATIVE * G), r, ucfg,
                                     placement=run.regroup_placement())
  fn = jax.jit(score, in_shardings=(run.stacked_params(params), run.rows(rows), run.replicated))
  with jax.set_mesh(run.mesh):
    got = np.asarray(fn(run.shard_params(params), rows, routing.as_arrays()))[:, NATIVE * G:]
    # The hub's lane no longer sets the pace: its overflow runs on the spokes' lanes, so
    # the mesh computes the assigned rows only (padding to the hub's load: 2x for hub).
    rows_computed, _ = teacher_rows_audit.traced_teacher_rows(score, params, rows,
                                                              routing.as_arrays())
  assert rows_computed == S * CROSS * G
  assert_matches_oracle(got, oracle_logprobs(cfg, params, rows, TEACHERS[kind]), rows)


def test_lane_plan_by_hand():
  """Hub of 3 at 8 + 2 + 2 prompts (the hub is teacher 1): chunks of 2, 2 rounds; the
  hub's lane runs its first 2 chunks, its other 2 go to the spokes' lanes in round 2."""
  plan = teacher_lanes.lane_plan([2, 8, 2])
  assert (plan.bucket, plan.trips) == (2, 2)
  np.testing.assert_array_equal(plan.teacher, [[0, 1], [1, 1], [2, 1]])
  np.testing.assert_array_equal(plan.first, [[0, 4], [0, 2], [0, 6]])
  np.testing.assert_array_equal(plan.count, [[2, 2], [2, 2], [2, 2]])
  assert plan.computed_prompts() == 12
  # Equal loads: one round, every lane its own teacher (no parameter leaves its lane).
  even = teacher_lanes.lane_plan([8, 8, 8])
  np.testing.assert_array_equal(even.teacher, [[0], [1], [2]])
  assert (even.bucket, even.trips) == (8, 1)


@pytest.mark.parametrize("loads", [[16, 4, 4], [40, 2, 2, 2, 1, 1], [3, 5, 0, 7], [0, 4, 0],
                                   [6, 6, 6, 6, 6, 6]])
def test_lane_plan_scores_every_prompt_once(loads):
  """Every teacher's prompts 0..L_j-1 are in exactly one chunk of that teacher; no chunk
  is larger than the bucket; the hub and full topologies of 3 and 6 branches compute no
  padding."""
  plan = teacher_lanes.lane_plan(loads)
  assert plan.teacher.shape == (len(loads), plan.trips)
  covered = {j: [] for j in range(len(loads))}
  for lane in range(plan.lanes):
    for trip in range(plan.trips):
      j, first, count = plan.teacher[lane, trip], plan.first[lane, trip], plan.count[lane, trip]
      assert 0 <= count <= plan.bucket
      covered[int(j)] += list(range(first, first + count))
  for j, load in enumerate(loads):
    assert sorted(covered[j]) == list(range(load))
    assert len(plan.chunk_place(j)) == -(-load // plan.bucket)
  assert plan.computed_prompts() >= sum(loads)
  if loads in ([16, 4, 4], [40, 2, 2, 2, 1, 1], [6, 6, 6, 6, 6, 6]):
    assert plan.computed_prompts() == sum(loads)
