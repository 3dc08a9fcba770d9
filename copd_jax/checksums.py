"""Checksums of saved state: arrays (on device, sharding-independent) and JSON values.

Both checkpoint kinds use them: saved policies (copd_jax/checkpoint.py) and training
checkpoints (copd_jax/train_checkpoint.py), which verify everything a load or resume
reads against them.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def _words(x) -> jax.Array:
  """Any array's bytes as uint32 words (1-D): 4-byte types bitcast, 2- and 1-byte types
  widened, 8-byte types split in two."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)  # [..., 2]
  unsigned = {2: jnp.uint16, 1: jnp.uint8}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _array_checksum(x) -> jax.Array:
  """uint32[2]: two position-weighted sums of the array's words, modulo 2**32. The
  weights are odd, so any change of a single word changes both; integer sums are exact
  in any order, so the value does not depend on sharding or device count."""
  words = _words(x)
  i = jnp.arange(words.shape[0], dtype=jnp.uint32)
  return jnp.stack([jnp.sum(words * (2 * i + 1)),
                    jnp.sum(words * ((i * jnp.uint32(2654435761)) | 1))])


@jax.jit
def _checksums(tree):
  return jax.tree.map(_array_checksum, tree)


def array_checksums(tree) -> dict[str, list[int]]:
  """{array path: [two uint32 checksums]} of every array of a pytree (on device; only
  the small results come to the host)."""
  from copd_jax import sharding as sharding_lib
  sums = sharding_lib.to_host(_checksums(tree))
  return {jax.tree_util.keystr(k): [int(v) for v in np.asarray(c)]
          for k, c in jax.tree_util.tree_leaves_with_path(sums)}


def checksum_mismatches(stored: Mapping[str, Any], tree) -> list[str]:
  """Paths of the arrays of `tree` whose checksum differs from `stored` (or is missing)."""
  now = array_checksums(tree)
  return [k for k in now if stored.get(k) != now[k]]


def json_digest(value: Any) -> str:
  """SHA-256 of a JSON value in canonical form (sorted keys, no spaces): equal for the
  value saved and the same value read back, different after any changed character."""
  text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
  return hashlib.sha256(text.encode()).hexdigest()
