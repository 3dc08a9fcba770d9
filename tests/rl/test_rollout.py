"""The host half of a step (rollout.StageRollout), pinned to numpy written here.

Non-zero rewards (a reward plug-in), asymmetric per-branch OPD rates, one student without
teachers and a schedule weight strictly between 0 and 1: the rows' GRPO advantages and
teacher betas must be what the paper's formulas give, computed from the sampled responses
alone. A sign flip of the group advantages, an inverted or ignored schedule weight, or a
beta taken from the teacher's rate instead of the student's all fail here.
"""
import jax
import numpy as np
import pytest

import reward_plugins
from copd_jax.config_lib import spec_of
from copd_jax import config_lib, default_config, policy_setup
from copd_jax.models import stacked
from copd_jax.rl import loop, rollout, rows as rows_lib, stages
from tiny_model import one_device_run

CAPS = ("text", "image", "video")
RATES = {"text": 0.5, "image": 2.0, "video": 0.0}  # video: a student without teachers
G = 4  # samples per prompt


@pytest.fixture(scope="module")
def run():
  cfg = default_config.get("copd", "micro")
  cfg.rl.opd.update(dict(topology="hub", hub="text", branch_beta=RATES))
  cfg.rl.update(dict(native_prompts=2, cross_prompts=2, samples_per_prompt=G))
  cfg.reward.update(dict(fn="reward_plugins:digit_fraction", workers=1))
  config_lib.validate_config(cfg)
  setup = policy_setup.build_setup(spec_of(cfg))
  params = stacked.init_stacked(setup.model_cfg, jax.random.split(jax.random.key(3), 3))
  yield cfg, setup, params


def host_half(cfg, setup, params, weight: float, step: int = 0) -> rollout.Rollouts:
  """One step's rollouts of the CoPD stage at OPD weight `weight` (the call under test)."""
  stage = stages.copd_stage(spec_of(cfg).rl, list(CAPS))
  data = loop.data_context(spec_of(cfg), setup, seed_offset=1)
  ucfg = rows_lib.update_config(spec_of(cfg), setup.model_cfg)
  host = rollout.StageRollout(stage, data, one_device_run(setup.model_cfg), ucfg.model,
                              jax.random.key(0), stages.cross_teacher_assignment(stage),
                              ucfg.scale_by_std)
  return host.collect_rollouts(params, step, weight, np.random.default_rng(0))


def oracle_advantages(rewards: np.ndarray, scale_by_std: bool) -> np.ndarray:
  """GRPO / Dr.GRPO by hand: per group of G, (r - mean) / (std + 1e-6) or r - mean; 0 for
  a group whose rewards are all equal. rewards f64[S, B*G] -> f64[S, B*G]."""
  out = np.zeros_like(rewards)
  for s in range(rewards.shape[0]):
    for start in range(0, rewards.shape[1], G):
      r = rewards[s, start:start + G]
      if np.all(r == r[0]):
        continue
      out[s, start:start + G] = (r - r.mean()) / (r.std() + 1e-6) if scale_by_std else r - r.mean()
  return out


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_host_half_advantages_and_betas_match_numpy(run, scale_by_std):
  cfg, setup, params = run
  cfg = cfg.copy_and_resolve_references()
  cfg.rl.scale_by_std = scale_by_std
  weight = 0.25
  got = host_half(cfg, setup, params, weight)
  s, n = got.rewards.shape
  assert (s, n) == (3, (2 + 2) * G)

  # Rewards: the plug-in applied to the decoded responses, row by row.
  responses = got.responses_of(np.arange(s * n))
  rewards = np.array([reward_plugins.digit_fraction(r, None) for r in responses]).reshape(s, n)
  np.testing.assert_allclose(got.rewards, rewards, atol=1e-6)
  native = np.zeros((s, n), bool)
  native[:, :2 * G] = True
  assert rewards[native].std() > 0.02, "the test needs reward spread inside the groups"

  # Who teaches whom: the hub (text) splits its cross prompts between image and video
  # round-robin; the spokes learn from the hub; video (rate 0) has no teacher.
  np.testing.assert_array_equal(got.row_teacher, [[-1, -1, 1, 2], [-1, -1, 0, 0],
                                                   [-1, -1, -2, -2]])
  teacher = np.repeat(got.row_teacher, G, axis=1)

  # Advantages: GRPO over each native group; cross rows carry none (CoPD keeps the
  # outcome reward on native rows only).
  want_adv = np.where(native, oracle_advantages(rewards, scale_by_std), 0.0)
  np.testing.assert_allclose(np.asarray(got.rows.advantages), want_adv, atol=1e-5)
  assert np.abs(want_adv).max() > 0.1

  # Betas: schedule weight x the *student's* rate x the hub topology, on cross rows only.
  rate = np.array([RATES[c] for c in CAPS])
  hub = np.array([[0, 1, 1], [1, 0, 0], [1, 0, 0]], np.float64)
  want_beta = np.zeros((s, n))
  for k in range(s):
    for i in range(n):
      if teacher[k, i] >= 0:
        want_beta[k, i] = weight * rate[k] * hub[k, teacher[k, i]]
  np.testing.assert_allclose(np.asarray(got.rows.opd_beta), want_beta, atol=1e-7)
  assert sorted(set(want_beta[teacher >= 0].round(6))) == [0.125, 0.5]
  # The teacherless student's cross rows carry no loss at all.
  response_mask = np.asarray(got.rows.response_mask)
  assert response_mask[2, 2 * G:].sum() == 0 and response_mask[2, :2 * G].sum() > 0
  assert response_mask[:2, 2 * G:].sum(axis=-1).min() > 0


def test_rl_only_step_has_no_teacher_rows(run):
  """Weight 0 (an RL phase of the cycle): no distillation, every beta 0, same native
  advantages as an OPD step would give the same rewards."""
  cfg, setup, params = run
  got = host_half(cfg, setup, params, weight=0.0)
  assert not got.distil
  assert not np.asarray(got.rows.opd_beta).any()
  want = oracle_advantages(got.rewards.astype(np.float64), True)
  native = np.repeat(got.row_teacher, G, axis=1) == -1
  np.testing.assert_allclose(np.asarray(got.rows.advantages), np.where(native, want, 0.0),
                             atol=1e-5)
