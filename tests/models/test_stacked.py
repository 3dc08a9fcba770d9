"""Stacked experts: vmapped init/forward agree with single experts; merge is an average."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import IMG, tiny_config

from copd_jax.models import decoder as M, stacked as X

E = 3


@pytest.fixture(scope="module")
def cfg():
  return tiny_config()


@pytest.fixture(scope="module")
def stacked(cfg):
  return X.init_stacked(cfg, jax.random.split(jax.random.key(0), E))


def test_init_stacked_adds_expert_axis_and_differs(cfg, stacked):
  single = M.init_params(cfg, jax.random.key(9))
  shapes = jax.tree_util.tree_map(lambda x: x.shape, stacked)
  want = jax.tree_util.tree_map(lambda x: (E,) + x.shape, single)
  assert shapes == want
  assert X.num_experts(stacked) == E
  q = stacked["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert not np.allclose(q[0], q[1])  # independent keys give different experts


def test_init_stacked_matches_per_key_init(cfg, stacked):
  keys = jax.random.split(jax.random.key(0), E)
  one = M.init_params(cfg, keys[1])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                         X.take_expert(stacked, 1), one)


def test_stacked_forward_equals_each_experts_forward(cfg, stacked):
  b, t, n = 2, 12, cfg.vision.num_tokens
  tokens = jax.random.randint(jax.random.key(1), (E, b, t), 4, 48)
  tokens = tokens.at[:, 0, 2:2 + n].set(IMG)  # row 0 of every expert holds an image
  mask = jnp.ones((E, b, t), bool).at[:, 1, :3].set(False)  # row 1 left-padded
  pos = M.positions_from_mask(mask)
  vision = jax.random.uniform(jax.random.key(2), (E, b, 4, 16, 16, 3))
  hidden = X.stacked_forward_hidden(stacked, cfg, tokens, pos, mask, vision)
  assert hidden.shape == (E, b, t, cfg.d_model)
  for k in range(E):
    own = M.forward_hidden(X.take_expert(stacked, k), cfg, tokens[k], pos[k], mask[k], vision[k])
    np.testing.assert_allclose(hidden[k], own, atol=1e-5)
  assert np.abs(hidden[0] - hidden[1]).max() > 1e-3


def test_stacked_forward_text_only(cfg, stacked):
  tokens = jax.random.randint(jax.random.key(3), (E, 2, 5), 4, 48)
  mask = jnp.ones((E, 2, 5), bool)
  hidden = X.stacked_forward_hidden(stacked, cfg, tokens, M.positions_from_mask(mask), mask)
  own = M.forward_hidden(X.take_expert(stacked, 2), cfg, tokens[2],
                         M.positions_from_mask(mask[2]), mask[2])
  np.testing.assert_allclose(hidden[2], own, atol=1e-5)


def test_broadcast_then_merge_is_identity(cfg):
  base = M.init_params(cfg, jax.random.key(4))
  copies = X.broadcast_params(base, 4)
  assert X.num_experts(copies) == 4
  for weights in (None, [0.1, 0.2, 0.3, 0.4]):
    merged = X.merge(copies, weights)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                           merged, base)


def test_merge_is_the_weighted_average(stacked):
  leaf = lambda p: p["layers_1"]["mlp"]["up_proj"]["kernel"]  # noqa: E731
  uniform = X.merge(stacked)
  np.testing.assert_allclose(leaf(uniform), leaf(stacked).mean(0), atol=1e-6)
  # Weights are normalised: [2, 2, 0] averages the first two experts.
  pair = X.merge(stacked, [2.0, 2.0, 0.0])
  np.testing.assert_allclose(leaf(pair), (leaf(stacked)[0] + leaf(stacked)[1]) / 2, atol=1e-6)
  only_last = X.merge(stacked, np.array([0, 0, 5]))
  np.testing.assert_allclose(leaf(only_last), leaf(stacked)[2], atol=1e-6)


@pytest.mark.parametrize("weights, message", [
    ([1.0, 1.0], "one entry per expert"),
    ([1.0, -1.0, 1.0], "non-negative"),
    ([0.0, 0.0, 0.0], "all be zero"),
    ([1.0, float("nan"), 1.0], "finite"),
])
def test_merge_weights_validate(stacked, weights, message):
  with pytest.raises(ValueError, match=message):
    X.merge(stacked, weights)


def test_take_expert_and_num_experts_errors(stacked):
  with pytest.raises(ValueError, match="out of range"):
    X.take_expert(stacked, E)
  with pytest.raises(ValueError, match="leading expert axis"):
    X.num_experts({"a": jnp.zeros((3, 2)), "b": jnp.zeros((2, 2))})
  with pytest.raises(ValueError, match="num_experts"):
    X.broadcast_params({"a": jnp.zeros(2)}, 0)
