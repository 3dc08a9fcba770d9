"""The plain-jnp policy loss (copd_jax.losses, the oracle the kernels are held to) and the
GRPO group advantages (copd_jax.rl.objectives)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from copd_jax import losses as obj
from copd_jax.losses import PolicyLossConfig
from copd_jax.rl import objectives


# ------------------------------------------------------------------ advantages
def test_grpo_advantages_normalise_per_group_and_report_zero_variance():
  rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 1.0]])
  adv, zero_var = objectives.grpo_advantages(rewards, eps=0.0)
  np.testing.assert_allclose(adv[0], [1.0, -1.0, -1.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(adv[1], 0.0)
  std2 = np.std([2.0, 0.0, 1.0, 1.0])
  np.testing.assert_allclose(adv[2], np.array([1.0, -1.0, 0.0, 0.0]) / std2, rtol=1e-6)
  np.testing.assert_array_equal(zero_var, [False, True, False])
  np.testing.assert_allclose(adv.mean(axis=1), 0.0, atol=1e-6)


def test_dr_grpo_advantages_skip_std_and_sample_std_option():
  rewards = jnp.array([[3.0, 1.0, 2.0]])
  adv, _ = objectives.grpo_advantages(rewards, scale_by_std=False)
  np.testing.assert_allclose(adv, [[1.0, -1.0, 0.0]], atol=1e-6)
  adv1, _ = objectives.grpo_advantages(rewards, eps=0.0, ddof=1)
  np.testing.assert_allclose(adv1, [[1.0, -1.0, 0.0]], atol=1e-6)  # sample std = 1


def test_grpo_advantages_reject_bad_shape():
  with pytest.raises(ValueError, match="rewards"):
    objectives.grpo_advantages(jnp.ones(4))


# ---------------------------------------------------------------- PPO surrogate
def _ppo_loss_and_grad(lp, old, adv, **kw):
  def f(lp):
    return obj.ppo_clipped_surrogate(lp, old, adv, **kw).loss.sum()
  return jax.value_and_grad(f)(lp)


def test_ppo_unclipped_region_has_plain_policy_gradient():
  lp, old, adv = jnp.array([0.05]), jnp.array([0.0]), jnp.array([2.0])
  loss, grad = _ppo_loss_and_grad(lp, old, adv)
  ratio = np.exp(0.05)
  np.testing.assert_allclose(loss, -2.0 * ratio, rtol=1e-6)
  np.testing.assert_allclose(grad, [-2.0 * ratio], rtol=1e-6)  # d(-A r)/d lp = -A r


def test_ppo_asymmetric_clip_cuts_gradient_outside_the_band():
  old = jnp.zeros(4)
  lp = jnp.log(jnp.array([1.5, 1.25, 0.5, 0.9]))
  adv = jnp.array([1.0, 1.0, -1.0, -1.0])
  terms = obj.ppo_clipped_surrogate(lp, old, adv, eps_low=0.2, eps_high=0.28)
  # r=1.5 > 1.28 with A>0: clipped at 1.28; r=1.25 inside; r=0.5 < 0.8 with A<0: clipped.
  np.testing.assert_allclose(terms.loss, [-1.28, -1.25, 0.8, 0.9], rtol=1e-6)
  np.testing.assert_array_equal(terms.clipped_high, [1, 0, 0, 0])
  np.testing.assert_array_equal(terms.clipped_low, [0, 0, 1, 0])
  _, grad = _ppo_loss_and_grad(lp, old, adv, eps_low=0.2, eps_high=0.28)
  np.testing.assert_allclose(grad, [0.0, -1.25, 0.0, 0.9], rtol=1e-6)


def test_dual_clip_caps_negative_advantage_loss():
  lp, old, adv = jnp.log(jnp.array([10.0, 10.0])), jnp.zeros(2), jnp.array([-1.0, 1.0])
  terms = obj.ppo_clipped_surrogate(lp, old, adv, dual_clip=3.0)
  np.testing.assert_allclose(terms.loss, [3.0, -1.28], rtol=1e-6)
  np.testing.assert_array_equal(terms.dual_clipped, [1, 0])
  _, grad = _ppo_loss_and_grad(lp, old, adv, dual_clip=3.0)
  np.testing.assert_allclose(grad, [0.0, 0.0])
  no_dual = obj.ppo_clipped_surrogate(lp, old, adv)
  np.testing.assert_allclose(no_dual.loss[0], 10.0, rtol=1e-6)


def test_importance_ratio_truncation_and_overflow_guard():
  ratio = obj.importance_ratio(jnp.array([0.0, 1.0, 500.0]), jnp.zeros(3), truncate_at=2.0)
  np.testing.assert_allclose(ratio, [1.0, 2.0, 2.0], rtol=1e-6)
  huge = obj.importance_ratio(jnp.array([500.0]), jnp.zeros(1))
  assert np.isfinite(huge).all()


def test_truncated_is_weight_folds_into_advantages():
  """Clipped loss is positively homogeneous in A: w * loss(A) == loss(w * A)."""
  key = jax.random.key(0)
  lp = 0.3 * jax.random.normal(key, (64,))
  old = jnp.zeros(64)
  adv = jax.random.normal(jax.random.key(1), (64,))
  sampler = 0.5 * jax.random.normal(jax.random.key(2), (64,))
  w = obj.truncated_is_weight(old, sampler, cap=2.0)
  assert float(w.max()) <= 2.0 and float(w.min()) > 0
  scaled = obj.ppo_clipped_surrogate(lp, old, adv, dual_clip=3.0).loss * w
  folded = obj.ppo_clipped_surrogate(lp, old, adv * w, dual_clip=3.0).loss
  np.testing.assert_allclose(scaled, folded, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- KL
def test_kl_estimators_match_formulas():
  lp, ref = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])
  x = np.array([0.5, -1.0])
  np.testing.assert_allclose(obj.kl_penalty(lp, ref, "k1"), x, rtol=1e-6)
  np.testing.assert_allclose(obj.kl_penalty(lp, ref, "k2"), 0.5 * x**2, rtol=1e-6)
  np.testing.assert_allclose(obj.kl_penalty(lp, ref, "k3"), np.exp(-x) + x - 1, rtol=1e-6)
  with pytest.raises(ValueError, match="estimator"):
    obj.kl_penalty(lp, ref, "k4")


def test_kl_estimators_are_unbiased_on_samples_from_the_policy():
  p_logits = jnp.array([2.0, 0.5, -1.0, 0.0])
  q_logits = jnp.array([0.0, 1.0, 0.0, -0.5])
  logp, logq = jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)
  true_kl = float(jnp.sum(jnp.exp(logp) * (logp - logq)))
  samples = jax.random.categorical(jax.random.key(0), p_logits, shape=(200_000,))
  for est in ("k1", "k3"):
    estimate = float(obj.kl_penalty(logp[samples], logq[samples], est).mean())
    assert abs(estimate - true_kl) < 0.01, (est, estimate, true_kl)
  assert float(obj.kl_penalty(logp[samples], logq[samples], "k3").min()) >= 0.0


def test_entropy_and_token_logprobs_from_logits_survive_huge_logits():
  logits = jnp.array([[0.0, 0.0], [1e4, -1e4]])
  ent = obj.entropy_from_logits(logits)
  np.testing.assert_allclose(ent, [np.log(2.0), 0.0], atol=1e-6)
  lp = obj.token_logprobs_from_logits(logits, jnp.array([1, 1]))
  np.testing.assert_allclose(lp, [-np.log(2.0), -2e4], rtol=1e-6)


# ------------------------------------------------------------------------ OPD
def test_opd_token_advantage_is_a_stopped_log_ratio():
  t, s = jnp.array([-1.0, -3.0]), jnp.array([-2.0, -1.0])
  np.testing.assert_allclose(obj.opd_token_advantage(t, s, 0.5), [0.5, -1.0])
  grad = jax.grad(lambda s: obj.opd_token_advantage(t, s, 0.5).sum())(s)
  np.testing.assert_allclose(grad, 0.0)


def test_sampled_log_ratio_estimates_minus_reverse_kl():
  """The paper's delta_t is a one-sample estimate of -KL(student || teacher)."""
  s_logits = jnp.array([1.0, 0.0, -1.0, 2.0, 0.5])
  t_logits = jnp.array([0.0, 1.0, 0.0, 1.0, -1.0])
  rkl = float(obj.reverse_kl_from_logits(s_logits, t_logits))
  samples = jax.random.categorical(jax.random.key(3), s_logits, shape=(200_000,))
  logp_s, logp_t = jax.nn.log_softmax(s_logits), jax.nn.log_softmax(t_logits)
  delta = obj.opd_token_advantage(logp_t[samples], logp_s[samples], 1.0)
  assert abs(float(delta.mean()) + rkl) < 0.01
  assert rkl > 0.1


