"""The Pallas splash-attention path (kernels/attention.py, ModelConfig.attention_kernel):
values against a float64 numpy oracle, gradients against plain masked-softmax attention
written here, and the decoder with the kernel against the decoder without it. The kernel
runs in Pallas interpret mode on CPU (slow): shapes stay small."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import tiny_config

from copd_jax.kernels import attention as A
from copd_jax.models import decoder as M


def _inputs(n=2, tq=11, prefix=0, kv=2, groups=2, hd=8, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(n, tq, kv, groups, hd)).astype(np.float32) * hd ** -0.5
  k = rng.normal(size=(n, prefix + tq, kv, hd)).astype(np.float32)
  v = rng.normal(size=(n, prefix + tq, kv, hd)).astype(np.float32)
  return q, k, v


def _masked_softmax_attention(q, k, v, allowed):
  """Plain jnp attention: q [N, Tq, K, G, Dh], k, v [N, Tk, K, Dh], allowed bool[N, Tq, Tk]."""
  scores = jnp.einsum("nqkgd,nskd->nkgqs", q, k)
  scores = jnp.where(allowed[:, None, None], scores, -1e30)
  return jnp.einsum("nkgqs,nskd->nqkgd", jax.nn.softmax(scores, axis=-1), v)


def test_self_attention_with_left_padding_matches_a_numpy_oracle():
  q, k, v = _inputs()
  valid = np.ones((2, 11), bool)
  valid[1, :4] = False  # left padding
  got = np.asarray(A.splash_attention(q, k, v, valid, valid))
  want = A.dense_reference(q, k, v, valid, valid)
  np.testing.assert_allclose(got[valid], want[valid], atol=2e-5)


def test_queries_after_a_prefix_see_its_valid_keys_and_their_own_causally():
  prefix = 5
  q, k, v = _inputs(tq=7, prefix=prefix, seed=1)
  q_valid = np.ones((2, 7), bool)
  kv_valid = np.ones((2, prefix + 7), bool)
  kv_valid[0, :2] = False  # a left-padded prompt
  got = np.asarray(A.splash_attention(q, k, v, q_valid, kv_valid, prefix_len=prefix))
  want = A.dense_reference(q, k, v, q_valid, kv_valid, prefix_len=prefix)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # The oracle can tell a wrong offset and an ignored key mask apart from this.
  for wrong in (A.dense_reference(q, k, v, q_valid, kv_valid, prefix_len=prefix - 2),
                A.dense_reference(q, k, v, q_valid, np.ones_like(kv_valid), prefix_len=prefix)):
    assert np.abs(got - wrong).max() > 1e-2


def test_gradients_match_plain_masked_softmax_attention():
  prefix = 3
  q, k, v = _inputs(n=1, tq=6, prefix=prefix, seed=2)
  q_valid = np.ones((1, 6), bool)
  kv_valid = np.ones((1, prefix + 6), bool)
  kv_valid[0, 0] = False
  allowed = (kv_valid[:, None, :]
             & (np.arange(prefix + 6)[None, None, :] <= prefix + np.arange(6)[None, :, None]))
  weights = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float32)

  def loss(attend, q, k, v):
    return jnp.sum(attend(q, k, v) * weights)
  splash = lambda q, k, v: A.splash_attention(q, k, v, q_valid, kv_valid,  # noqa: E731
                                              prefix_len=prefix)
  plain = lambda q, k, v: _masked_softmax_attention(q, k, v, allowed)  # noqa: E731
  got = jax.grad(lambda *a: loss(splash, *a), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5)


def test_keys_must_be_prefix_plus_queries():
  q, k, v = _inputs(tq=4, prefix=2)
  with pytest.raises(ValueError, match="prefix_len"):
    A.splash_attention(q, k, v, np.ones((2, 4), bool), np.ones((2, 6), bool), prefix_len=0)


@pytest.fixture(scope="module")
def model():
  cfg = dataclasses.replace(tiny_config(), vision=None, image_token_id=-1)
  return cfg, M.init_params(cfg, jax.random.key(0))


def test_decoder_with_the_splash_kernel_matches_the_xla_decoder(model):
  """Values and gradients of whole rows and of shared-prefix teacher forcing."""
  cfg, params = model
  splash = dataclasses.replace(cfg, attention_kernel="splash")
  assert splash.uses_splash_attention and not cfg.uses_splash_attention
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(4, 48, (3, 10)))
  mask = jnp.asarray(np.arange(10)[None] >= np.array([[0], [2], [5]]))
  pos = M.positions_from_mask(mask)
  prompt, prompt_mask, prompt_pos = tokens[:, :6], mask[:, :6], pos[:, :6]
  cont = jnp.asarray(rng.integers(4, 48, (6, 5)))
  cont_pos = jnp.repeat(prompt_mask.sum(1), 2)[:, None] + jnp.arange(5)

  def whole(c, p):
    return M.forward_hidden(p, c, tokens, pos, mask)

  def shared(c, p):
    return M.forward_hidden_shared_prefix(p, c, prompt, prompt_pos, prompt_mask, None, cont,
                                          cont_pos)

  np.testing.assert_allclose(np.asarray(whole(splash, params))[np.asarray(mask)],
                             np.asarray(whole(cfg, params))[np.asarray(mask)], atol=2e-5)
  for got, want, valid in zip(shared(splash, params), shared(cfg, params),
                              (np.asarray(prompt_mask), np.ones((6, 5), bool))):
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-5)

  def loss(c, p):
    prompt_hidden, cont_hidden = shared(c, p)
    return (jnp.sum(jnp.sin(whole(c, p)) * mask[..., None]) + jnp.sum(jnp.cos(cont_hidden))
            + jnp.sum(prompt_hidden * prompt_mask[..., None]))
  grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)  # one program per config
  want = grad(cfg, params)
  got = grad(splash, params)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=5e-5, rtol=1e-4)


def test_auto_uses_the_kernel_on_tpu_only(model):
  cfg, _ = model
  auto = dataclasses.replace(cfg, attention_kernel="auto")
  assert auto.uses_splash_attention == (jax.default_backend() == "tpu")
  with pytest.raises(ValueError, match="attention_kernel"):
    dataclasses.replace(cfg, attention_kernel="flash")
