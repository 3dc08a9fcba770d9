"""What the GRPO update does, pinned to expectations computed outside the update.

The comparisons elsewhere (micro-batched vs whole, sharded vs not) run the same loss code on
both sides, so a sign or mask error they share passes them. These tests read log-probs with
a plain forward + log_softmax (the oracle) and check:
  - the direction of learning: advantage +1 raises a response's log-prob, -1 lowers it;
  - which columns carry the loss: only response tokens (response_mask), so values in the
    prompt columns or past the stop token change neither the loss nor the gradients.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import one_device_run, tiny_config

from copd_jax import kernels, losses
from copd_jax.models import decoder, stacked
from copd_jax.rl import rows as rows_lib, scoring, update as update_lib

PROMPT = [5, 6, 7, 8]
# Two samples of the same prompt; the first stops (token 2) after two tokens, then pads (0).
RESPONSES = [[9, 10, 2, 0, 0], [11, 12, 13, 14, 2]]
STOP_ROW, STOP_COLUMN = 0, len(PROMPT) + 2  # the stop token of row 0


def make_rows(responses=RESPONSES, old_logprobs=None, advantages=(1.0, -1.0)) -> rows_lib.Rows:
  """Rows [1, 2, P + R] built by hand: token_mask covers prompt + response up to the stop
  token; response_mask[t] = 1 where token t+1 is a response token."""
  p = len(PROMPT)
  tokens = np.array([PROMPT + r for r in responses], np.int32)
  token_mask = np.zeros(tokens.shape, bool)
  response_mask = np.zeros(tokens.shape, np.float32)
  for i, r in enumerate(responses):
    length = r.index(2) + 1  # through the stop token
    token_mask[i, :p + length] = True
    response_mask[i, p - 1:p + length - 1] = 1.0
  positions = np.maximum(np.cumsum(token_mask, axis=1) - 1, 0).astype(np.int32)
  old = np.zeros(tokens.shape, np.float32) if old_logprobs is None else old_logprobs
  return rows_lib.Rows(tokens=jnp.asarray(tokens)[None], positions=jnp.asarray(positions)[None],
                       token_mask=jnp.asarray(token_mask)[None],
                       response_mask=jnp.asarray(response_mask)[None],
                       old_logprobs=jnp.asarray(old)[None],
                       advantages=jnp.asarray([advantages], jnp.float32),
                       opd_beta=jnp.zeros((1, 2), jnp.float32), frames=None)


def oracle_token_logprobs(params, cfg, rows: rows_lib.Rows) -> np.ndarray:
  """f32[2, T]: log p(token t+1 | tokens <= t) of branch 0, by a plain forward."""
  one = jax.tree.map(lambda x: x[0], params)
  hidden = decoder.forward_hidden(one, cfg, rows.tokens[0], rows.positions[0],
                                  rows.token_mask[0])
  logp = jax.nn.log_softmax(decoder.logits_from_hidden(hidden, decoder.lm_head(one, cfg)))
  targets = jnp.concatenate([rows.tokens[0, :, 1:], jnp.zeros((2, 1), jnp.int32)], axis=1)
  return np.asarray(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0])


def update_config(cfg, prompt_once: bool) -> rows_lib.UpdateConfig:
  # Loss "token_mean" with PPO clipping; KL off. samples_per_prompt 2: both rows share a prompt.
  return rows_lib.UpdateConfig(model=cfg, loss=losses.PolicyLossConfig(),
                               kernel=kernels.KernelConfig(backend="chunked", vocab_tile=16,
                                                           token_tile=16),
                               samples_per_prompt=2 if prompt_once else 1)


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config(vision=None)
  return cfg, stacked.init_stacked(cfg, jax.random.split(jax.random.key(0), 1))


@pytest.mark.parametrize("prompt_once", [False, True])
def test_positive_advantage_raises_and_negative_lowers_logprob(model, prompt_once):
  cfg, params = model
  ucfg = update_config(cfg, prompt_once)
  prompt_len = len(PROMPT) if prompt_once else 0
  optimizer = update_lib.make_optimizer(1e-2, 1.0)
  fn = update_lib.UpdateFn(one_device_run(ucfg.model), ucfg, optimizer)
  state = update_lib.TrainState(params, update_lib.init_optimizer_state(optimizer, params))
  rows = dataclasses.replace(make_rows(), prompt_len=prompt_len)
  mask = np.asarray(rows.response_mask[0])

  def sequence_logprobs(p):  # [2]: sum of each response's token log-probs
    return (oracle_token_logprobs(p, cfg, rows) * mask).sum(axis=1)
  before = sequence_logprobs(params)
  for _ in range(3):
    # On-policy rows: the sampler's log-probs are the current policy's (ratio 1).
    rows.old_logprobs = jnp.asarray(oracle_token_logprobs(state.params, cfg, rows))[None]
    state, _ = update_lib.update(fn, state, rows)
  after = sequence_logprobs(state.params)
  assert after[0] > before[0] + 0.05, (before, after)  # advantage +1: more likely
  assert after[1] < before[1] - 0.05, (before, after)  # advantage -1: less likely


def loss_and_grads(params, cfg, rows, prompt_once: bool):
  ucfg = update_config(cfg, prompt_once)
  one = lambda tree: jax.tree.map(lambda x: x[0], tree)
  rows = dataclasses.replace(rows, prompt_len=len(PROMPT) if prompt_once else 0)
  loss, _, grads = update_lib.student_grads(one(params), one(rows), None, None, ucfg)
  return float(loss), grads


@pytest.mark.parametrize("prompt_once", [False, True])
def test_loss_reads_response_tokens_only(model, prompt_once):
  cfg, params = model
  base_old = oracle_token_logprobs(params, cfg, make_rows()) - 0.1  # ratio != 1: loss > 0
  loss, grads = loss_and_grads(params, cfg, make_rows(old_logprobs=base_old), prompt_once)
  assert abs(loss) > 1e-4

  response_mask = np.asarray(make_rows().response_mask[0])
  # Old log-probs and tokens where response_mask is 0: the prompt columns and every column
  # from the stop token on (row 0's stop column predicts the padding after it).
  changed_old = np.where(response_mask > 0, base_old, base_old + 3.0)
  changed_pad = [RESPONSES[0][:3] + [17, 23], RESPONSES[1]]
  for rows in (make_rows(old_logprobs=changed_old),
               make_rows(responses=changed_pad, old_logprobs=base_old)):
    other_loss, other_grads = loss_and_grads(params, cfg, rows, prompt_once)
    np.testing.assert_allclose(other_loss, loss, rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 other_grads, grads)

  # Control: a response column's old log-prob does move the loss (the test can fail).
  moved = base_old.copy()
  moved[1, len(PROMPT)] += 1.0
  assert abs(loss_and_grads(params, cfg, make_rows(old_logprobs=moved), prompt_once)[0]
             - loss) > 1e-4


# ------------------------------------------- the clipped update with a teacher, by hand
def oracle_clipped_opd_loss(params, teacher, cfg, rows, mode: str, eps_low=0.2, eps_high=0.28):
  """The token-mean PPO loss of branch 0 written out here: advantage A = a_rl + beta *
  (log p_teacher - log p_student) with log p_student the sampler's (mode 'old') or the
  current policy's under stop-gradient ('current'); loss = max(-A r, -A clip(r, 1 - eps_low,
  1 + eps_high)), r = p / p_old, averaged over response tokens. Returns (loss, clipped
  fraction) with the loss differentiable in params."""
  def logprobs(p):
    one = jax.tree.map(lambda x: x[0], p)
    hidden = decoder.forward_hidden(one, cfg, rows.tokens[0], rows.positions[0],
                                    rows.token_mask[0])
    logp = jax.nn.log_softmax(decoder.logits_from_hidden(hidden, decoder.lm_head(one, cfg)))
    targets = jnp.concatenate([rows.tokens[0, :, 1:], jnp.zeros((2, 1), jnp.int32)], axis=1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  lp = logprobs(params)
  old = rows.old_logprobs[0]
  student = old if mode == "old" else jax.lax.stop_gradient(lp)
  adv = jax.lax.stop_gradient(rows.advantages[0][:, None]
                              + rows.opd_beta[0][:, None] * (logprobs(teacher) - student))
  ratio = jnp.exp(lp - old)
  per_token = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - eps_low, 1 + eps_high))
  mask = rows.response_mask[0]
  clipped = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
  return jnp.sum(per_token * mask) / jnp.sum(mask), float(jnp.sum(clipped * mask) / jnp.sum(mask))


@pytest.mark.parametrize("mode", ["old", "current"])
def test_clipped_opd_update_matches_the_hand_written_loss(model, mode):
  """One SGD step (learning rate 1, so the step is minus the gradient) of `update` with a
  frozen teacher, sampler log-probs far from the current policy's (ratios well outside the
  clip band, both sides), RL advantages of both signs and beta 0.7: equal to the gradient of
  the loss written above, in both student-log-prob modes."""
  import optax

  from copd_jax.rl import stages
  cfg, params = model
  teacher = stacked.init_stacked(cfg, jax.random.split(jax.random.key(7), 1))
  rows = make_rows(advantages=(0.5, -0.5))
  current = oracle_token_logprobs(params, cfg, rows)
  # Per response column: the sampler was far more (+) or far less (-) likely than now.
  offsets = np.tile([0.9, -0.9, 0.6, -0.6, 0.1, -0.4, 0.7, -0.8, 0.5], 2)[:current.size]
  rows.old_logprobs = jnp.asarray(current + offsets.reshape(current.shape))[None]
  rows.opd_beta = jnp.full((1, 2), 0.7, jnp.float32)
  ucfg = dataclasses.replace(
      update_config(cfg, prompt_once=True),
      loss=losses.PolicyLossConfig(opd_student_logprob=mode))
  routing = stages.teacher_routing(np.zeros((1, 1), np.int32), 1, samples=2).as_arrays()
  optimizer = optax.sgd(1.0)
  new_state, metrics = update_lib.update(
      update_lib.UpdateFn(one_device_run(cfg), ucfg, optimizer),
      update_lib.TrainState(params, update_lib.init_optimizer_state(optimizer, params)),
      dataclasses.replace(rows, prompt_len=len(PROMPT)), scoring.Teachers(teacher, routing))
  new = new_state.params
  (want_loss, clipped), = [(float(l), c) for l, c in
                           [oracle_clipped_opd_loss(params, teacher, cfg, rows, mode)]]
  want_grads = jax.grad(lambda p: oracle_clipped_opd_loss(p, teacher, cfg, rows, mode)[0])(params)
  assert 0.1 < clipped < 0.9, clipped  # the clip binds on some tokens, not on all
  np.testing.assert_allclose(float(metrics["loss"][0]), want_loss, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(metrics["clip_fraction"][0]), clipped, atol=1e-6)
  got_grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, new)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads))
  assert scale > 1e-3
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, np.asarray(w), rtol=2e-3,
                                                       atol=2e-4 * scale), got_grads, want_grads)
  # The two modes are different losses here, so the test tells them apart.
  other = "current" if mode == "old" else "old"
  other_loss = float(oracle_clipped_opd_loss(params, teacher, cfg, rows, other)[0])
  assert abs(other_loss - want_loss) > 1e-3