def test_reverse_kl_from_logits_zero_for_identical_and_shift_invariant():
  logits = jnp.array([[1.0, 2.0, 3.0], [0.0, -5.0, 5.0]])
  np.testing.assert_allclose(obj.reverse_kl_from_logits(logits, logits + 7.0), 0.0, atol=1e-6)


def test_topk_renormalised_kl_equals_full_kl_at_k_equal_v_and_uses_the_support():
  key1, key2 = jax.random.split(jax.random.key(0))
  s, t = jax.random.normal(key1, (3, 6)), jax.random.normal(key2, (3, 6))
  np.testing.assert_allclose(obj.topk_renormalised_reverse_kl(s, t, 6),
                             obj.reverse_kl_from_logits(s, t), rtol=1e-5)
  # k = 1: both renormalise to a point mass on the same token -> KL 0.
  np.testing.assert_allclose(obj.topk_renormalised_reverse_kl(s, t, 1), 0.0, atol=1e-6)
  # k = 2 on the teacher's top-2 by hand.
  ids = np.argsort(-np.asarray(t), axis=1)[:, :2]
  s2 = np.take_along_axis(np.asarray(s), ids, 1)
  t2 = np.take_along_axis(np.asarray(t), ids, 1)
  np.testing.assert_allclose(obj.topk_renormalised_reverse_kl(s, t, 2, support="teacher"),
                             obj.reverse_kl_from_logits(jnp.array(s2), jnp.array(t2)),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="support"):
    obj.topk_renormalised_reverse_kl(s, t, 2, support="both")


