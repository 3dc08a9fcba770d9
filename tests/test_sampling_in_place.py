"""The decode loop writes each step's keys/values into its KV cache in place: the
compiled loop body copies no cache buffer (one policy, one stacked expert, two stacked
experts). Before, attention read the old cache and the write came after it, so every
step copied each layer's K and V slots twice."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import one_device_run, tiny_config

from copd_jax import sampling as S
from copd_jax.analysis import hlo_audit
from copd_jax.models import decoder as M
from copd_jax.models.policy import policy_of
from copd_jax.sampling import decode

B, P, G, R = 4, 8, 4, 6


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config(vision=None, num_layers=2)
  params = M.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (B, P), 4, cfg.vocab_size)
  return cfg, params, tokens, jnp.ones((B, P), bool), S.SamplingConfig(max_new_tokens=R)


def slot_dims(cfg) -> tuple:
  """One layer's response K (or V) slots [N, K, R, Dh]."""
  return (B * G, cfg.num_kv_heads, R, cfg.head_dim)


def test_one_policy_loop_copies_no_cache(setup):
  cfg, params, tokens, mask, sampling = setup
  sampler = S.Sampler(policy_of(cfg), sampling, G)
  hlo = decode._generate_jit.lower(params, sampler, S.Prompts(tokens, mask),
                                   jax.random.key(2)).compile().as_text()
  assert "while" in hlo
  assert hlo_audit.loop_body_copies(hlo, slot_dims(cfg)) == 0


@pytest.mark.parametrize("experts", [1, 2])
def test_stacked_loop_copies_no_cache(setup, experts):
  cfg, params, tokens, mask, sampling = setup
  stacked = jax.tree.map(lambda x: jnp.stack([x] * experts), params)
  program = S.sampler_program(one_device_run(cfg), S.Sampler(cfg, sampling, G))
  keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(2), experts)))
  prompts = S.Prompts(jnp.stack([tokens] * experts), jnp.stack([mask] * experts))
  hlo = program.lower(stacked, prompts, keys).compile().as_text()
  dims = slot_dims(cfg)
  assert hlo_audit.loop_body_copies(hlo, (experts,) + dims) == 0
  assert hlo_audit.loop_body_copies(hlo, dims) == 0


def test_loop_body_copies_counts_a_copying_loop():
  """The counter sees a loop that copies its carry (so the zeros above can fail)."""
  def body(carry):
    i, x = carry
    y = x.at[i].set(1.0)
    return i + 1, x + y[::-1]  # reads the old x after the write: XLA copies it
  fn = jax.jit(lambda x: jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1])
  hlo = fn.lower(jnp.zeros((64, 32))).compile().as_text()
  assert hlo_audit.loop_body_copies(hlo, (64, 32)) > 0
