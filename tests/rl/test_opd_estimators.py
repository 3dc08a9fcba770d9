"""OPD estimators (sampled_token, top_k, full_vocab) and truncated importance sampling.

Every estimator is held to a dense oracle written here with numpy-style jnp (full
softmax over the vocabulary, no code from copd_jax.losses or copd_jax.kernels), in
values and in gradients; TIS to numbers computed by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import one_device_run

from copd_jax.config_lib import spec_of
from copd_jax import kernels, losses
from copd_jax.kernels import KernelConfig
from copd_jax.losses import PolicyLossConfig

V, D, B, T = 37, 8, 3, 5  # a vocabulary of 37 with tiles of 16: two full tiles + 5
CHUNKED = KernelConfig(backend="chunked", vocab_tile=16, token_tile=4)
EPS_LOW, EPS_HIGH = 0.2, 0.28


def _inputs(seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  hidden = jax.random.normal(ks[0], (B, T, D))
  head = jax.random.normal(ks[1], (D, V)) * 0.7
  t_hidden = jax.random.normal(ks[2], (B, T, D))
  t_head = jax.random.normal(ks[3], (D, V)) * 0.7
  tokens = jax.random.randint(ks[4], (B, T), 0, V)
  advantages = jax.random.normal(ks[5], (B,))
  old = jnp.take_along_axis(jax.nn.log_softmax(hidden @ head), tokens[..., None], -1)[..., 0] \
      + 0.3 * jax.random.normal(ks[6], (B, T))  # a sampler that differs a little
  mask = jnp.ones((B, T)).at[0, 3:].set(0.0).at[2, 0].set(0.0)
  beta = jnp.array([0.0, 1.5, 0.7])[:, None] * mask  # row 0: a native row (no teacher)
  return hidden, head, t_hidden, t_head, tokens, advantages, old, mask, beta


def _oracle_pg(logp_tok, old, adv, mask):
  """Hand-written clipped PG per token (ratio against `old`), token-mean."""
  ratio = jnp.exp(logp_tok - old)
  per = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - EPS_LOW, 1 + EPS_HIGH))
  return per, mask


def _oracle_loss(hidden, head, t_logits, tokens, adv, old, mask, beta, support_k):
  """Dense oracle: clipped PG + beta * KL(student || teacher) renormalised on the
  teacher's top support_k tokens (support_k = V: the exact full-vocabulary KL)."""
  logp = jax.nn.log_softmax(hidden @ head, axis=-1)                      # [B, T, V]
  logp_tok = jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  pg, _ = _oracle_pg(logp_tok, old, adv[:, None], mask)
  t_logp = jax.nn.log_softmax(t_logits, axis=-1)
  order = jnp.argsort(-t_logp, axis=-1)[..., :support_k]                 # teacher's top k
  s_sel = jnp.take_along_axis(logp, order, -1)
  t_sel = jnp.take_along_axis(t_logp, order, -1)
  s_norm = s_sel - jax.scipy.special.logsumexp(s_sel, axis=-1, keepdims=True)
  t_norm = t_sel - jax.scipy.special.logsumexp(t_sel, axis=-1, keepdims=True)
  kl = jnp.sum(jnp.exp(s_norm) * (s_norm - t_norm), axis=-1)
  per = pg + beta * kl
  return jnp.sum(per * mask) / jnp.sum(mask), kl


def _kernel_loss(hidden, head, t_hidden, t_head, tokens, adv, old, mask, beta, k, kernel):
  support = kernels.teacher_top_k(t_hidden, t_head, k, kernel=kernel)
  loss_sum, den, aux = kernels.sequence_policy_loss(
      hidden, head, tokens, adv, old, mask, opd_beta=beta, teacher_support=support,
      config=PolicyLossConfig(eps_low=EPS_LOW, eps_high=EPS_HIGH), kernel=kernel)
  return loss_sum / den, aux