# ------------------------------------------------------------------ aggregation
LOSSES = jnp.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
MASK = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], jnp.float32)


@pytest.mark.parametrize("mode, expected_sum, expected_denom", [
    ("token_mean", 40.0, 6.0),
    ("seq_mean_token_mean", 2.5 + 15.0, 2.0),
    ("seq_sum_constant", 40.0, 2 * 4.0),
])
def test_aggregation_modes(mode, expected_sum, expected_denom):
  total, denom = obj.aggregate_token_losses(LOSSES, MASK, mode)
  np.testing.assert_allclose([total, denom], [expected_sum, expected_denom], rtol=1e-6)


@pytest.mark.parametrize("mode", obj.AGGREGATIONS)
def test_aggregation_accumulates_exactly_over_micro_batches(mode):
  losses = jax.random.normal(jax.random.key(0), (6, 5))
  mask = (jax.random.uniform(jax.random.key(1), (6, 5)) > 0.4).astype(jnp.float32)
  full = obj.aggregate_token_losses(losses, mask, mode, constant_normaliser=7.0)
  parts = [obj.aggregate_token_losses(losses[i:i + 2], mask[i:i + 2], mode,
                                      constant_normaliser=7.0) for i in (0, 2, 4)]
  np.testing.assert_allclose(sum(p[0] for p in parts), full[0], rtol=1e-5)
  np.testing.assert_allclose(sum(p[1] for p in parts), full[1], rtol=1e-6)


def test_aggregation_all_masked_gives_zero_not_nan_and_ignores_padding_nan():
  losses = jnp.array([[jnp.nan, 1.0]])
  total, denom = obj.aggregate_token_losses(losses, jnp.zeros((1, 2)), "token_mean")
  assert float(total) == 0.0 and float(denom) == 0.0
  assert float(obj.mean_from_sum(total, denom)) == 0.0
  total, _ = obj.aggregate_token_losses(losses, jnp.array([[0.0, 1.0]]), "token_mean")
  assert float(total) == 1.0
  with pytest.raises(ValueError, match="aggregation mode"):
    obj.aggregate_token_losses(losses, jnp.ones((1, 2)), "mean")


# -------------------------------------------------------------- per-token loss
def test_policy_token_terms_compose_pg_kl_entropy_and_opd():
  cfg = PolicyLossConfig(kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01)
  lp = jnp.array([-1.0, -2.0])
  old = jnp.array([-1.0, -2.0])
  adv = jnp.array([1.0, -1.0])
  ref = jnp.array([-1.5, -2.0])
  ent = jnp.array([2.0, 3.0])
  teacher = jnp.array([-0.5, -3.0])
  terms = obj.policy_token_terms(lp, old, adv, cfg, entropy=ent, ref_logprobs=ref,
                                 teacher_logprobs=teacher, opd_beta=2.0)
  total_adv = np.array([1.0 + 2.0 * 0.5, -1.0 + 2.0 * -1.0])
  np.testing.assert_allclose(terms.advantages, total_adv)
  np.testing.assert_allclose(terms.pg_loss, -total_adv, rtol=1e-6)  # ratio 1
  np.testing.assert_allclose(terms.loss, -total_adv + 0.1 * np.array([0.5, 0.0])
                             - 0.01 * np.array([2.0, 3.0]), rtol=1e-6)


def test_opd_student_logprob_choice():
  lp, old, teacher = jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([-1.5])
  for choice, expected in (("old", 0.5), ("current", -0.5)):
    cfg = PolicyLossConfig(opd_student_logprob=choice)
    adv = obj.total_advantages(jnp.zeros(1), lp, old, cfg, teacher_logprobs=teacher,
                               opd_beta=1.0)
    np.testing.assert_allclose(adv, [expected])


def test_policy_token_terms_reject_missing_inputs():
  cfg = PolicyLossConfig(kl_coef=0.1)
  with pytest.raises(ValueError, match="ref_logprobs"):
    obj.policy_token_terms(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), cfg)
  with pytest.raises(ValueError, match="opd_beta"):
    obj.total_advantages(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), PolicyLossConfig(),
                         teacher_logprobs=jnp.zeros(2))


@pytest.mark.parametrize("field, value", [
    ("eps_low", 1.5), ("eps_high", -0.1), ("dual_clip", 0.5), ("kl_estimator", "k9"),
    ("aggregation", "sum"), ("constant_normaliser", 0.0), ("opd_student_logprob", "new"),
])
def test_policy_loss_config_names_the_bad_field(field, value):
  with pytest.raises(ValueError, match=field):
    PolicyLossConfig(**{field: value})
  assert dataclasses.is_dataclass(PolicyLossConfig())
  hash(PolicyLossConfig())  # static jit argument
