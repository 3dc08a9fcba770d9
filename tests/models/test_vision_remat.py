"""Memory settings a pod config relies on, checked on small shapes: the Qwen3-VL vision
tower rematerialises its blocks under model.remat (same values and gradients, only block
inputs saved). The vocabulary-parallel LM head and the branches-in-sequence update are
pinned in tests/test_kernels_sharded.py, tests/test_param_sharding.py and
tests/test_parallel.py."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

import paths
from copd_jax.models import hf_checkpoint, qwen3_vl, qwen3_vl_config

FIXTURE = os.path.join(paths.HF_FIXTURES, "qwen3_vl_tiny")


def test_vision_tower_remat_keeps_values_and_gradients_and_rematerialises_each_block():
  cfg = qwen3_vl_config.Qwen3VLConfig.from_hf(hf_checkpoint.read_hf_config(FIXTURE))
  vcfg = cfg.vision
  m = vcfg.spatial_merge_size
  grids = ((1, 2 * m, 2 * m),)  # one image of 4 merged tokens
  n = 4 * m * m
  patches = jnp.asarray(np.random.default_rng(0).normal(size=(n, vcfg.patch_dim)), jnp.float32)
  towers = {r: qwen3_vl.VisionTower(vcfg, jnp.float32, remat=r) for r in (False, True)}
  params = jax.jit(towers[False].init, static_argnums=2)(jax.random.key(0), patches, grids)

  def loss(p, tower):
    tokens, deepstack = tower.apply(p, patches, grids)
    return jnp.sum(jnp.sin(tokens)) + sum(jnp.sum(d ** 2) for d in deepstack)

  # Jitted, as the update runs the tower: one program per tower, not one per eager op.
  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  out = {r: value_and_grad(params, towers[r]) for r in towers}
  np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out[True][1]), jax.tree.leaves(out[False][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  text = {r: str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, towers[r]))
          for r in towers}
  assert text[True].count("checkpoint") >= vcfg.depth or text[True].count("remat") >= vcfg.depth
  assert "checkpoint" not in text[False] and "remat" not in text[False]