@pytest.mark.parametrize("k", [16, V], ids=["top_k", "full_vocab"])
@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_support_kl_matches_dense_oracle_in_value_and_gradient(k, backend):
  hidden, head, t_hidden, t_head, tokens, adv, old, mask, beta = _inputs()
  kernel = CHUNKED if backend == "chunked" else KernelConfig(backend="reference")
  t_logits = t_hidden @ t_head

  def oracle(h, w):
    return _oracle_loss(h, w, t_logits, tokens, adv, old, mask, beta, k)[0]

  def fused(h, w):
    return _kernel_loss(h, w, t_hidden, t_head, tokens, adv, old, mask, beta, k, kernel)[0]

  want, want_grads = jax.value_and_grad(oracle, argnums=(0, 1))(hidden, head)
  got, got_grads = jax.value_and_grad(fused, argnums=(0, 1))(hidden, head)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  # The KL term is really there: beta moves the loss by the oracle's KL.
  _, kl = _oracle_loss(hidden, head, t_logits, tokens, adv, old, mask, beta, k)
  aux = _kernel_loss(hidden, head, t_hidden, t_head, tokens, adv, old, mask, beta, k, kernel)[1]
  np.testing.assert_allclose(aux["opd_kl"], kl, rtol=1e-5, atol=1e-6)
  assert float(jnp.sum(kl * beta * mask)) > 0.1


def test_full_support_kl_equals_full_vocabulary_reverse_kl():
  """With k = V the renormalised KL is the exact reverse KL of the two softmaxes."""
  hidden, head, t_hidden, t_head, *_ = _inputs(1)
  p_s = jax.nn.softmax(hidden @ head, -1)
  exact = jnp.sum(p_s * (jnp.log(p_s) - jax.nn.log_softmax(t_hidden @ t_head, -1)), -1)
  lp_k, ids = kernels.teacher_top_k(t_hidden, t_head, V, kernel=CHUNKED)
  _, _, z = kernels.token_stats_at_ids(hidden, head, jnp.zeros((B, T), jnp.int32), ids,
                                       kernel=CHUNKED)
  np.testing.assert_allclose(losses.renormalised_reverse_kl(z, lp_k), exact, rtol=1e-5,
                             atol=1e-6)


def test_teacher_top_k_sends_the_dense_top_k():
  _, _, t_hidden, t_head, *_ = _inputs(2)
  lp_k, ids = kernels.teacher_top_k(t_hidden, t_head, 16, kernel=CHUNKED)
  dense = jax.nn.log_softmax(t_hidden @ t_head, -1)
  order = jnp.argsort(-dense, -1)[..., :16]
  np.testing.assert_array_equal(ids, order)
  np.testing.assert_allclose(lp_k, jnp.take_along_axis(dense, order, -1), rtol=1e-5)


def test_sampled_token_estimator_is_the_token_advantage():
  """The default: beta * (log p_teacher(y) - log p_old(y)) added to the advantage."""
  hidden, head, t_hidden, t_head, tokens, adv, old, mask, beta = _inputs(3)
  t_lp = jnp.take_along_axis(jax.nn.log_softmax(t_hidden @ t_head), tokens[..., None], -1)[..., 0]

  def oracle(h, w):
    logp_tok = jnp.take_along_axis(jax.nn.log_softmax(h @ w), tokens[..., None], -1)[..., 0]
    per, _ = _oracle_pg(logp_tok, old, adv[:, None] + beta * (t_lp - old), mask)
    return jnp.sum(per * mask) / jnp.sum(mask)

  def fused(h, w):
    s, d, _ = kernels.sequence_policy_loss(
        h, w, tokens, adv, old, mask, teacher_logprobs=t_lp, opd_beta=beta,
        config=PolicyLossConfig(eps_low=EPS_LOW, eps_high=EPS_HIGH), kernel=CHUNKED)
    return s / d

  want, want_g = jax.value_and_grad(oracle, argnums=(0, 1))(hidden, head)
  got, got_g = jax.value_and_grad(fused, argnums=(0, 1))(hidden, head)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ TIS
