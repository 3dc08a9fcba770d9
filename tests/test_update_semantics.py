"""What the GRPO update does, pinned to expectations computed outside the update.

The comparisons elsewhere (micro-batched vs whole, sharded vs not) run the same loss code on
both sides, so a sign or mask error they share passes them. These tests read log-probs with
a plain forward + log_softmax (the oracle) and check:
  - the direction of learning: advantage +1 raises a response's log-prob, -1 lowers it;
  - which columns carry the loss: only response tokens (response_mask), so values in the
    prompt columns or past the stop token change neither the loss nor the gradients.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import one_device_run, tiny_config

from copd_jax import kernels
from copd_jax.models import decoder, stacked
from copd_jax.rl import objectives, rows as rows_lib, update as update_lib

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
  return rows_lib.UpdateConfig(model=cfg, loss=objectives.PolicyLossConfig(),
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
  opt_state = update_lib.init_optimizer_state(optimizer, params)
  rows = make_rows()
  mask = np.asarray(rows.response_mask[0])

  def sequence_logprobs(p):  # [2]: sum of each response's token log-probs
    return (oracle_token_logprobs(p, cfg, rows) * mask).sum(axis=1)
  before = sequence_logprobs(params)
  for _ in range(3):
    # On-policy rows: the sampler's log-probs are the current policy's (ratio 1).
    rows.old_logprobs = jnp.asarray(oracle_token_logprobs(params, cfg, rows))[None]
    params, opt_state, _ = update_lib.update(params, opt_state, None, rows, None, run=one_device_run(ucfg.model), ucfg=ucfg,
                                             optimizer=optimizer, distil=False,
                                             prompt_len=prompt_len)
  after = sequence_logprobs(params)
  assert after[0] > before[0] + 0.05, (before, after)  # advantage +1: more likely
  assert after[1] < before[1] - 0.05, (before, after)  # advantage -1: less likely


def loss_and_grads(params, cfg, rows, prompt_once: bool):
  ucfg = update_config(cfg, prompt_once)
  one = lambda tree: jax.tree.map(lambda x: x[0], tree)
  loss, _, grads = update_lib.student_grads(one(params), one(rows), None, None, ucfg,
                                            len(PROMPT) if prompt_once else 0)
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
