"""Saving and loading a single policy (the warm-started base) with orbax.

Layout of a policy directory:
    <dir>/params/         orbax StandardCheckpointer tree (float32 parameters)
    <dir>/metadata.json   what produced it (model config, tasks, warm-start recipe)

orbax writes `params/` to a temporary name and renames it when complete, and
metadata.json is written (atomically, via rename) only after that, so a directory
with metadata.json always holds a finished checkpoint. Loading compares the stored
metadata and parameter shapes with what the caller expects and names any difference;
nothing is silently re-initialised.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PARAMS_SUBDIR = "params"
METADATA_FILE = "metadata.json"


class CheckpointMismatchError(ValueError):
  """A stored checkpoint does not match what the run expects."""


def has_policy(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, METADATA_FILE))


def save_policy(directory: str, params: Any, metadata: dict) -> None:
  """Writes params (a pytree of arrays) and JSON-serialisable metadata to `directory`."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  params_dir = os.path.join(directory, PARAMS_SUBDIR)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(params_dir, params, force=True)  # every process writes its shards
  checkpointer.wait_until_finished()
  if jax.process_index() != 0:  # one writer for the small files
    return
  tmp = os.path.join(directory, METADATA_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(metadata, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(directory, METADATA_FILE))


def read_metadata(directory: str) -> dict:
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no finished policy checkpoint at {directory} ({METADATA_FILE} missing)")
  with open(path) as f:
    return json.load(f)


def _diff_metadata(stored: Any, expected: Any, path: str = "") -> list[str]:
  if isinstance(stored, dict) and isinstance(expected, dict):
    out = []
    for key in sorted(set(stored) | set(expected)):
      sub = f"{path}.{key}" if path else key
      if key not in stored:
        out.append(f"{sub}: missing in checkpoint (expected {expected[key]!r})")
      elif key not in expected:
        out.append(f"{sub}: only in checkpoint ({stored[key]!r})")
      else:
        out += _diff_metadata(stored[key], expected[key], sub)
    return out
  # JSON turns tuples into lists; compare through JSON.
  if json.dumps(stored, sort_keys=True) != json.dumps(expected, sort_keys=True):
    return [f"{path}: checkpoint has {stored!r}, run expects {expected!r}"]
  return []


def _shape_differences(stored_tree: Any, abstract_params: Any) -> list[str]:
  stored = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(stored_tree)}
  wanted = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(abstract_params)}
  out = [f"{k}: missing in checkpoint" for k in sorted(set(wanted) - set(stored))]
  out += [f"{k}: only in checkpoint" for k in sorted(set(stored) - set(wanted))]
  out += [f"{k}: checkpoint shape {stored[k]}, expected {wanted[k]}"
          for k in sorted(set(stored) & set(wanted)) if stored[k] != wanted[k]]
  return out


def load_policy(directory: str, abstract_params: Any, expected_metadata: dict | None = None):
  """Restores params shaped like `abstract_params` (a pytree of jax.ShapeDtypeStruct).

  Raises CheckpointMismatchError naming every differing metadata field or parameter.
  """
  directory = os.path.abspath(directory)
  stored_metadata = read_metadata(directory)
  if expected_metadata is not None:
    diffs = _diff_metadata(stored_metadata, json.loads(json.dumps(expected_metadata)))
    if diffs:
      raise CheckpointMismatchError(
          f"policy checkpoint at {directory} does not match this run:\n  " + "\n  ".join(diffs))
  checkpointer = ocp.StandardCheckpointer()
  params_dir = os.path.join(directory, PARAMS_SUBDIR)
  try:
    stored_tree = checkpointer.metadata(params_dir).item_metadata.tree
  except Exception as e:  # truncated or foreign directory
    raise CheckpointMismatchError(f"cannot read parameter metadata in {params_dir}: {e}") from e
  diffs = _shape_differences(stored_tree, abstract_params)
  if diffs:
    raise CheckpointMismatchError(
        f"parameters in {params_dir} do not match the model:\n  " + "\n  ".join(diffs[:20]))
  return checkpointer.restore(params_dir, _with_local_default_sharding(abstract_params))


def _with_local_default_sharding(abstract_params: Any) -> Any:
  """Leaves without a sharding are restored onto this process's first device. (Left to
  orbax they would go to jax.devices()[0], which another process owns in a multi-process
  run.)"""
  device = jax.local_devices()[0]

  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                  sharding=jax.sharding.SingleDeviceSharding(device))
    return x
  return jax.tree.map(one, abstract_params)