def test_tis_weights_the_pg_term_by_hand():
  """Three tokens, cap 2. Trainer's log-probs (= its old ones: one step per batch)
  against the sampler's: w = exp(0) = 1, exp(ln 3) = 3 -> capped to 2, exp(-ln 2) = 0.5.
  The ratio is against the trainer's old log-prob, so it is 1 and PG = -w A."""
  lp = jnp.log(jnp.array([0.5, 0.3, 0.1]))
  sampler = jnp.log(jnp.array([0.5, 0.1, 0.2]))
  adv = jnp.array([1.0, 2.0, -1.0])
  terms = losses.policy_token_terms(lp, sampler, adv, PolicyLossConfig(tis_cap=2.0))
  np.testing.assert_allclose(terms.tis_weight, [1.0, 2.0, 0.5], rtol=1e-6)
  np.testing.assert_allclose(terms.tis_clipped, [0.0, 1.0, 0.0])
  np.testing.assert_allclose(terms.ratio, [1.0, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(terms.pg_loss, [-1.0, -4.0, 0.5], rtol=1e-6)
  # d pg / d log pi = -w A (the ratio's gradient at 1): -1, -4, +0.5.
  grad = jax.grad(lambda x: losses.policy_token_terms(
      x, sampler, adv, PolicyLossConfig(tis_cap=2.0)).pg_loss.sum())(lp)
  np.testing.assert_allclose(grad, [-1.0, -4.0, 0.5], rtol=1e-6)
  # Off (cap 0): no weight, ratio against the sampler: r = 1, 3, 0.5; PG clipped.
  off = losses.policy_token_terms(lp, sampler, adv, PolicyLossConfig())
  np.testing.assert_allclose(off.tis_weight, 1.0)
  np.testing.assert_allclose(off.pg_loss, [-1.0, -2.0 * 1.28, 0.8], rtol=1e-6)


def test_tis_with_explicit_trainer_old_logprobs():
  """A trainer's old log-prob that differs from the current one: w from old vs sampler,
  ratio current / old. old = ln .4, sampler = ln .2: w = 2 (cap 5); current = ln .44:
  r = 1.1; A = 1 -> PG = -2 * 1.1."""
  terms = losses.policy_token_terms(
      jnp.log(jnp.array([0.44])), jnp.log(jnp.array([0.2])), jnp.array([1.0]),
      PolicyLossConfig(tis_cap=5.0), trainer_old_logprobs=jnp.log(jnp.array([0.4])))
  np.testing.assert_allclose(terms.tis_weight, [2.0], rtol=1e-6)
  np.testing.assert_allclose(terms.pg_loss, [-2.2], rtol=1e-5)


def test_tis_reaches_the_fused_loss():
  hidden, head, _, _, tokens, adv, old, mask, _ = _inputs(4)
  on = kernels.sequence_policy_loss(hidden, head, tokens, adv, old, mask,
                                    config=PolicyLossConfig(tis_cap=1.2), kernel=CHUNKED)[2]
  logp = jnp.take_along_axis(jax.nn.log_softmax(hidden @ head), tokens[..., None], -1)[..., 0]
  w = np.minimum(np.exp(np.asarray(logp) - np.asarray(old)), 1.2)
  m = np.asarray(mask) > 0  # padding positions score token 0 instead: not compared
  np.testing.assert_allclose(np.asarray(on["tis_weight"])[m], w[m], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(on["pg_loss"])[m], (-w * np.asarray(adv)[:, None])[m],
                             rtol=1e-5, atol=1e-6)
  assert 0 < np.asarray(on["tis_clipped"])[m].sum() < m.sum()


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("args, match", [
    (("median", 16, "chunked", 64), "estimator must be one of"),
    (("top_k", 0, "chunked", 64), "top_k must be a positive integer"),
    (("top_k", 65, "chunked", 64), "at most the vocabulary size 64"),
    (("top_k", 16, "pallas", 64), "needs rl.kernel.backend 'chunked'"),
    (("full_vocab", 16, "chunked", 151936), "small vocabularies"),
    (("full_vocab", 16, "chunked", None), "a checkpoint's vocabulary"),
])
def test_opd_estimator_settings_are_checked(args, match):
  with pytest.raises(ValueError, match=match):
    losses.check_opd_estimator(*args, one_device=True)


def test_full_vocab_refused_on_a_mesh_and_config_errors_name_the_field():
  with pytest.raises(ValueError, match="one device"):
    losses.check_opd_estimator("full_vocab", 16, "chunked", 64, one_device=False)
  losses.check_opd_estimator("full_vocab", 16, "chunked", 64, one_device=True)
  from copd_jax import config_lib, default_config
  cfg = default_config.get("copd", "micro")
  cfg.rl.opd.estimator = "full_vocab"
  cfg.mesh.data = 2
  with pytest.raises(ValueError, match=r"config\.rl\.opd: .*one device"):
    config_lib.validate_config(cfg)
  with pytest.raises(ValueError, match="tis_cap"):
    PolicyLossConfig(tis_cap=-1.0)


# ------------------------------------------------------------- through the trainer
def test_top_k_scores_cross_the_all_to_all_to_their_students():
  """score_by_teachers with the top_k estimator: each student gets, on its rows, the top
  k of ITS teacher, equal to a dense top-k of that teacher's logits."""
  from test_update import fixed_rows, ucfg_for
  from copd_jax import default_config, policy_setup
  from copd_jax.models import decoder, stacked
  from copd_jax.rl import scoring, stages
  s = policy_setup.build_setup(spec_of(default_config.get("copd", "micro")))
  params = stacked.init_stacked(s.model_cfg, jax.random.split(jax.random.key(1), 3))
  rows = fixed_rows(s, params, ("text", "image", "video"))
  routing = stages.teacher_routing(np.array([[1, 1], [2, 2], [0, 0]], np.int32), 3, samples=2)
  lp_k, ids = scoring.score_by_teachers(scoring.Teachers(params, routing.as_arrays()), rows,
                                        ucfg_for(s, opd_estimator="top_k", opd_top_k=8))
  assert lp_k.shape == ids.shape == rows.tokens.shape + (8,)
  for k in range(3):
    teacher = stacked.take_expert(params, (k + 1) % 3)
    hidden = decoder.forward_hidden(teacher, s.model_cfg, rows.tokens[k], rows.positions[k],
                                    rows.token_mask[k], rows.frames[k])
    dense = jax.nn.log_softmax(hidden @ decoder.lm_head(teacher, s.model_cfg), -1)
    want_lp, want_ids = jax.lax.top_k(dense, 8)
    m = np.asarray(rows.response_mask[k]) > 0
    np.testing.assert_array_equal(np.asarray(ids[k])[m], np.asarray(want_ids)[m])
    np.testing.assert_allclose(np.asarray(lp_k[k])[m], np.asarray(want_lp)[m], atol=1e-4)


@pytest.mark.parametrize("estimator", ["top_k", "full_vocab"])
def test_top_k_opd_update_lowers_the_kl_and_tis_is_reported(estimator):
  """Fixed rollouts with advantages 0: only the OPD term acts, so five updates lower the
  renormalised KL to the teacher; with tis_cap > 0 the metrics say TIS was applied."""
  from test_update import fixed_rows, ucfg_for
  from copd_jax import default_config, policy_setup
  from copd_jax.models import stacked
  from copd_jax.rl import scoring, stages, update as update_lib
  s = policy_setup.build_setup(spec_of(default_config.get("copd", "micro")))
  student = stacked.init_stacked(s.model_cfg, jax.random.split(jax.random.key(2), 1))
  teacher = stacked.init_stacked(s.model_cfg, jax.random.split(jax.random.key(3), 1))
  rows = fixed_rows(s, student, ("text",), n_prompts=4, g=2, opd_beta=1.0)
  arrays = stages.teacher_routing(np.zeros((1, 4), np.int32), 1, samples=2).as_arrays()
  ucfg = ucfg_for(s, opd_estimator=estimator, opd_top_k=8, tis_cap=2.0)
  optimizer = update_lib.make_optimizer(3e-3, 1.0)
  state = update_lib.TrainState(student, update_lib.init_optimizer_state(optimizer, student))
  fn, kls = update_lib.UpdateFn(one_device_run(s.model_cfg), ucfg, optimizer), []
  for _ in range(5):
    state, metrics = update_lib.update(fn, state, rows, scoring.Teachers(teacher, arrays))
    kls.append(float(metrics["opd/kl_mean"][0]))
  assert kls[0] > 0.05 and kls[-1] < 0.8 * kls[0], kls
  assert float(metrics["tis/applied"][0]) == 1.0
  assert 0 < float(metrics["tis/weight_mean"][0]) <= 2.0
  assert "opd/delta_mean" not in metrics
