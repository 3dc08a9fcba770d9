"""Policy checkpoints: round trip, and mismatches named rather than re-initialised."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from copd_jax import checkpoint


def params(width=3):
  return {"layers_0": {"kernel": jnp.arange(2 * width, dtype=jnp.float32).reshape(2, width)},
          "norm": {"scale": jnp.ones(4)}}


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_round_trip(tmp_path):
  checkpoint.save_policy(str(tmp_path), params(), {"model": {"d": 3}})
  assert checkpoint.has_policy(str(tmp_path))
  restored = checkpoint.load_policy(str(tmp_path), abstract(params()), {"model": {"d": 3}})
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params())):
    np.testing.assert_array_equal(a, b)


def test_metadata_mismatch_names_field(tmp_path):
  checkpoint.save_policy(str(tmp_path), params(), {"model": {"d": 3}, "seed": 0})
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"model\.d: checkpoint has 3, run expects 4"):
    checkpoint.load_policy(str(tmp_path), abstract(params()), {"model": {"d": 4}, "seed": 0})


def test_shape_mismatch_names_parameter(tmp_path):
  checkpoint.save_policy(str(tmp_path), params(width=3), {})
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"layers_0.*kernel.*\(2, 3\).*\(2, 5\)"):
    checkpoint.load_policy(str(tmp_path), abstract(params(width=5)), {})


def test_missing_parameter_named(tmp_path):
  checkpoint.save_policy(str(tmp_path), params(), {})
  wanted = dict(abstract(params()), extra={"bias": jax.ShapeDtypeStruct((2,), jnp.float32)})
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"extra.*bias.*missing in checkpoint"):
    checkpoint.load_policy(str(tmp_path), wanted, {})


def test_unfinished_checkpoint_is_not_a_policy(tmp_path):
  checkpoint.save_policy(str(tmp_path), params(), {})
  os.remove(os.path.join(tmp_path, checkpoint.METADATA_FILE))  # as if killed before the end
  assert not checkpoint.has_policy(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="metadata.json missing"):
    checkpoint.load_policy(str(tmp_path), abstract(params()), {})


def test_truncated_params_fail_clearly(tmp_path):
  checkpoint.save_policy(str(tmp_path), params(), {})
  params_dir = os.path.join(tmp_path, checkpoint.PARAMS_SUBDIR)
  for name in os.listdir(params_dir):
    path = os.path.join(params_dir, name)
    if os.path.isfile(path):
      os.remove(path)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="cannot read parameter metadata"):
    checkpoint.load_policy(str(tmp_path), abstract(params()), {})
